#!/usr/bin/env bash
# A local S3-compatible object store for users and tests: SeaweedFS (`weed server -s3`, Apache-2.0)
# on 127.0.0.1 with free ports, one generated access key, state in one folder.
#
# usage: hack/s3.sh up [DIR]     start it (building `weed` first when missing) and print
#                                `export AWS_ENDPOINT_URL=… AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…`
#                                (so `eval "$(make -s s3-up)"` configures the shell); again: the same lines
#        hack/s3.sh down [DIR]   stop it (the data stays in DIR/data until DIR is removed)
#        hack/s3.sh env [DIR]    print the export lines of the running server
# DIR defaults to .s3 in the current folder. Progress goes to stderr, only the exports to stdout.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd="${1:-}"
DIR="$(mkdir -p "${2:-.s3}" && cd "${2:-.s3}" && pwd)"
say() { echo "[s3] $*" >&2; }

running() { [[ -f "$DIR/pid" ]] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; }

print_env() {
  # shellcheck source=/dev/null
  source "$DIR/env"
  echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=us-east-1"
}

# S3 answers a signed ListBuckets with 200 once the filer behind it is up.
s3_ready() {
  # shellcheck source=/dev/null
  source "$DIR/env"
  [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --aws-sigv4 "aws:amz:us-east-1:s3" \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$AWS_ENDPOINT_URL/")" == 200 ]]
}

free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
# SeaweedFS derives nothing from these when every gRPC port is given explicitly.
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

up() {
  if running && s3_ready; then print_env; return; fi
  local weed; weed="$("$HACK_DIR/build-seaweedfs.sh" --bin)"
  [[ -x "$weed" ]] || "$HACK_DIR/build-seaweedfs.sh" >&2
  mkdir -p "$DIR/data"
  if [[ ! -f "$DIR/identity.json" ]]; then
    local key secret
    key="sf$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    secret="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    umask 077
    cat >"$DIR/identity.json" <<JSON
{"identities": [{"name": "sensorfleet", "credentials": [{"accessKey": "$key", "secretKey": "$secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
    printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$key" "$secret" >"$DIR/credentials"
  fi
  local master master_grpc volume volume_grpc filer filer_grpc s3 s3_grpc
  # The same ports after a restart (clients keep their endpoint); new ones for a new DIR.
  [[ -f "$DIR/ports" ]] || free_ports 8 >"$DIR/ports"
  read -r master master_grpc volume volume_grpc filer filer_grpc s3 s3_grpc <"$DIR/ports"
  { cat "$DIR/credentials"; echo "AWS_ENDPOINT_URL=http://127.0.0.1:$s3"; } >"$DIR/env"
  say "starting SeaweedFS S3 on 127.0.0.1:$s3 (data: $DIR/data, log: $DIR/weed.log)"
  # Every port explicit (no fixed defaults), nothing leaves the machine (telemetry off), no extra
  # catalog endpoints; small volumes so a test machine's disk is not pre-claimed.
  setsid "$weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$DIR/data" \
    -master.port="$master" -master.port.grpc="$master_grpc" -master.telemetry=false \
    -master.volumeSizeLimitMB=64 -volume.max=0 \
    -volume.port="$volume" -volume.port.grpc="$volume_grpc" \
    -filer -filer.port="$filer" -filer.port.grpc="$filer_grpc" -filer.localSocket="$DIR/filer.sock" \
    -s3 -s3.port="$s3" -s3.port.grpc="$s3_grpc" -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.localSocket="$DIR/s3.sock" -s3.config="$DIR/identity.json" \
    </dev/null >>"$DIR/weed.log" 2>&1 &
  echo $! >"$DIR/pid"
  local deadline=$((SECONDS + ${S3_START_TIMEOUT:-120}))
  until s3_ready; do
    if ! running; then say "weed exited; last lines of $DIR/weed.log:"; tail -n 30 "$DIR/weed.log" >&2; exit 1; fi
    if (( SECONDS > deadline )); then say "S3 not ready after ${S3_START_TIMEOUT:-120}s; see $DIR/weed.log"; down; exit 1; fi
    sleep 0.5
  done
  say "ready"
  print_env
}

down() {
  if running; then
    local pid; pid="$(cat "$DIR/pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    say "stopped (pid $pid)"
  fi
  rm -f "$DIR/pid"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  env) running || { say "not running (hack/s3.sh up $DIR)"; exit 1; }; print_env ;;
  *) echo "usage: $0 up|down|env [DIR]" >&2; exit 2 ;;
esac
