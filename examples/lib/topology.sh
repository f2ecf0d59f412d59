# Network-namespace topologies for the examples (sourced, not run). Root only.
#
#   net_create NET                 a "docker network": a bridge in its own namespace
#   host_create HOST               a "container": a namespace with loopback up
#   net_attach NET HOST IP/LEN     plug HOST into NET with address IP
#   host_names HOST "IP NAME"...   /etc/hosts of HOST (ip netns exec bind-mounts it)
#   inside HOST CMD...             run CMD inside HOST
#   bg HOST LOG CMD...             start CMD inside HOST in the background
#   nginx_in HOST ADDR:PORT TEXT   nginx serving TEXT
#   cloudgateway_nodes HOST=CONF.. fresh keys into conf.yaml templates, one node per HOST
#   topology_cleanup               remove everything (installed as an EXIT trap)
#
# Names carry a per-run prefix, so runs never collide (wireguard-go's
# /var/run/wireguard is shared by all namespaces; our namespaces use none).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $(id -u) -eq 0 ]] || { echo "this example builds network namespaces: run it as root" >&2; exit 1; }
for tool in ip nginx curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool (scripts/test.sh installs it)" >&2; exit 1; }
done

P="mg$$"                    # per-run prefix
WORK="$(mktemp -d)"
chmod 755 "$WORK"           # nginx worker processes must read their files
NAMESPACES=()
PIDS=()
VETH=0

ns() { echo "$P-$1"; }

topology_cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Give meshgate a moment to stop cleanly (it removes its wg sockets).
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for n in "${NAMESPACES[@]}"; do
    for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
    rm -rf "/etc/netns/$n"
  done
  rm -rf "$WORK"
}
trap topology_cleanup EXIT

host_create() {
  local n; n=$(ns "$1")
  ip netns add "$n"
  NAMESPACES+=("$n")
  ip -n "$n" link set lo up
}

net_create() {
  host_create "sw-$1"
  ip -n "$(ns "sw-$1")" link add br0 type bridge
  ip -n "$(ns "sw-$1")" link set br0 up
}

net_attach() { # NET HOST IP/LEN
  local sw host a b
  sw=$(ns "sw-$1"); host=$(ns "$2")
  VETH=$((VETH + 1)); a="v$$x$VETH"; b="eth$VETH"
  ip link add "$a" netns "$sw" type veth peer name "$b" netns "$host"
  ip -n "$sw" link set "$a" master br0 up
  ip -n "$host" addr add "$3" dev "$b"
  ip -n "$host" link set "$b" up
}

host_names() { # HOST "IP NAME"...
  local n dir; n=$(ns "$1"); shift
  dir="/etc/netns/$n"; mkdir -p "$dir"
  { echo "127.0.0.1 localhost"; printf '%s\n' "$@"; } > "$dir/hosts"
}

inside() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }

bg() { # HOST LOG CMD...
  local n log; n=$(ns "$1"); log="$2"; shift 2
  ip netns exec "$n" "$@" >"$log" 2>&1 &
  PIDS+=($!)
}

nginx_in() { # HOST ADDR:PORT TEXT
  local d="$WORK/nginx-$1"
  mkdir -p "$d/www" "$d/tmp"; chmod -R 755 "$d"
  echo "$3" > "$d/www/index.html"; chmod 644 "$d/www/index.html"
  cat > "$d/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $d/tmp; proxy_temp_path $d/tmp; fastcgi_temp_path $d/tmp;
  uwsgi_temp_path $d/tmp; scgi_temp_path $d/tmp;
  server { listen $2; root $d/www; }
}
CONF
  bg "$1" "$d/out.log" nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf"
}

# wait_for HOST URL [SECONDS]: until curl succeeds inside HOST.
wait_for() {
  local end=$((SECONDS + ${3:-10}))
  until inside "$1" curl -sf -o /dev/null --max-time 1 "$2"; do
    ((SECONDS < end)) || { echo "no answer from $2 in $1" >&2; return 1; }
    sleep 0.2
  done
}

# keypair NAME: sets NAME_PRIVATE and NAME_PUBLIC from meshgatectl genkey/pubkey.
keypair() {
  local priv; priv="$("$BIN/meshgatectl" genkey)"
  printf -v "${1}_PRIVATE" '%s' "$priv"
  printf -v "${1}_PUBLIC" '%s' "$(echo "$priv" | "$BIN/meshgatectl" pubkey)"
}

# render TEMPLATE OUT: substitutes ${VAR} from the environment (exported
# variables only; an unset one is an error). Nothing else in the template is
# interpreted.
render() {
  perl -pe 's/\$\{(\w+)\}/defined $ENV{$1} ? $ENV{$1} : die "$ARGV: \${$1} is not set\n"/ge' "$1" > "$2"
}

# cloudgateway_nodes HOST=TEMPLATE...: one Cloud-Gateway node per HOST, its
# conf.yaml rendered from TEMPLATE with fresh keys: ${<HOST>_PUBLIC} and
# ${<HOST>_PRIVATE} for every HOST (upper case, `-` as `_`; e.g.
# ${CLIENT_CLOUDNATIVE_PUBLIC}). Keys are drawn again on the rare VPN-address
# collision. Each config is checked, then meshgate runs on it inside HOST
# until its admin API is ready. Logs: $WORK/HOST.log.
cloudgateway_nodes() {
  local spec host var ok
  for _ in 1 2 3 4 5; do
    for spec in "$@"; do
      var="$(echo "${spec%%=*}" | tr 'a-z-' 'A-Z_')"
      keypair "$var"
      export "${var}_PUBLIC" "${var}_PRIVATE"
    done
    ok=1
    for spec in "$@"; do
      host="${spec%%=*}"
      mkdir -p "$WORK/$host"
      render "${spec#*=}" "$WORK/$host/conf.yaml"
      "$BIN/meshgate" --config-dir "$WORK/$host" --check >/dev/null 2>&1 || ok=0
    done
    ((ok)) && break
  done
  for spec in "$@"; do
    "$BIN/meshgate" --config-dir "$WORK/${spec%%=*}" --check
  done
  for spec in "$@"; do
    host="${spec%%=*}"
    bg "$host" "$WORK/$host.log" env CLOUD_GATEWAY_ENGINE=boringtun CLOUD_GATEWAY_LOG_LEVEL=info \
      "$BIN/meshgate" --config-dir "$WORK/$host"
  done
  for spec in "$@"; do
    host="${spec%%=*}"
    wait_for "$host" http://127.0.0.1:9000/readyz || { cat "$WORK/$host.log" >&2; exit 1; }
  done
}

# show_logs HOST...: every node's log, for a failed demo.
show_logs() {
  local host
  for host in "$@"; do echo "--- $host ---"; cat "$WORK/$host.log"; done >&2
}
