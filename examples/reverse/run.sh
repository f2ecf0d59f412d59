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

cloudgateway_pair "$here/server/conf.yaml" "$here/client-cloudnative/conf.yaml"

echo "== app: curl http://server:8080/"
body="$(inside app curl -sf --max-time 10 --retry 5 --retry-all-errors --retry-delay 1 http://server:8080/)" \
  || { cat "$WORK/server.log" "$WORK/client.log" >&2; exit 1; }
echo "$body"
[[ "$body" == "Welcome to nginx in the cloudnative network" ]]
echo "demo OK"
