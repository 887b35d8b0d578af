#!/usr/bin/env bash
# Build Prometheus with the service discoveries SensorFleet documents (kubernetes_sd_configs, which
# Debian's prometheus 2.42 is built without, plus the built-in file and http ones) from the Go module
# proxy, into a cache outside the repo:
#   ${SENSORFLEET_CACHE:-~/.cache/sensorfleet}/prometheus-<PROMETHEUS_VERSION>/bin/prometheus
# Same pattern as hack/build-k8s.sh: a stamp records what was built, a lock lets one build run at a
# time, a second run with the same pin does nothing.
#
# usage: hack/build-prometheus.sh            build if the cache is missing or stale
#        hack/build-prometheus.sh --force    rebuild even if the stamp matches
#        hack/build-prometheus.sh --bin-dir  print the bin folder and exit
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_NAME=build-prometheus
# shellcheck source=lib/build.sh
source "$HACK_DIR/lib/build.sh"

# Go module versions v0.3XX.Y are Prometheus 3.XX.Y.
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"
# Prometheus' own build tags (plugins/plugin_*.go): `remove_all_sd` drops the cloud discoveries and
# their SDKs (AWS, Azure, GCE, OpenStack, ...), which are most of the compile time; file and http
# discovery are always in (plugins/minimum.go).
PROMETHEUS_TAGS="${PROMETHEUS_TAGS:-remove_all_sd,enable_kubernetes_sd}"
OUT="$CACHE_ROOT/prometheus-$PROMETHEUS_VERSION"
BIN="$OUT/bin"
BIN_PRINT="$BIN"
STAMP="$OUT/stamp"
WANT_STAMP="prometheus=$PROMETHEUS_VERSION tags=$PROMETHEUS_TAGS"
is_fresh() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$BIN/prometheus" ]]; }

parse_build_args --bin-dir "$@"
exit_if_fresh
lock_build "$OUT"
require_go "Prometheus is"

# A wrapper module (like etcd in build-k8s.sh): `go install pkg@version` refuses modules with
# replace lines, and a wrapper lets `go build -mod=mod` resolve the dependency graph itself.
build_prometheus() {
  go mod init sensorfleet.local/prometheus-build
  go mod edit -require="github.com/prometheus/prometheus@$PROMETHEUS_VERSION"
  # Without the `builtinassets` tag the binary serves no web UI, which the tests never use; the
  # HTTP API is in.
  local ldflags="-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION}"
  ldflags+=" -X github.com/prometheus/common/version.Branch=module-proxy"
  go build -mod=mod -trimpath -v -tags "$PROMETHEUS_TAGS" -ldflags "$ldflags" -o "$OUT/staging-bin/" \
    github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
}
rm -rf "$OUT/src" "$OUT/staging-bin" && mkdir -p "$OUT/src" "$OUT/staging-bin" && cd "$OUT/src"
say "building $WANT_STAMP into $BIN ($(go env GOVERSION), $(nproc) CPUs)"
run_stage prometheus "$OUT/build.log" build_prometheus
mkdir -p "$BIN"
mv -f "$OUT/staging-bin/prometheus" "$OUT/staging-bin/promtool" "$BIN/"
rmdir "$OUT/staging-bin"
echo "$WANT_STAMP" >"$STAMP"
say "done: $(du -sh "$BIN" | cut -f1) in $BIN"
"$BIN/prometheus" --version | head -n1
