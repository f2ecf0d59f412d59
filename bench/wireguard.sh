#!/usr/bin/env bash
# WireGuard benchmark in network namespaces (root). In one run, on one veth
# between two namespaces (A = client side, B = server side):
#
#   veth        iperf3 A -> B over the plain veth (the ceiling)
#   wireguard-go  iperf3 A -> B through wireguard-go interfaces on that veth
#   meshgate    iperf3 A -> client pipe -> meshgate WireGuard (userspace) ->
#               server pipe -> iperf3 server in B
#
# plus ping RTT (wireguard-go to wireguard-go, and wireguard-go to meshgate's
# userspace stack) and the time to the first byte of an HTTP response from
# nginx in B (veth, wireguard-go, meshgate pipes; a new TCP connection each).
#
#   bench/wireguard.sh                             # builds release binaries
#   MESHGATE_BIN_DIR=target/release bench/wireguard.sh
#
# Knobs: BENCH_DURATION (seconds per iperf3 run, default 10),
# BENCH_KEEP=1 (keep logs). Target (issue): meshgate >= 2x wireguard-go.
set -euo pipefail

DURATION=${BENCH_DURATION:-10}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf 'bench/wireguard.sh: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
for t in ip iperf3 wireguard-go wg ping curl nginx python3; do
  command -v "$t" >/dev/null || die "'$t' not found: scripts/test.sh installs everything"
done

if [[ -z ${MESHGATE_BIN_DIR:-} ]]; then
  say "building release binaries"
  (cd "$ROOT" && cargo build --release --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN_DIR=$ROOT/target/release
fi
MESHGATE_BIN_DIR=$(cd "$MESHGATE_BIN_DIR" && pwd)

P="mgb$$"
A="$P-a"; B="$P-b"
TMP=$(mktemp -d); chmod 755 "$TMP"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in "$A" "$B"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
inA() { ip netns exec "$A" "$@"; }
inB() { ip netns exec "$B" "$@"; }
bgB() { local log=$1; shift; ip netns exec "$B" "$@" >"$log" 2>&1 & PIDS+=($!); }
bgA() { local log=$1; shift; ip netns exec "$A" "$@" >"$log" 2>&1 & PIDS+=($!); }

# ---------------------------------------------------------------- topology --
ip netns add "$A"; ip netns add "$B"
inA ip link set lo up; inB ip link set lo up
ip link add "${P}x" netns "$A" type veth peer name "${P}y" netns "$B"
inA ip addr add 10.233.0.1/24 dev "${P}x"; inA ip link set "${P}x" up
inB ip addr add 10.233.0.2/24 dev "${P}y"; inB ip link set "${P}y" up

# wireguard-go on both sides (unique interface names: /var/run/wireguard is shared).
WGA="${P}ga"; WGB="${P}gb"
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
inA wireguard-go "$WGA" >/dev/null 2>&1; inB wireguard-go "$WGB" >/dev/null 2>&1
umask 077
"$MESHGATE_BIN_DIR/meshgatectl" genkey > "$TMP/ga.key"; "$MESHGATE_BIN_DIR/meshgatectl" genkey > "$TMP/gb.key"
"$MESHGATE_BIN_DIR/meshgatectl" genkey > "$TMP/ms.key"; "$MESHGATE_BIN_DIR/meshgatectl" genkey > "$TMP/mc.key"
umask 022
pub() { "$MESHGATE_BIN_DIR/meshgatectl" pubkey < "$TMP/$1.key"; }
inA wg set "$WGA" private-key "$TMP/ga.key" listen-port 51001 peer "$(pub gb)" endpoint 10.233.0.2:51002 allowed-ips 10.200.0.2/32
inB wg set "$WGB" private-key "$TMP/gb.key" listen-port 51002 peer "$(pub ga)" endpoint 10.233.0.1:51001 allowed-ips 10.200.0.1/32
inA ip addr add 10.200.0.1/24 dev "$WGA"; inA ip link set "$WGA" up
inB ip addr add 10.200.0.2/24 dev "$WGB"; inB ip link set "$WGB" up

# meshgate: a server in B (its stack holds 10.192.0.1) and a client in A.
mkdir -p "$TMP/ms/tenants/default" "$TMP/mc/tenants/default"
printf 'node: server\nadmin: 127.0.0.1:9000\n' > "$TMP/ms/meshgate.yaml"
printf 'node: client\nadmin: 127.0.0.1:9000\n' > "$TMP/mc/meshgate.yaml"
cat > "$TMP/ms/tenants/default/wg0.yaml" <<EOF
kind: wireguard
private_key_file: $TMP/ms.key
listen_port: 51830
address: 10.192.0.1/24
peers:
  - name: client
    public_key: $(pub mc)
    allowed_ips: [10.192.0.2/32]
  - name: wireguard-go
    public_key: $(pub ga)
    endpoint: 10.233.0.1:51001
    allowed_ips: [10.192.0.3/32]
EOF
cat > "$TMP/ms/tenants/default/iperf.yaml" <<EOF
kind: pipe
listen: 10.192.0.1:5201
listen_via: wg0
remote: 127.0.0.1:5202
EOF
cat > "$TMP/ms/tenants/default/web.yaml" <<EOF
kind: pipe
listen: 10.192.0.1:80
listen_via: wg0
remote: 127.0.0.1:80
EOF
cat > "$TMP/mc/tenants/default/wg0.yaml" <<EOF
kind: wireguard
private_key_file: $TMP/mc.key
address: 10.192.0.2/32
peers:
  - name: server
    public_key: $(pub ms)
    endpoint: 10.233.0.2:51830
    allowed_ips: [10.192.0.0/24]
EOF
cat > "$TMP/mc/tenants/default/iperf.yaml" <<EOF
kind: pipe
listen: 127.0.0.1:5201
via: wg0
remote: 10.192.0.1:5201
EOF
cat > "$TMP/mc/tenants/default/web.yaml" <<EOF
kind: pipe
listen: 127.0.0.1:8080
via: wg0
remote: 10.192.0.1:80
EOF
# wireguard-go in A also talks to meshgate's server (for the ping row).
inA wg set "$WGA" peer "$(pub ms)" endpoint 10.233.0.2:51830 allowed-ips 10.192.0.1/32
inA ip addr add 10.192.0.3/32 dev "$WGA"
inA ip route add 10.192.0.1/32 dev "$WGA" src 10.192.0.3

bgB "$TMP/ms.log" "$MESHGATE_BIN_DIR/meshgate" --config-dir "$TMP/ms"
bgA "$TMP/mc.log" "$MESHGATE_BIN_DIR/meshgate" --config-dir "$TMP/mc"

# Servers in B: iperf3 on every address (5201) and on loopback (5202), nginx on 80.
bgB "$TMP/iperf-a.log" iperf3 -s -p 5201
bgB "$TMP/iperf-b.log" iperf3 -s -p 5202 -B 127.0.0.1
mkdir -p "$TMP/www" "$TMP/ntmp"; echo ok > "$TMP/www/index.html"; chmod -R 755 "$TMP/www"
cat > "$TMP/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $TMP/nginx.pid; error_log $TMP/nginx.err;
events { worker_connections 256; }
http { access_log off; client_body_temp_path $TMP/ntmp; proxy_temp_path $TMP/ntmp;
  fastcgi_temp_path $TMP/ntmp; uwsgi_temp_path $TMP/ntmp; scgi_temp_path $TMP/ntmp;
  server { listen 80; root $TMP/www; } }
EOF
bgB "$TMP/nginx.log" nginx -p "$TMP" -e "$TMP/nginx.err" -c "$TMP/nginx.conf"

wait_ok() { for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
wait_ok inB curl -sf http://127.0.0.1:9000/readyz || { cat "$TMP/ms.log"; die "meshgate server not ready"; }
wait_ok inA curl -sf http://127.0.0.1:9000/readyz || { cat "$TMP/mc.log"; die "meshgate client not ready"; }
wait_ok inA curl -sf --max-time 2 http://10.233.0.2/ || die "nginx not reachable"
wait_ok inA curl -sf --max-time 2 http://10.200.0.2/ || die "no path through wireguard-go"
wait_ok inA curl -sf --max-time 2 http://127.0.0.1:8080/ || { cat "$TMP/mc.log" "$TMP/ms.log"; die "no path through meshgate"; }

# ---------------------------------------------------------------- measure --
iperf() { # iperf() HOST PORT -> Gbps
  inA timeout $((DURATION + 20)) iperf3 -c "$1" -p "$2" -t "$DURATION" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
say "iperf3 ${DURATION}s each: veth, wireguard-go, meshgate"
T_VETH=$(iperf 10.233.0.2 5201)
T_WGGO=$(iperf 10.200.0.2 5201)
T_MG=$(iperf 127.0.0.1 5201)

rtt() { # rtt() ADDR -> avg ms
  inA ping -c 20 -i 0.05 -q "$1" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p'
}
R_WGGO=$(rtt 10.200.0.2)
R_MG=$(rtt 10.192.0.1)

ttfb() { # ttfb() URL -> median ms over 20 new connections
  for _ in $(seq 20); do inA curl -s -o /dev/null -w '%{time_starttransfer}\n' "$1"; done |
    sort -n | sed -n '10p' | python3 -c 'import sys; print("%.2f" % (float(sys.stdin.read())*1000))'
}
F_VETH=$(ttfb http://10.233.0.2/)
F_WGGO=$(ttfb http://10.200.0.2/)
F_MG=$(ttfb http://127.0.0.1:8080/)

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
cat <<EOF

== meshgate WireGuard benchmark (netns, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores) ==
throughput  veth $T_VETH Gbps | wireguard-go $T_WGGO Gbps | meshgate $T_MG Gbps ($(ratio "$T_MG" "$T_WGGO")x wireguard-go, target >= 2x)
ping RTT    wireguard-go <-> wireguard-go $R_WGGO ms | wireguard-go <-> meshgate $R_MG ms
first byte  veth $F_VETH ms | wireguard-go $F_WGGO ms | meshgate pipes $F_MG ms (new TCP connection each, median of 20)
EOF
