#!/usr/bin/env bash
# A pipe on loopback, no root needed:
#   a backend (python3 http.server on 127.0.0.1:18081),
#   meshgate with one pipe 127.0.0.1:18080 -> 127.0.0.1:18081,
#   curl through the pipe, then meshgatectl status and a look at the metrics.
# Everything it starts is stopped when it exits.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib/loopback.sh"
require_free_ports 18080 18081 19000

mkdir -p "$WORK/www"
echo "hello from the backend, through meshgate" > "$WORK/www/index.html"
start "$WORK/backend.log" python3 -m http.server 18081 --bind 127.0.0.1 --directory "$WORK/www"
wait_for http://127.0.0.1:18081/ "$WORK/backend.log"

"$BIN/meshgate" --config-dir "$here/config" --check
start "$WORK/meshgate.log" "$BIN/meshgate" --config-dir "$here/config"
wait_for http://127.0.0.1:19000/readyz "$WORK/meshgate.log"

echo "== curl http://127.0.0.1:18080/ (through the pipe)"
body="$(curl -sf http://127.0.0.1:18080/)"
echo "$body"
[[ "$body" == "hello from the backend, through meshgate" ]]

echo "== meshgatectl status"
"$BIN/meshgatectl" --admin 127.0.0.1:19000 status

echo "== metrics"
curl -sf http://127.0.0.1:19000/metrics | grep -E '^meshgate_(connections_total|bytes_total)'
echo "demo OK"
