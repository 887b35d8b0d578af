"""Prometheus finds a fleet's pods through the API server, with the scrape job docs/monitoring.md
tells users to copy (`kubernetes_sd_configs`, role pod, its relabelling), and the dashboard's
fleet panels and the ComponentDown alert work on what it scrapes.

The pods are the operator's own pod templates (the builders' labels, the `metrics` container port)
created in the harness API server on a Node of ours, each with its own loopback address as pod IP;
each pod's process (`sensorfleet simulate|collect` with the pod's args) runs here and listens on
that address. Discovery, relabelling and scraping are therefore Prometheus's real ones; only the
kubelet is replaced, by this test writing the pods' status.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from sensorfleet.operator import broker_builders, builders, child_meta, pod_builders, storage_builders
from sensorfleet.runtime import free_port
from sensorfleet.spec import SensorFleet
from sensorfleet.testing import mosquitto_broker, wait_for_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "monitoring.md"
RULES = ROOT / "monitoring" / "rules.yaml"
DASHBOARD = ROOT / "monitoring" / "dashboards" / "sensorfleet.json"
NAMESPACE = "sf-k8s-sd"
NODE = "sf-sd-node"
FLEET = "sd"
RATE_INTERVAL = "5m"

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def docs_scrape_job() -> dict[str, Any]:
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]
    config = next(b for b in blocks if "kubernetes_sd_configs" in (b.get("scrape_configs") or [{}])[0])
    return config["scrape_configs"][0]


def fast_rules(target: Path) -> Path:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


def make_fleet(metrics_port: int, coap_port: int, opcua_port: int) -> SensorFleet:
    return SensorFleet.model_validate({"metadata": {"name": FLEET, "namespace": NAMESPACE}, "spec": {
        "protocols": {"mqtt": {"devices": 3, "interval": 0.5},
                      "coap": {"enabled": True, "devices": 2, "interval": 0.5, "port": coap_port},
                      "opcua": {"enabled": True, "devices": 2, "interval": 0.5, "port": opcua_port}},
        "broker": {"authentication": False},
        "collector": {"flushInterval": 0.5},
        "forecasting": {"enabled": False},
        "monitoring": {"port": metrics_port},
    }})


class Stack:
    def __init__(self, cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.processes: dict[str, subprocess.Popen] = {}
        self.prometheus_url = ""
        self.ips: dict[str, str] = {}

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/targets?state=active", timeout=10) as response:
            return json.load(response)["data"]["activeTargets"]

    def logs(self) -> str:
        return "\n".join(f"--- {name}: {(self.tmp / f'{name}.log').read_text(errors='replace')[-1500:]}" for name in self.processes)

    def spawn(self, name: str, argv: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _pod_ip(index: int) -> str:
    return f"127.0.0.{10 + index}"


@pytest.fixture(scope="module")
def stack(k8s_cluster, prometheus_with_k8s_sd: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("k8s-sd")
    s = Stack(k8s_cluster, tmp)
    kubectl = k8s_cluster.kubectl
    metrics_port, coap_port, opcua_port = free_port(), free_port(udp=True), free_port()
    fleet = make_fleet(metrics_port, coap_port, opcua_port)
    owner = child_meta.Owner(FLEET, NAMESPACE, "00000000-0000-0000-0000-0000000000sd")
    # the broker here is a local Mosquitto, anonymous (spec.broker.authentication false)
    children = builders.build_children(fleet, owner, child_meta.BuildOptions(), broker_builders.BrokerCredentials("unused", "unused"))
    fleet_file = tmp / "fleet.yaml"
    fleet_file.write_text(next(c for c in children if c["kind"] == "ConfigMap")["data"]["fleet.yaml"])
    # the simulators and collectors (the broker serves no metrics; a local Mosquitto stands in for it)
    deployments = [c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] != child_meta.broker_name(FLEET)]
    ips = {d["metadata"]["name"]: _pod_ip(i) for i, d in enumerate(deployments)}
    with mosquitto_broker(tmp / "broker", persistence=False) as broker:
        try:
            kubectl("create", "namespace", NAMESPACE)
            # pods are admitted once the controller-manager has made the namespace's ServiceAccount
            wait_until(lambda: kubectl("get", "serviceaccount", "default", "--namespace", NAMESPACE, check=False).returncode == 0,
                       timeout=60, interval=0.5, message="the default ServiceAccount")
            # A Node nobody runs: kwok manages only annotated Nodes, and the pods below tolerate its taints.
            kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
            for d in deployments:
                name = d["metadata"]["name"]
                template = d["spec"]["template"]
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": f"{name}-0", "namespace": NAMESPACE, "labels": template["metadata"]["labels"]},
                       "spec": {**template["spec"], "nodeName": NODE, "tolerations": [{"operator": "Exists"}]}}
                kubectl("apply", "-f", "-", input=json.dumps(pod))
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                status = {"status": {"phase": "Running", "podIP": ips[name], "podIPs": [{"ip": ips[name]}], "hostIP": "127.0.0.1",
                                     "startTime": now,
                                     "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}}
                kubectl("patch", "pod", f"{name}-0", "--namespace", NAMESPACE, "--subresource=status", "--type=merge",
                        "--patch", json.dumps(status))
                # the pod's process, with the pod's own args, where a cluster would put it
                args = [a.replace(pod_builders.FLEET_FILE, str(fleet_file)) for a in d["spec"]["template"]["spec"]["containers"][0]["args"]]
                args = [a.replace(f"{child_meta.broker_name(FLEET)}:{broker_builders.MQTT_PORT}", f"127.0.0.1:{broker.port}") for a in args]
                args = [re.sub(rf"{FLEET}-(coap|opcua)-simulator-(\d+):", lambda m: ips[m.group(0)[:-1]] + ":", a) for a in args]
                args = [str(tmp / "data") if a == storage_builders.DATA_DIR else ips[name] if a == "0.0.0.0" else a for a in args]
                s.spawn(name, [sys.executable, "-m", "sensorfleet.cli", *args, "--metrics-host", ips[name]])
            for d in deployments:
                wait_for_port(metrics_port, timeout=120, host=ips[d["metadata"]["name"]])

            job = docs_scrape_job()
            job["kubernetes_sd_configs"][0]["kubeconfig_file"] = str(k8s_cluster.kubeconfig)
            job["kubernetes_sd_configs"][0]["namespaces"] = {"names": [NAMESPACE]}
            config = {"global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
                      "rule_files": [str(fast_rules(tmp / "rules.yaml"))], "scrape_configs": [job]}
            (tmp / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
            port = free_port()
            s.spawn("prometheus", [str(prometheus_with_k8s_sd), f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"])
            s.prometheus_url = f"http://127.0.0.1:{port}"
            wait_for_port(port, timeout=120)

            def ready() -> bool:  # the API answers 503 until the TSDB is open
                try:
                    return urllib.request.urlopen(f"{s.prometheus_url}/-/ready", timeout=5).status == 200
                except OSError:
                    return False

            wait_until(ready, timeout=120, interval=0.5, message="Prometheus ready")
            s.ips = ips
            yield s
        finally:
            s.stop()
            kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
            kubectl("delete", "node", NODE, "--wait=false", check=False)


def test_every_fleet_pod_is_discovered_with_the_labels_the_dashboard_uses(stack: Stack) -> None:
    def all_up() -> bool:
        return len(stack.targets()) == len(stack.ips) and all(t["health"] == "up" for t in stack.targets())

    try:
        wait_until(all_up, timeout=120, interval=2, message="every fleet pod discovered and up")
    except AssertionError:
        raise AssertionError(f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in stack.targets()]}\n{stack.logs()}") from None
    by_pod = {t["labels"]["pod"]: t["labels"] for t in stack.targets()}
    assert set(by_pod) == {f"{name}-0" for name in stack.ips}
    for name, labels in ((n, by_pod[f"{n}-0"]) for n in stack.ips):
        protocol, role = re.match(rf"{FLEET}-(\w+)-(simulator|collector)-\d+", name).groups()
        assert (labels["namespace"], labels["fleet"], labels["component"], labels["protocol"]) == (NAMESPACE, FLEET, f"{protocol}-{role}", protocol)
        assert labels["instance"].startswith(stack.ips[name] + ":")


def _fleet_panel_queries() -> list[tuple[str, str]]:
    model = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in model["panels"] if p["type"] != "row" for t in p["targets"]]
    # the forecast panels come from the forecast exporter, the operator's from its pod: not fleet pods
    return [(title, expr) for title, expr in queries if "forecast" not in expr and "operator" not in expr]


def test_every_fleet_panel_query_returns_data_from_discovered_pods(stack: Stack) -> None:
    queries = _fleet_panel_queries()
    assert len(queries) >= 15
    empty: list[str] = []

    def all_have_data() -> bool:
        empty.clear()
        for title, expr in queries:
            filled = expr.replace("$namespace", NAMESPACE).replace("$fleet", FLEET).replace("$__rate_interval", RATE_INTERVAL)
            if not any(math.isfinite(float(r["value"][1])) for r in stack.query(filled)):
                empty.append(f"{title}: {filled}")
        return not empty

    try:
        wait_until(all_have_data, timeout=150, interval=3, message="every fleet panel to have data")
    except AssertionError:
        raise AssertionError("panels without data:\n" + "\n".join(empty) + "\n" + stack.logs()) from None
    stored = {r["metric"]["protocol"] for r in stack.query(f'sensorfleet_readings_stored_total{{namespace="{NAMESPACE}"}} > 0')}
    assert stored == {"mqtt", "coap", "opcua"}


def test_component_down_fires_for_a_killed_pod_process_with_its_kubernetes_labels(stack: Stack) -> None:
    wait_until(lambda: stack.query(f'up{{namespace="{NAMESPACE}"}} == 1'), timeout=120, message="targets up")
    victim = child_meta.simulator_name(FLEET, "coap", 0)
    process = stack.processes[victim]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)

    def firing() -> list[dict[str, Any]]:
        return stack.query(f'ALERTS{{alertname="SensorFleetComponentDown", alertstate="firing", namespace="{NAMESPACE}"}}')

    wait_until(firing, timeout=90, interval=2, message="SensorFleetComponentDown for the killed simulator")
    alert = firing()[0]["metric"]
    assert (alert["fleet"], alert["pod"], alert["protocol"]) == (FLEET, f"{victim}-0", "coap"), alert
