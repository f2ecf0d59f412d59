#!/usr/bin/env bash
# The main demo, on loopback, no root needed:
#   a backend (python3 http.server on 127.0.0.1:18081),
#   meshgate with one pipe 127.0.0.1:18080 -> 127.0.0.1:18081,
#   curl through the pipe, then meshgatectl status and a look at the metrics.
# Everything it starts is stopped when it exits.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [[ -z "${MESHGATE_BIN_DIR:-}" ]]; then
  (cd "$root" && cargo build --release --bins -q)
  MESHGATE_BIN_DIR="$root/target/release"
fi
for port in 18080 18081 19000; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use; stop what uses it and retry" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/www"
echo "hello from the backend, through meshgate" > "$work/www/index.html"
python3 -m http.server 18081 --bind 127.0.0.1 --directory "$work/www" >"$work/backend.log" 2>&1 &
pids+=($!)

wait_for() { # URL: up to 5 s
  for _ in $(seq 50); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "not answering: $1" >&2; return 1
}
wait_for http://127.0.0.1:18081/

"$MESHGATE_BIN_DIR/meshgate" --config-dir "$here/config" --check
"$MESHGATE_BIN_DIR/meshgate" --config-dir "$here/config" 2>"$work/meshgate.log" &
pids+=($!)

wait_for http://127.0.0.1:19000/readyz || { cat "$work/meshgate.log" >&2; exit 1; }

echo "== curl http://127.0.0.1:18080/ (through the pipe)"
body="$(curl -sf http://127.0.0.1:18080/)"
echo "$body"
[[ "$body" == "hello from the backend, through meshgate" ]]

echo "== meshgatectl status"
"$MESHGATE_BIN_DIR/meshgatectl" --admin 127.0.0.1:19000 status

echo "== metrics"
curl -sf http://127.0.0.1:19000/metrics | grep -E '^meshgate_(connections_total|bytes_total)'
echo "demo OK"
