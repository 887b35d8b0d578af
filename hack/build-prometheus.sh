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

# Go module versions v0.3XX.Y are Prometheus 3.XX.Y.
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"
CACHE_ROOT="${SENSORFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorfleet}"
OUT="$CACHE_ROOT/prometheus-$PROMETHEUS_VERSION"
BIN="$OUT/bin"
STAMP="$OUT/stamp"
LOG="$OUT/build.log"
# Prometheus' own build tags (plugins/plugin_*.go): `remove_all_sd` drops the cloud discoveries and
# their SDKs (AWS, Azure, GCE, OpenStack, ...), which are most of the compile time; file and http
# discovery are always in (plugins/minimum.go).
PROMETHEUS_TAGS="${PROMETHEUS_TAGS:-remove_all_sd,enable_kubernetes_sd}"
WANT_STAMP="prometheus=$PROMETHEUS_VERSION tags=$PROMETHEUS_TAGS"

force=0
case "${1:-}" in
  --bin-dir) echo "$BIN"; exit 0 ;;
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force|--bin-dir]" >&2; exit 2 ;;
esac

T0=$SECONDS
say() { printf '[build-prometheus %4dm%02ds] %s\n' $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60)) "$*"; }
cache_is_fresh() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$BIN/prometheus" ]]; }

if [[ $force == 0 ]] && cache_is_fresh; then
  say "cache is up to date ($WANT_STAMP): $BIN"
  exit 0
fi
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  say "another build holds $OUT/.lock; waiting for it"
  flock 9
fi
if [[ $force == 0 ]] && cache_is_fresh; then
  say "cache was filled by the other build: $BIN"
  exit 0
fi
if ! command -v go >/dev/null; then
  say "error: no \`go\` on PATH; Prometheus is built from source and needs Go >= 1.21 (it fetches newer itself)"
  exit 1
fi
export CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

# A wrapper module (like etcd in build-k8s.sh): `go install pkg@version` refuses modules with
# replace lines, and a wrapper lets `go build -mod=mod` resolve the dependency graph itself.
dir="$OUT/src"
rm -rf "$dir" "$OUT/staging-bin" && mkdir -p "$dir" "$OUT/staging-bin" && cd "$dir"
say "building $WANT_STAMP into $BIN ($(go env GOVERSION), $(nproc) CPUs; log: $LOG)"
{
  go mod init sensorfleet.local/prometheus-build
  go mod edit -require="github.com/prometheus/prometheus@$PROMETHEUS_VERSION"
  # Without the `builtinassets` tag the binary serves no web UI, which the tests never use; the
  # HTTP API is in.
  ldflags="-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION}"
  ldflags+=" -X github.com/prometheus/common/version.Branch=module-proxy"
  go build -mod=mod -trimpath -v -tags "$PROMETHEUS_TAGS" -ldflags "$ldflags" -o "$OUT/staging-bin/" \
    github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
} >"$LOG" 2>&1 &
pid=$! next_beat=$((SECONDS + 30))
while kill -0 "$pid" 2>/dev/null; do
  sleep 2
  if (( SECONDS >= next_beat )); then
    say "  $(grep -cv '^go: ' "$LOG" || true) packages compiled"
    next_beat=$((SECONDS + 30))
  fi
done
if ! wait "$pid"; then
  say "✗ build failed; last lines of $LOG:"
  tail -n 40 "$LOG" >&2
  exit 1
fi
mkdir -p "$BIN"
mv -f "$OUT/staging-bin/prometheus" "$OUT/staging-bin/promtool" "$BIN/"
rmdir "$OUT/staging-bin"
echo "$WANT_STAMP" >"$STAMP"
say "done: $(du -sh "$BIN" | cut -f1) in $BIN"
"$BIN/prometheus" --version | head -n1
