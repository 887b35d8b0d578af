#!/usr/bin/env bash
# Install the Debian packages in hack/system-packages.txt that are missing (apt, as root).
# A no-op when all are there, so `make test` can call it every time.
set -euo pipefail
list="$(dirname "${BASH_SOURCE[0]}")/system-packages.txt"
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if (( ${#missing[@]} == 0 )); then
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
if [[ $(id -u) != 0 ]]; then
  echo "error: not root; run as root, or: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
