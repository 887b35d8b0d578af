# Scaffolding shared by hack/build-*.sh (sourced, not run): every build fills a folder of the cache
# outside the repo, records what it holds in a stamp, lets one build run at a time per folder
# (`make cluster-build` and a pytest session may race), and shows progress while Go compiles.
#
# The sourcing script sets BUILD_NAME (the progress prefix) and then calls, in this order:
#   parse_build_args "$@"        → sets FORCE (0/1); --bin-dir/--bin print BIN_PRINT and exit
#   is_fresh                     → the script's own function: 0 when the cache holds what it wants
#   exit_if_fresh                → exits 0 when nothing is to be done (checked again under the lock)
#   lock_build DIR               → waits for any other build of DIR, then re-checks freshness
#   require_go WHAT              → fails clearly without Go; falls back to a newer Go when ours is old
#   run_stage NAME LOG CMD...    → runs CMD with its output in LOG and a heartbeat every 30 s
# shellcheck shell=bash

CACHE_ROOT="${SENSORFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorfleet}"
T0=$SECONDS
FORCE=0

# Progress goes to stderr: stdout stays free for the paths scripts print (--bin-dir, --bin).
say() { printf '[%s %4dm%02ds] %s\n' "$BUILD_NAME" $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60)) "$*" >&2; }

# parse_build_args PRINT_FLAG "$@": PRINT_FLAG (--bin-dir or --bin) prints $BIN_PRINT and exits.
parse_build_args() {
  local print_flag="$1"; shift
  case "${1:-}" in
    "$print_flag") echo "$BIN_PRINT"; exit 0 ;;
    --force) FORCE=1 ;;
    "") ;;
    *) echo "usage: $0 [--force|$print_flag]" >&2; exit 2 ;;
  esac
}

exit_if_fresh() {
  if [[ $FORCE == 0 ]] && is_fresh; then
    say "cache is up to date: ${1:-$BIN_PRINT}"
    exit 0
  fi
}

# lock_build DIR: fd 9 holds DIR/.lock until the script exits.
lock_build() {
  mkdir -p "$1"
  exec 9>"$1/.lock"
  if ! flock -n 9; then
    say "another build holds $1/.lock; waiting for it"
    flock 9
  fi
  if [[ $FORCE == 0 ]] && is_fresh; then
    say "cache was filled by the other build: $BIN_PRINT"
    exit 0
  fi
}

# require_go WHAT: every pinned module declares `go 1.26`; an older local Go downloads 1.27.3
# through the module proxy (GOTOOLCHAIN) instead of failing. CGO stays off unless a stage asks.
require_go() {
  if ! command -v go >/dev/null; then
    say "error: no \`go\` on PATH; $1 built from source (Go >= 1.21 needed; it fetches newer itself)"
    exit 1
  fi
  local go_minor
  go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
  if (( go_minor < 26 )); then
    export GOTOOLCHAIN=go1.27.3
    say "local Go is $(go env GOVERSION); using GOTOOLCHAIN=$GOTOOLCHAIN"
  fi
  export CGO_ENABLED=0
}

# run_stage NAME LOG CMD...: CMD's output goes to LOG; every 30 s a heartbeat counts the packages
# compiled so far (go -v prints one line a package); on failure the log's tail and exit 1.
run_stage() {
  local name="$1" log="$2"; shift 2
  local start=$SECONDS
  say "▶ $name (log: $log)"
  "$@" >"$log" 2>&1 &
  local pid=$! next_beat=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    if (( SECONDS >= next_beat )); then
      say "  $name: $(grep -cv '^go: ' "$log" || true) packages compiled, $((SECONDS - start))s in stage"
      next_beat=$((SECONDS + 30))
    fi
  done
  if ! wait "$pid"; then
    say "✗ $name failed after $((SECONDS - start))s; last lines of $log:"
    tail -n 40 "$log" >&2
    exit 1
  fi
  say "✓ $name done in $((SECONDS - start))s"
}
