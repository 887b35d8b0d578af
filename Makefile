# SensorFleet — every entry point a contributor or CI needs.
# `make test` is the test command (CI calls it); `make run` runs the example fleet.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-packages test run bench lint clean s3-build s3-up s3-down

install: $(STAMP)

# Debian packages the tests need (hack/system-packages.txt); installs only the missing ones.
system-packages:
	hack/ensure-system-packages.sh

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Everything the tests need is installed or built here when missing: Debian packages, the
# virtualenv, the Kubernetes binaries (cached in ~/.cache/sensorfleet).
test: system-packages install node-peers cluster-build s3-build
	$(BIN)/pytest

run: install
	$(BIN)/sensorfleet run examples/fleet.yaml

# Every bench/bench_*.py, then one HTML report of all results (bench/results/report.html).
bench: install
	set -e; for script in bench/bench_*.py; do echo "== $$script"; PYTHONPATH=. $(BIN)/python $$script; done
	$(BIN)/python bench/report.py

# npm packages of the interop peers (Eclipse Tahu's Sparkplug codec, node-opcua's client), cached in ~/.cache/sensorfleet/npm.
.PHONY: node-peers
node-peers: system-packages
	hack/node-modules.sh tests/protocols/sparkplug_node >/dev/null
	hack/node-modules.sh tests/protocols/opcua_node >/dev/null

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info

# --- local Kubernetes control plane (issue 5) ---
# A real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) on 127.0.0.1,
# run by the devcluster/ package (dev tooling beside src/, not in the wheel),
# built from pinned Go modules into ~/.cache/sensorfleet (see docs/kubernetes-testing.md).
# kind-up/kind-down are for machines with Docker; tests use either via KUBECONFIG.
CLUSTER_DIR ?= .cluster
KIND ?= kind
KIND_CLUSTER ?= sensorfleet

.PHONY: cluster-build cluster-up cluster-down kind-up kind-down

cluster-build:
	hack/build-k8s.sh
	hack/build-node.sh

cluster-up: install cluster-build
	CLUSTER_DIR=$(CLUSTER_DIR) PYTHONPATH=. $(BIN)/python -m devcluster up

cluster-down:
	CLUSTER_DIR=$(CLUSTER_DIR) PYTHONPATH=. $(BIN)/python -m devcluster down

kind-up:
	mkdir -p $(CLUSTER_DIR)
	$(KIND) create cluster --name $(KIND_CLUSTER) --config hack/kind-config.yaml --kubeconfig $(CLUSTER_DIR)/kubeconfig
	@echo "export KUBECONFIG=$(abspath $(CLUSTER_DIR))/kubeconfig SENSORFLEET_USE_KUBECONFIG=1"

kind-down:
	$(KIND) delete cluster --name $(KIND_CLUSTER) --kubeconfig $(CLUSTER_DIR)/kubeconfig

# --- operator (issue 6) ---
# The CRD is generated from the fleet spec; the chart carries the very same file.
# deploy-local: the chart in the harness cluster + the operator as a local process with the
# chart's ServiceAccount token (docs/operator.md). image/kind-load need Docker.
IMAGE ?= sensorfleet:0.1.0
OPERATOR_CRD := crds/sensorfleets.sensorfleet.io.yaml

.PHONY: crd chart-dashboards image kind-load deploy-local undeploy-local bench-operator

crd: install
	$(BIN)/python -m sensorfleet.operator.crd > $(OPERATOR_CRD)
	cp $(OPERATOR_CRD) charts/sensorfleet/$(OPERATOR_CRD)

chart-dashboards:
	mkdir -p charts/sensorfleet/dashboards
	if ls monitoring/dashboards/*.json >/dev/null 2>&1; then cp monitoring/dashboards/*.json charts/sensorfleet/dashboards/; fi

image:
	docker build -t $(IMAGE) .

kind-load: image
	$(KIND) load docker-image $(IMAGE) --name $(KIND_CLUSTER)

deploy-local: install
	CLUSTER_DIR=$(CLUSTER_DIR) PYTHONPATH=. $(BIN)/python -m devcluster deploy

undeploy-local: install
	CLUSTER_DIR=$(CLUSTER_DIR) PYTHONPATH=. $(BIN)/python -m devcluster undeploy

# --- images and Prometheus with no registry (issue 10) ---
# images: the Dockerfile built with podman from a debootstrap base (BASE_IMAGE), and Mosquitto from
# Debian's package, as OCI archives in ~/.cache/sensorfleet/images named by the hash of their inputs
# (devcluster/images.py); a second run builds nothing. prometheus-build: Prometheus with
# kubernetes_sd_configs from the Go module proxy into ~/.cache/sensorfleet/prometheus-<version>.
.PHONY: images prometheus-build

images: install
	PYTHONPATH=. $(BIN)/python -m devcluster.images

prometheus-build:
	hack/build-prometheus.sh

bench-operator: install
	PYTHONPATH=. $(BIN)/python bench/bench_operator.py

# --- object storage (issue 11) ---
# SeaweedFS (`weed server -s3`, Apache-2.0) on 127.0.0.1, built from the Go module proxy into
# ~/.cache/sensorfleet/seaweedfs-<version>/ the first time. `eval "$(make -s s3-up)"` exports
# AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for `sensorfleet run --data s3://…`.
S3_DIR ?= .s3

s3-build:
	hack/build-seaweedfs.sh

s3-up:
	@hack/s3.sh up $(S3_DIR)

s3-down:
	@hack/s3.sh down $(S3_DIR)
