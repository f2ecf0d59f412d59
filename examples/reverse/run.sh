#!/usr/bin/env bash
# Cloud-Gateway's reverse demo, with network namespaces instead of docker compose:
#
#   legacy network:       client-legacy, server
#   cloudnative network:  server, client-cloudnative, nginx
#
# client-legacy's pipe (port 8080) goes to the server, the server's to
# client-cloudnative (the pipe's `peer`), whose pipe reaches nginx. Three
# hops, each node on the seed's own conf.yaml (keys filled in):
#   client-legacy -> (tunnel) server -> (tunnel) client-cloudnative -> nginx:80
# Needs root (namespaces); everything is removed when it exits.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib/topology.sh"
BIN="$(meshgate_bin)"

net_create legacy
net_create cloudnative
host_create client-legacy
host_create server
host_create client-cloudnative
host_create nginx
net_attach legacy client-legacy 172.29.1.10/24
net_attach legacy server 172.29.1.2/24
net_attach cloudnative server 172.29.2.2/24
net_attach cloudnative client-cloudnative 172.29.2.3/24
net_attach cloudnative nginx 172.29.2.10/24
host_names client-legacy "172.29.1.2 server"
host_names client-cloudnative "172.29.2.2 server" "172.29.2.10 nginx"
nginx_in nginx 0.0.0.0:80 "Welcome to nginx in the cloudnative network"

cloudgateway_nodes server="$here/server/conf.yaml" \
  client-cloudnative="$here/client/cloudnative/conf.yaml" \
  client-legacy="$here/client/legacy/conf.yaml"

echo "== client-legacy: curl http://localhost:8080/"
body="$(inside client-legacy curl -sf --max-time 10 --retry 5 --retry-all-errors --retry-delay 1 http://localhost:8080/)" \
  || { show_logs server client-cloudnative client-legacy; exit 1; }
echo "$body"
[[ "$body" == "Welcome to nginx in the cloudnative network" ]]
echo "demo OK"
