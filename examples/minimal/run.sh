#!/usr/bin/env bash
# Cloud-Gateway's minimal demo, with network namespaces instead of docker compose:
#
#   legacy network:       nginx, server
#   cloudnative network:  server, client
#
# The client's pipe (port 8080) reaches nginx through the WireGuard tunnel to
# the server. Both nodes run meshgate on the seed's conf.yaml files (keys
# filled in): the same pipe, `remote: nginx:80` included, on both.
# Needs root (namespaces); everything is removed when it exits.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib/topology.sh"
BIN="$(meshgate_bin)"

net_create legacy
net_create cloudnative
host_create nginx
host_create server
host_create client
net_attach legacy nginx 172.28.1.10/24
net_attach legacy server 172.28.1.2/24
net_attach cloudnative server 172.28.2.2/24
net_attach cloudnative client 172.28.2.3/24
host_names server "172.28.1.10 nginx"
host_names client "172.28.2.2 server"
nginx_in nginx 0.0.0.0:80 "Welcome to nginx in the legacy network"

cloudgateway_nodes server="$here/server/conf.yaml" client="$here/client/conf.yaml"

echo "== client: curl http://localhost:8080/"
body="$(inside client curl -sf --max-time 10 --retry 5 --retry-all-errors --retry-delay 1 http://localhost:8080/)" \
  || { show_logs server client; exit 1; }
echo "$body"
[[ "$body" == "Welcome to nginx in the legacy network" ]]

echo "== client: meshgatectl wg show"
inside client "$BIN/meshgatectl" wg show
echo "demo OK"
