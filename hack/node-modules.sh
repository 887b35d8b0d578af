#!/usr/bin/env bash
# Install the npm packages of an interop peer (a folder with package.json + package-lock.json) into
# ~/.cache/sensorfleet/npm/<folder>-<hash of its package files>, once; prints that folder's node_modules path.
# Installs Debian's npm first when the machine has Node without it. Shared between worktrees
# and runs: flock'ed, and a finished install is marked so an interrupted one is redone.
set -euo pipefail
peer="${1:?usage: hack/node-modules.sh <folder with package.json and package-lock.json>}"
if ! command -v npm >/dev/null; then
  if [[ $(id -u) != 0 ]]; then
    echo "error: npm is missing; run as root, or: sudo apt-get install -y nodejs npm" >&2
    exit 1
  fi
  echo "installing Debian packages: nodejs npm" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
hash=$(cat "$peer/package.json" "$peer/package-lock.json" | sha256sum | cut -c1-16)
dir="${SENSORFLEET_CACHE:-$HOME/.cache/sensorfleet}/npm/$(basename "$peer")-$hash"
mkdir -p "$dir"
exec 9>"$dir.lock"
flock 9
if [[ ! -e "$dir/.installed" ]]; then
  rm -rf "$dir/node_modules"
  cp "$peer/package.json" "$peer/package-lock.json" "$dir/"
  # --ignore-scripts: the packages need no build step (protobufjs' postinstall only serves its CLI).
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  touch "$dir/.installed"
fi
echo "$dir/node_modules"
