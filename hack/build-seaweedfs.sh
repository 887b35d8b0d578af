#!/usr/bin/env bash
# Build SeaweedFS's `weed` (Apache-2.0; the S3-compatible server the storage tests and `make s3-up`
# use) from the Go module proxy at the version pinned below, into a cache outside the repo:
#   ${SENSORFLEET_CACHE:-~/.cache/sensorfleet}/seaweedfs-<version>/bin/weed
# A stamp file records what was built; a second run with the same pin does nothing. One build at a
# time (a lock), so `make s3-up` and a pytest run may race safely.
#
# usage: hack/build-seaweedfs.sh            build if the cache is missing or stale
#        hack/build-seaweedfs.sh --force    rebuild even if the stamp matches
#        hack/build-seaweedfs.sh --bin      print the path of `weed` and exit
set -euo pipefail

# SeaweedFS tags are not semver, so the proxy serves pseudo-versions only (this one is 2026-11-09).
SEAWEEDFS_VERSION="${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"

CACHE_ROOT="${SENSORFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorfleet}"
OUT="$CACHE_ROOT/seaweedfs-$SEAWEEDFS_VERSION"
BIN="$OUT/bin/weed"
STAMP="$OUT/stamp"
LOG="$OUT/build.log"
WANT_STAMP="seaweedfs=$SEAWEEDFS_VERSION"

force=0
case "${1:-}" in
  --bin) echo "$BIN"; exit 0 ;;
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force|--bin]" >&2; exit 2 ;;
esac

T0=$SECONDS
say() { printf '[build-seaweedfs %4dm%02ds] %s\n' $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60)) "$*" >&2; }
cache_is_fresh() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$BIN" ]]; }

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
command -v go >/dev/null || { say "error: no \`go\` on PATH (SeaweedFS is built from source)"; exit 1; }
go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
if (( go_minor < 26 )); then export GOTOOLCHAIN=go1.27.3; fi
export CGO_ENABLED=0

# seaweedfs' go.mod has a replace line, so `go install …@version` is refused: a wrapper module
# requires it and repeats that replace, then builds its `weed` main package.
dir="$OUT/src"
rm -rf "$dir" && mkdir -p "$dir" "$OUT/bin"
cd "$dir"
{
  go mod init sensorfleet.local/seaweedfs-build
  go mod edit -require="github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION"
  go mod edit -replace=github.com/tyler-smith/go-bip39=github.com/cosmos/go-bip39@v1.0.0
} >"$LOG" 2>&1
say "building weed $SEAWEEDFS_VERSION ($(go env GOVERSION), $(nproc) CPUs; log: $LOG)"
nice -n 10 go build -mod=mod -trimpath -v -ldflags "-s -w" -o "$OUT/bin/weed.partial" \
  github.com/seaweedfs/seaweedfs/weed >>"$LOG" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  sleep 5
  if (( (SECONDS - T0) % 60 < 5 )); then say "  $(grep -cv '^go: ' "$LOG" || true) packages compiled"; fi
done
if ! wait "$pid"; then
  say "✗ build failed; last lines of $LOG:"
  tail -n 40 "$LOG" >&2
  exit 1
fi
mv -f "$OUT/bin/weed.partial" "$BIN"
echo "$WANT_STAMP" >"$STAMP"
say "done in $((SECONDS - T0))s: $BIN"
"$BIN" version >&2
