#!/usr/bin/env bash
# Cloud-Gateway's reverse demo, with network namespaces instead of docker compose:
#
#   legacy network:       app, server
#   cloudnative network:  server, client-cloudnative, nginx
#
# An app in the legacy network asks the server (port 8080); the server's pipe
# has no remote of its own but names the peer client-cloudnative, whose pipe
# reaches nginx. Three hops: app -> server -> (tunnel) client-cloudnative -> nginx.
# Needs root (namespaces); everything is removed when it exits.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib/topology.sh"
BIN="$(meshgate_bin)"

net_create legacy
net_create cloudnative
host_create app
host_create server
host_create client
host_create nginx
net_attach legacy app 172.29.1.10/24
net_attach legacy server 172.29.1.2/24
net_attach cloudnative server 172.29.2.2/24
net_attach cloudnative client 172.29.2.3/24
net_attach cloudnative nginx 172.29.2.10/24
host_names app "172.29.1.2 server"
host_names client "172.29.2.2 server" "172.29.2.10 nginx"
nginx_in nginx 0.0.0.0:80 "Welcome to nginx in the cloudnative network"

for _ in 1 2 3 4 5; do
  keypair SERVER; keypair CLIENT
  export SERVER_PUBLIC SERVER_PRIVATE CLIENT_PUBLIC CLIENT_PRIVATE
  mkdir -p "$WORK/server" "$WORK/client"
  render "$here/server/conf.yaml" "$WORK/server/conf.yaml"
  render "$here/client-cloudnative/conf.yaml" "$WORK/client/conf.yaml"
  "$BIN/meshgate" --config-dir "$WORK/server" --check >/dev/null 2>&1 && break
done
"$BIN/meshgate" --config-dir "$WORK/server" --check
"$BIN/meshgate" --config-dir "$WORK/client" --check

bg server "$WORK/server.log" env CLOUD_GATEWAY_LOG_LEVEL=info "$BIN/meshgate" --config-dir "$WORK/server"
bg client "$WORK/client.log" env CLOUD_GATEWAY_LOG_LEVEL=info "$BIN/meshgate" --config-dir "$WORK/client"
wait_for server http://127.0.0.1:9000/readyz || { cat "$WORK/server.log" >&2; exit 1; }
wait_for client http://127.0.0.1:9000/readyz || { cat "$WORK/client.log" >&2; exit 1; }

echo "== app: curl http://server:8080/"
body="$(inside app curl -sf --max-time 10 --retry 5 --retry-all-errors --retry-delay 1 http://server:8080/)" \
  || { cat "$WORK/server.log" "$WORK/client.log" >&2; exit 1; }
echo "$body"
[[ "$body" == "Welcome to nginx in the cloudnative network" ]]
echo "demo OK"
