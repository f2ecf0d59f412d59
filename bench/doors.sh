#!/usr/bin/env bash
# Front doors on loopback: single-stream iperf3 through meshgate's SOCKS5
# door and its HTTP CONNECT door, against direct loopback and Debian's
# dante-server (danted) as the well-known SOCKS server, from one run; and
# the SOCKS connection rate and the UDP ASSOCIATE datagram rate against
# direct, with a small Python client; and the SOCKS connection rate of a
# tenant whose policy has 10,000 rules against one with none, in the same
# run (target: >= 0.95x).
#
# iperf3 speaks no proxy protocol: proxychains4 (LD_PRELOAD) puts its
# connections through each proxy. Both ends of every hop are kernel
# sockets, so meshgate's relay uses splice(2).
#
#   bench/doors.sh                                  # builds release binaries
#   MESHGATE_BIN=target/release/meshgate bench/doors.sh
#
# Knobs: BENCH_DURATION (seconds per iperf3 run, default 10), BENCH_CONNS
# (connections for the rate rows, default 3000), BENCH_DATAGRAMS (default
# 20000), BENCH_KEEP=1. Target (issue): SOCKS5 and CONNECT >= 0.7x direct.
set -euo pipefail

DURATION=${BENCH_DURATION:-10}
CONNS=${BENCH_CONNS:-3000}
DATAGRAMS=${BENCH_DATAGRAMS:-20000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[doors] %s\n' "$*" >&2; }
die() { printf 'bench/doors.sh: error: %s\n' "$*" >&2; exit 1; }
for t in iperf3 proxychains4 python3; do
  command -v "$t" >/dev/null || die "'$t' not found: apt-get install -y iperf3 proxychains4 python3 dante-server"
done
DANTE=$(command -v danted || true)
[[ -n $DANTE ]] || say "danted not found (apt-get install -y dante-server): its row is skipped"

if [[ -z ${MESHGATE_BIN:-} ]]; then
  say "building release binaries"
  (cd "$ROOT" && cargo build --release --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN=$ROOT/target/release/meshgate
fi

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IPERF=$(free_port); SOCKS=$(free_port); HTTP=$(free_port); DANTE_PORT=$(free_port); ADMIN=$(free_port); ECHO=$(free_port); UECHO=$(free_port); RULED=$(free_port)
RULES=${BENCH_RULES:-10000}

mkdir -p "$TMP/cfg/tenants/bench" "$TMP/cfg/tenants/ruled"
printf 'admin: 127.0.0.1:%s\nlog: warn\naudit: off\n' "$ADMIN" > "$TMP/cfg/meshgate.yaml"
# The iperf3 server and echoes are on loopback: door users reach it only
# through a route that names it.
LOOPBACK_VNET='kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n'
printf "$LOOPBACK_VNET" > "$TMP/cfg/tenants/bench/default.yaml"
printf "$LOOPBACK_VNET" > "$TMP/cfg/tenants/ruled/default.yaml"
printf 'kind: socks\nlisten: 127.0.0.1:%s\n' "$SOCKS" > "$TMP/cfg/tenants/bench/socks.yaml"
printf 'kind: http_proxy\nlisten: 127.0.0.1:%s\n' "$HTTP" > "$TMP/cfg/tenants/bench/http.yaml"
# A second tenant, the same door, and a policy of $RULES rules: denies of
# /32s, /24s and /16s in 10.0.0.0/8 and names, then the allow the flows use.
printf 'kind: socks\nlisten: 127.0.0.1:%s\n' "$RULED" > "$TMP/cfg/tenants/ruled/socks.yaml"
python3 - "$RULES" > "$TMP/cfg/tenants/ruled/policy.yaml" <<'EOF'
import sys
n = int(sys.argv[1])
print("kind: policy\nrules:")
for i in range(n - 1):
    if i % 4 == 0:
        to = "10.%d.%d.0/24" % ((i >> 8) & 255, i & 255)
    elif i % 4 == 1:
        to = "host-%d.corp.example" % i
    elif i % 4 == 2:
        to = "10.%d.0.0/16" % (i % 250)
    else:
        to = "10.%d.%d.%d" % ((i >> 16) & 255, (i >> 8) & 255, i & 255)
    print("  - name: r%d\n    action: deny\n    to: [\"%s\"]\n    ports: [%d]" % (i, to, 1 + i % 60000))
print("  - name: loopback\n    action: allow\n    to: [127.0.0.0/8]")
EOF
"$MESHGATE_BIN" --config-dir "$TMP/cfg" > "$TMP/meshgate.log" 2>&1 & PIDS+=($!)
iperf3 -s -B 127.0.0.1 -p "$IPERF" > "$TMP/iperf.log" 2>&1 & PIDS+=($!)
if [[ -n $DANTE ]]; then
  cat > "$TMP/danted.conf" <<EOF
logoutput: $TMP/danted.log
internal: 127.0.0.1 port = $DANTE_PORT
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect udpassociate }
socks pass { from: 0.0.0.0/0 to: 127.0.0.0/8 command: udpreply }
EOF
  "$DANTE" -f "$TMP/danted.conf" -N 1 > "$TMP/danted.out" 2>&1 & PIDS+=($!)
fi
# Echo servers for the rate rows (TCP and UDP).
python3 - "$ECHO" "$UECHO" > "$TMP/echo.log" 2>&1 <<'EOF' &
import asyncio, sys
async def tcp(r, w):
    try:
        while d := await r.read(65536):
            w.write(d); await w.drain()
    finally:
        w.close()
class Udp(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, a): self.t.sendto(d, a)
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", int(sys.argv[2])))
    s = await asyncio.start_server(tcp, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
EOF
PIDS+=($!)
sleep 1
python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$ADMIN/readyz')" || { cat "$TMP/meshgate.log"; die "meshgate not ready"; }

chain() { # chain NAME TYPE PORT -> proxychains config path
  printf 'strict_chain\nquiet_mode\nproxy_dns\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\n%s 127.0.0.1 %s\n' "$2" "$3" > "$TMP/$1.conf"
  echo "$TMP/$1.conf"
}
iperf() { # iperf [PROXYCHAINS-CONF] -> Gbps
  local pre=()
  [[ -n ${1:-} ]] && pre=(proxychains4 -q -f "$1")
  timeout $((DURATION + 30)) "${pre[@]}" iperf3 -c 127.0.0.1 -p "$IPERF" -t "$DURATION" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo 0
}
ratio() { python3 -c "a,b=$1,$2; print('%.2f' % (a/b) if b else '-')"; }

say "iperf3 ${DURATION}s each: direct, SOCKS5, HTTP CONNECT${DANTE:+, dante}"
T_DIRECT=$(iperf "")
T_SOCKS=$(iperf "$(chain socks socks5 "$SOCKS")")
T_HTTP=$(iperf "$(chain http http "$HTTP")")
T_DANTE=0
[[ -n $DANTE ]] && T_DANTE=$(iperf "$(chain dante socks5 "$DANTE_PORT")")

# Connections per second: connect (through SOCKS5 or not), 1 byte echoed, close.
rate() { # rate PROXY-PORT|"" -> conn/s
  python3 - "$ECHO" "${1:-0}" "$CONNS" <<'EOF'
import asyncio, struct, sys, time
echo, proxy, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
async def one():
    if proxy:
        r, w = await asyncio.open_connection("127.0.0.1", proxy)
        w.write(b"\x05\x01\x00"); await r.readexactly(2)
        w.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", echo)); rep = await r.readexactly(10)
        assert rep[1] == 0, rep
    else:
        r, w = await asyncio.open_connection("127.0.0.1", echo)
    w.write(b"x"); await r.readexactly(1); w.close()
async def main():
    sem = asyncio.Semaphore(50)
    async def guarded():
        async with sem: await one()
    t = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(n)))
    print("%.0f" % (n / (time.perf_counter() - t)))
asyncio.run(main())
EOF
}
say "connection rate ($CONNS, 50 at a time): direct, SOCKS5${DANTE:+, dante}, SOCKS5 with $RULES policy rules"
C_DIRECT=$(rate "")
# The policy row against the plain door: alternated, best of three each,
# so drift between runs does not pass for the rules' cost.
C_SOCKS=0; C_RULED=0
for _ in 1 2 3; do
  c=$(rate "$SOCKS"); ((c > C_SOCKS)) && C_SOCKS=$c
  c=$(rate "$RULED"); ((c > C_RULED)) && C_RULED=$c
done
C_DANTE=0
[[ -n $DANTE ]] && C_DANTE=$(rate "$DANTE_PORT")

# UDP ASSOCIATE: datagrams echoed per second, 32 in flight.
udp_rate() { # udp_rate SOCKS-PORT|"" -> datagrams/s (each way)
  python3 - "$UECHO" "${1:-0}" "$DATAGRAMS" <<'EOF'
import socket, struct, sys, time
echo, proxy, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0)); u.settimeout(2)
to, hdr, skip = ("127.0.0.1", echo), b"", 0
if proxy:
    t = socket.create_connection(("127.0.0.1", proxy))
    t.sendall(b"\x05\x01\x00"); t.recv(2)
    t.sendall(b"\x05\x03\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", u.getsockname()[1]))
    r = t.recv(10); assert r[1] == 0, r
    to = (socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0])
    hdr = b"\x00\x00\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", echo); skip = 10
payload = b"x" * 64
sent = got = 0
t0 = time.perf_counter()
while got < n:
    while sent < n and sent - got < 32:
        u.sendto(hdr + payload, to); sent += 1
    try:
        u.recv(2048); got += 1
    except socket.timeout:
        break
print("%.0f" % (got / (time.perf_counter() - t0)))
EOF
}
say "UDP datagrams ($DATAGRAMS, 32 in flight): direct, SOCKS5 UDP ASSOCIATE"
U_DIRECT=$(udp_rate "")
U_SOCKS=$(udp_rate "$SOCKS")

cat <<EOF

== meshgate front doors benchmark (loopback, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores) ==
throughput  direct $T_DIRECT Gbps | SOCKS5 $T_SOCKS Gbps ($(ratio "$T_SOCKS" "$T_DIRECT")x) | HTTP CONNECT $T_HTTP Gbps ($(ratio "$T_HTTP" "$T_DIRECT")x) | dante $T_DANTE Gbps ($(ratio "$T_DANTE" "$T_DIRECT")x); target >= 0.7x
conn rate   direct $C_DIRECT/s | SOCKS5 $C_SOCKS/s ($(ratio "$C_SOCKS" "$C_DIRECT")x direct, $(ratio "$C_SOCKS" "$C_DANTE")x dante) | dante $C_DANTE/s  (python client: a floor, not a ceiling)
policy      SOCKS5 with $RULES rules $C_RULED/s | without $C_SOCKS/s ($(ratio "$C_RULED" "$C_SOCKS")x); target >= 0.95x
udp         direct $U_DIRECT datagrams/s | SOCKS5 UDP ASSOCIATE $U_SOCKS/s ($(ratio "$U_SOCKS" "$U_DIRECT")x)
EOF
