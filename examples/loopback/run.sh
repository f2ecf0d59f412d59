#!/usr/bin/env bash
# The main demo, on loopback, as any user: no root, no TUN, no capabilities.
#
#   curl -> client pipe 127.0.0.1:18280 -> client wg0 (userspace, 10.192.0.2)
#        -> UDP 127.0.0.1:18765 -> server wg0 (userspace, 10.192.0.1)
#        -> server pipe 10.192.0.1:8080 -> backend 127.0.0.1:18181
#
# Two meshgate processes, fresh keys, a python3 backend; everything stops
# when the script exits.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [[ -z "${MESHGATE_BIN_DIR:-}" ]]; then
  (cd "$root" && cargo build --release --bins -q)
  MESHGATE_BIN_DIR="$root/target/release"
fi
for port in 18280 18181 19001 19002; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use; stop what uses it and retry" >&2
    exit 1
  fi
done

WORK="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Keys: private keys in files only this user can read.
umask 077
"$MESHGATE_BIN_DIR/meshgatectl" genkey > "$WORK/server.key"
"$MESHGATE_BIN_DIR/meshgatectl" genkey > "$WORK/client.key"
SERVER_PUBLIC="$("$MESHGATE_BIN_DIR/meshgatectl" pubkey < "$WORK/server.key")"
CLIENT_PUBLIC="$("$MESHGATE_BIN_DIR/meshgatectl" pubkey < "$WORK/client.key")"
umask 022

# The config directories, with the keys' paths and public keys filled in.
for node in server client; do
  (cd "$here/$node" && find . -type f) | while read -r f; do
    mkdir -p "$WORK/$node/$(dirname "$f")"
    text="$(<"$here/$node/$f")"
    text="${text//\$\{WORK\}/$WORK}"
    text="${text//\$\{SERVER_PUBLIC\}/$SERVER_PUBLIC}"
    text="${text//\$\{CLIENT_PUBLIC\}/$CLIENT_PUBLIC}"
    printf '%s\n' "$text" > "$WORK/$node/$f"
  done
done

mkdir -p "$WORK/www"
echo "hello from the backend, through a userspace WireGuard tunnel" > "$WORK/www/index.html"
python3 -m http.server 18181 --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/backend.log" 2>&1 &
pids+=($!)

"$MESHGATE_BIN_DIR/meshgate" --config-dir "$WORK/server" 2>"$WORK/server.log" &
pids+=($!)
"$MESHGATE_BIN_DIR/meshgate" --config-dir "$WORK/client" 2>"$WORK/client.log" &
pids+=($!)

wait_for() { # URL: up to 10 s
  for _ in $(seq 100); do curl -sf -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "not answering: $1" >&2; cat "$WORK/server.log" "$WORK/client.log" >&2; return 1
}
wait_for http://127.0.0.1:18181/
wait_for http://127.0.0.1:19001/readyz
wait_for http://127.0.0.1:19002/readyz

echo "== curl http://127.0.0.1:18280/ (client pipe -> WireGuard -> server pipe -> backend)"
body="$(curl -sf --max-time 10 http://127.0.0.1:18280/)"
echo "$body"
[[ "$body" == "hello from the backend, through a userspace WireGuard tunnel" ]]

echo "== meshgatectl wg show (client)"
"$MESHGATE_BIN_DIR/meshgatectl" --admin 127.0.0.1:19002 wg show
echo "== running as uid $(id -u)"
echo "demo OK"
