#!/usr/bin/env bash
# The main demo, on loopback, as any user: no root, no TUN, no capabilities.
#
#   curl -> client pipe 127.0.0.1:18280 -> client wg0 (userspace, 10.192.0.2)
#        -> UDP 127.0.0.1:18765 -> server wg0 (userspace, 10.192.0.1)
#        -> server pipe 10.192.0.1:8080 -> backend 127.0.0.1:18181
#
# Two meshgate processes, fresh keys, a python3 backend; everything stops
# when the script exits.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib/loopback.sh"
require_free_ports 18280 18181 19001 19002

# Keys: private keys in files only this user can read.
umask 077
"$BIN/meshgatectl" genkey > "$WORK/server.key"
"$BIN/meshgatectl" genkey > "$WORK/client.key"
SERVER_PUBLIC="$("$BIN/meshgatectl" pubkey < "$WORK/server.key")"
CLIENT_PUBLIC="$("$BIN/meshgatectl" pubkey < "$WORK/client.key")"
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
start "$WORK/backend.log" python3 -m http.server 18181 --bind 127.0.0.1 --directory "$WORK/www"
start "$WORK/server.log" "$BIN/meshgate" --config-dir "$WORK/server"
start "$WORK/client.log" "$BIN/meshgate" --config-dir "$WORK/client"
wait_for http://127.0.0.1:18181/ "$WORK/backend.log"
wait_for http://127.0.0.1:19001/readyz "$WORK/server.log"
wait_for http://127.0.0.1:19002/readyz "$WORK/client.log"

echo "== curl http://127.0.0.1:18280/ (client pipe -> WireGuard -> server pipe -> backend)"
body="$(curl -sf --max-time 10 http://127.0.0.1:18280/)"
echo "$body"
[[ "$body" == "hello from the backend, through a userspace WireGuard tunnel" ]]

echo "== meshgatectl wg show (client)"
"$BIN/meshgatectl" --admin 127.0.0.1:19002 wg show
echo "== running as uid $(id -u)"
echo "demo OK"
