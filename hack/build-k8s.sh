#!/usr/bin/env bash
# Build the local Kubernetes control plane (issue 5) from the Go module proxy:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kwok, helm
# at the versions pinned in hack/k8s-versions.env, into a cache outside the repo:
#   ${SENSORFLEET_CACHE:-~/.cache/sensorfleet}/k8s-<K8S_VERSION>/bin/
# A stamp file records what was built; a second run with the same pins does nothing.
#
# usage: hack/build-k8s.sh            build if the cache is missing or stale
#        hack/build-k8s.sh --force    rebuild even if the stamp matches
#        hack/build-k8s.sh --bin-dir  print the bin folder and exit
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=k8s-versions.env
source "$HACK_DIR/k8s-versions.env"

BUILD_NAME=build-k8s
# shellcheck source=lib/build.sh
source "$HACK_DIR/lib/build.sh"

OUT="$CACHE_ROOT/k8s-$K8S_VERSION"
BIN="$OUT/bin"
BIN_PRINT="$BIN"
STAMP="$OUT/stamp"
LOGS="$OUT/logs"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kwok helm)
WANT_STAMP="k8s=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION binaries=${BINARIES[*]}"

is_fresh() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

parse_build_args --bin-dir "$@"
exit_if_fresh
mkdir -p "$LOGS"
lock_build "$OUT"
require_go "the binaries are"

STAGE_DIR="$OUT/staging-bin"
rm -rf "$STAGE_DIR"
mkdir -p "$STAGE_DIR" "$OUT/src"

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy: one wrapper
# module, one go build (the real node's kubelet and kube-proxy share most packages) ---
build_kube() {
  local dir="$OUT/src/kube" info gomod staging_version commit=""
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init sensorfleet.local/k8s-build
  go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
  # k8s.io/kubernetes replaces each staging module with ./staging/src/k8s.io/<name> and requires
  # it at v0.0.0; point each one at its published v0.<minor>.<patch> instead. The list comes from
  # k8s.io/kubernetes' own go.mod so a new staging module needs no edit here.
  info="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION")"
  gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p' <<<"$info")"
  staging_version="v0.${K8S_VERSION#v1.}"
  local modules=() m
  mapfile -t modules < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "$gomod")
  if (( ${#modules[@]} < 20 )); then
    echo "found only ${#modules[@]} staging replaces in $gomod; has k8s.io/kubernetes changed layout?" >&2
    return 1
  fi
  echo "replacing ${#modules[@]} staging modules with $staging_version"
  for m in "${modules[@]}"; do go mod edit -replace="$m=$m@$staging_version"; done
  # The commit is in the proxy's .info (Origin.Hash) when the proxy recorded it.
  local info_file
  info_file="$(sed -n 's/^[[:space:]]*"Info": "\(.*\)",*$/\1/p' <<<"$info")"
  commit="$(sed -n 's/.*"Hash": *"\([0-9a-f]\{40\}\)".*/\1/p' "$info_file" | head -n1)"
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    [[ -n "$commit" ]] && ldflags+=" -X $pkg.gitCommit=$commit"
  done
  go build -mod=mod -trimpath -v -ldflags "$ldflags" -o "$STAGE_DIR/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy
}

# --- etcd: `go install` refuses the server module (it has replace lines), so a tiny main ---
build_etcd() {
  local dir="$OUT/src/etcd"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init sensorfleet.local/etcd-build
  go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  cat >main.go <<'GO'
// Command etcd is the upstream etcd server, built from the pinned go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go build -mod=mod -trimpath -v -ldflags "-s -w" -o "$STAGE_DIR/etcd" .
}

build_kwok() {
  GOBIN="$STAGE_DIR" go install -trimpath -v \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

build_helm() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  # Without these helm v3 assumes Kubernetes 1.20 for offline `helm template`/lint.
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
  GOBIN="$STAGE_DIR" go install -trimpath -v -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

say "building $WANT_STAMP into $BIN ($(go env GOVERSION), $(nproc) CPUs)"
run_stage kube "$LOGS/kube.log" build_kube
run_stage etcd "$LOGS/etcd.log" build_etcd
run_stage kwok "$LOGS/kwok.log" build_kwok
run_stage helm "$LOGS/helm.log" build_helm

mkdir -p "$BIN"
for b in "${BINARIES[@]}"; do mv -f "$STAGE_DIR/$b" "$BIN/$b"; done
rmdir "$STAGE_DIR"
echo "$WANT_STAMP" >"$STAMP"
say "done: $(du -sh "$BIN" | cut -f1) in $BIN"
"$BIN/kube-apiserver" --version
"$BIN/etcd" --version | head -n1
"$BIN/kwok" --version 2>&1 | head -n1 || true
"$BIN/helm" version --short
