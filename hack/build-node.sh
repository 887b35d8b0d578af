#!/usr/bin/env bash
# Build what the real dev-cluster node (sf-node-0) runs beside the kubelet and kube-proxy that
# hack/build-k8s.sh builds, at the versions pinned in hack/node-versions.env, into
#   ${SENSORFLEET_CACHE:-~/.cache/sensorfleet}/node/bin/
#   - containerd 2.x, its runc v2 shim and ctr        (Go module proxy)
#   - runc 1.3 (cgo + Debian's libseccomp-dev)          (Go module proxy)
#   - CoreDNS, with the plugins the node uses only     (Go module proxy)
#   - local-path-provisioner (the default StorageClass) (Go module proxy)
#   - pause, from the C source in the k8s.io/kubernetes module (gcc, static)
# and the node's own images as Docker archives (podman import of a static binary, no registry):
#   pause.tar (the sandbox image), coredns.tar, busybox.tar (busybox-static, for helper pods).
# The CNI plugins come from Debian (hack/system-packages.txt).
# Each piece has its own stamp (its version); a second run with the same pins does nothing.
#
# usage: hack/build-node.sh            build what is missing or stale
#        hack/build-node.sh --force    rebuild everything
#        hack/build-node.sh --bin-dir  print the bin folder and exit
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=node-versions.env
source "$HACK_DIR/node-versions.env"
# shellcheck source=k8s-versions.env
source "$HACK_DIR/k8s-versions.env"

BUILD_NAME=build-node
# shellcheck source=lib/build.sh
source "$HACK_DIR/lib/build.sh"

OUT="$CACHE_ROOT/node"
BIN="$OUT/bin"
STAMPS="$OUT/stamps"
LOGS="$OUT/logs"
IMAGE_PREFIX="sensorfleet.local"

# piece -> the stamp it must carry (a change in version rebuilds that piece only)
declare -A WANT=(
  [containerd]="containerd=$CONTAINERD_VERSION"
  [runc]="runc=$RUNC_VERSION selinux=$RUNC_SELINUX_VERSION"
  [coredns]="coredns=$COREDNS_VERSION plugins=reload,ready,health,errors,log,cache,kubernetes,loop"
  [local-path-provisioner]="local-path-provisioner=$LOCAL_PATH_PROVISIONER_VERSION"
  [pause]="pause=$K8S_VERSION"
  [images]="images=pause:$K8S_VERSION,coredns:$COREDNS_VERSION,busybox:$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo none)"
)
ORDER=(containerd runc coredns local-path-provisioner pause images)

BIN_PRINT="$BIN"
fresh() { [[ $FORCE == 0 && -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "${WANT[$1]}" ]]; }
stale() { local p; for p in "${ORDER[@]}"; do fresh "$p" || echo "$p"; done; }
is_fresh() { [[ -z "$(stale)" ]]; }

parse_build_args --bin-dir "$@"
exit_if_fresh
mkdir -p "$LOGS" "$STAMPS" "$BIN"
lock_build "$OUT"
require_go "containerd, CoreDNS and local-path-provisioner are"
STAGE_DIR="$OUT/staging-bin"

# containerd, its runc v2 shim and ctr in one go build, from a wrapper module. Static, no cgo:
# the btrfs/devmapper/zfs snapshotters are left out (the node uses overlayfs).
build_containerd() {
  local dir="$OUT/src/containerd" pkg="github.com/containerd/containerd/v2"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init sensorfleet.local/containerd-build
  go mod edit -require="$pkg@$CONTAINERD_VERSION"
  local ldflags="-s -w -X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Package=$pkg"
  go build -mod=mod -trimpath -v -tags "no_btrfs no_devmapper no_zfs urfave_cli_no_docs" \
    -ldflags "$ldflags" -o "$STAGE_DIR/" \
    "$pkg/cmd/containerd" "$pkg/cmd/containerd-shim-runc-v2" "$pkg/cmd/ctr"
}

build_runc() {  # from the module's source: its own go.mod (minus a replace, see node-versions.env)
  local src dir="$OUT/src/runc"
  src="$(go mod download -json "github.com/opencontainers/runc@$RUNC_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
  rm -rf "$dir" && cp -r "$src" "$dir" && chmod -R u+w "$dir" && cd "$dir"
  rm -rf vendor
  go mod edit -dropreplace=github.com/opencontainers/selinux -require="github.com/opencontainers/selinux@$RUNC_SELINUX_VERSION"
  CGO_ENABLED=1 GOFLAGS=-buildvcs=false go build -mod=mod -trimpath -v -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v}" -o "$STAGE_DIR/runc" .
}

# CoreDNS as a library with only the plugins the node's Corefile uses (devcluster/node_config.py):
# the default build compiles every cloud backend (route53, azure, etcd...), several times longer.
# Directive order is the one of CoreDNS's plugin.cfg.
build_coredns() {
  local dir="$OUT/src/coredns"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init sensorfleet.local/coredns-build
  go mod edit -require="github.com/coredns/coredns@$COREDNS_VERSION"
  cat >main.go <<'GO'
// Command coredns is CoreDNS with the plugins of the dev cluster's Corefile only.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func init() {
	dnsserver.Directives = []string{"reload", "ready", "health", "errors", "log", "cache", "kubernetes", "loop"}
}

func main() { coremain.Run() }
GO
  go build -mod=mod -trimpath -v -ldflags "-s -w" -o "$STAGE_DIR/coredns" .
}

build_local-path-provisioner() {
  GOBIN="$STAGE_DIR" go install -trimpath -v -ldflags "-s -w -X main.VERSION=$LOCAL_PATH_PROVISIONER_VERSION" \
    "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION"
}

build_pause() {  # the sandbox container's process: reaps zombies, exits on SIGTERM
  local src
  src="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
  gcc -Os -Wall -static -DVERSION="$K8S_VERSION" -o "$STAGE_DIR/pause" "$src/build/pause/linux/pause.c"
}

# image NAME TAG ENTRYPOINT FILE...: an image holding only FILEs (at /), saved as a Docker archive
image() {
  local name="$1" tag="$2" entrypoint="$3"; shift 3
  local root="$OUT/src/image-$name" ref="$IMAGE_PREFIX/$name:$tag"
  rm -rf "$root" && mkdir -p "$root"
  cp "$@" "$root/"
  tar -C "$root" -c . | podman import --change "ENTRYPOINT $entrypoint" - "$ref"
  rm -f "$STAGE_DIR/$name.tar"
  podman save --format docker-archive -o "$STAGE_DIR/$name.tar" "$ref"
  echo "$ref" >"$STAGE_DIR/$name.ref"
}

build_images() {
  image pause "$K8S_VERSION" '["/pause"]' "$BIN/pause"
  image coredns "$COREDNS_VERSION" '["/coredns"]' "$BIN/coredns"
  # busybox-static: one static binary; /bin/sh and friends are its applet links
  local root="$OUT/src/image-busybox" ref="$IMAGE_PREFIX/busybox:static"
  rm -rf "$root" && mkdir -p "$root/bin" "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  local applet
  for applet in $("$root/bin/busybox" --list); do [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"; done
  tar -C "$root" -c . | podman import --change 'ENTRYPOINT ["/bin/sh"]' - "$ref"
  rm -f "$STAGE_DIR/busybox.tar"
  podman save --format docker-archive -o "$STAGE_DIR/busybox.tar" "$ref"
  echo "$ref" >"$STAGE_DIR/busybox.ref"
}

say "building into $BIN: $(stale | tr '\n' ' ')($(go env GOVERSION), $(nproc) CPUs)"
for piece in "${ORDER[@]}"; do
  fresh "$piece" && continue
  rm -rf "$STAGE_DIR" && mkdir -p "$STAGE_DIR" "$OUT/src"
  if [[ $piece == images ]]; then
    [[ -x /bin/busybox ]] && /bin/busybox --list >/dev/null || { say "error: /bin/busybox (Debian busybox-static) is missing: hack/ensure-system-packages.sh"; exit 1; }
  fi
  run_stage "$piece" "$LOGS/$piece.log" "build_$piece"
  mv -f "$STAGE_DIR"/* "$BIN/"
  rmdir "$STAGE_DIR"
  echo "${WANT[$piece]}" >"$STAMPS/$piece"
done
say "done: $(du -sh "$BIN" | cut -f1) in $BIN"
"$BIN/containerd" --version
"$BIN/runc" --version | head -n1
"$BIN/coredns" -version | head -n1
