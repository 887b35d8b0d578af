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

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_NAME=build-seaweedfs
# shellcheck source=lib/build.sh
source "$HACK_DIR/lib/build.sh"

# SeaweedFS tags are not semver, so the proxy serves pseudo-versions only (this one is 2026-11-09).
SEAWEEDFS_VERSION="${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
OUT="$CACHE_ROOT/seaweedfs-$SEAWEEDFS_VERSION"
BIN="$OUT/bin/weed"
BIN_PRINT="$BIN"
STAMP="$OUT/stamp"
WANT_STAMP="seaweedfs=$SEAWEEDFS_VERSION"
is_fresh() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$BIN" ]]; }

parse_build_args --bin "$@"
exit_if_fresh
lock_build "$OUT"
require_go "SeaweedFS is"

# seaweedfs' go.mod has a replace line, so `go install …@version` is refused: a wrapper module
# requires it and repeats that replace, then builds its `weed` main package.
build_weed() {
  go mod init sensorfleet.local/seaweedfs-build
  go mod edit -require="github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION"
  go mod edit -replace=github.com/tyler-smith/go-bip39=github.com/cosmos/go-bip39@v1.0.0
  nice -n 10 go build -mod=mod -trimpath -v -ldflags "-s -w" -o "$OUT/bin/weed.partial" \
    github.com/seaweedfs/seaweedfs/weed
}
rm -rf "$OUT/src" && mkdir -p "$OUT/src" "$OUT/bin" && cd "$OUT/src"
say "building weed $SEAWEEDFS_VERSION ($(go env GOVERSION), $(nproc) CPUs)"
run_stage weed "$OUT/build.log" build_weed
mv -f "$OUT/bin/weed.partial" "$BIN"
echo "$WANT_STAMP" >"$STAMP"
say "done in $((SECONDS - T0))s: $BIN"
"$BIN" version >&2
