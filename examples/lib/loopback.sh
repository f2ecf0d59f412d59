# Loopback examples (sourced, not run): no root, everything on 127.0.0.1.
#
#   require_free_ports PORT...   stop early if a port is taken
#   start LOG CMD...             run CMD in the background (stopped at exit)
#   wait_for URL [LOG...]        until curl succeeds (10 s), else print LOGs and fail
#
# Sets BIN (meshgate's directory) and WORK (a temp dir removed at exit).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BIN="$(meshgate_bin)"
WORK="$(mktemp -d)"
PIDS=()
loopback_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap loopback_cleanup EXIT

require_free_ports() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port on 127.0.0.1 is in use; stop what uses it and retry" >&2
      exit 1
    fi
  done
}

start() { # LOG CMD...
  local log="$1"; shift
  "$@" >"$log" 2>&1 &
  PIDS+=($!)
}

wait_for() { # URL [LOG...]
  local url="$1"; shift
  for _ in $(seq 100); do curl -sf -o /dev/null "$url" 2>/dev/null && return 0; sleep 0.1; done
  echo "not answering: $url" >&2
  (($#)) && cat "$@" >&2
  return 1
}
