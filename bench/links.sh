#!/usr/bin/env bash
# Gateway links between two network namespaces: node A's pipes go over an
# ssh_link, an h2_link and a quic_link to node B, which dials a service
# only it reaches (on its loopback). From one run:
#   - one iperf3 stream through each link, as a ratio to the same stream
#     sent directly between the namespaces, with both nodes' CPU per Gbit/s;
#   - 100 parallel streams through each;
#   - the time to open a flow over an established link (connect, 1 byte
#     there and back, close), against the same exchange sent directly;
#   - the memory 1,000 idle flows hold on both nodes.
#
#   bench/links.sh                                   # builds release binaries (with quic)
#   MESHGATE_BIN=target/release/meshgate bench/links.sh
#
# Needs root (namespaces), iperf3, python3, openssl, ssh-keygen, and a
# meshgate built with `--features quic`. For the idle row the doors allow
# more than their defaults: 1024 streams per connection (default 200;
# a quic_link carries every flow on one connection) and 2048 SSH channels
# per session (default 256). Knobs: BENCH_DURATION (default 10),
# BENCH_OPENS (default 300), BENCH_IDLE (default 1000), BENCH_KEEP=1.
# Targets (issue #21): h2_link >= 1.0x ssh_link; quic_link >= 0.8x h2_link;
# opening a flow adds < 1 RTT + 0.2 ms.
set -euo pipefail

DURATION=${BENCH_DURATION:-10}
OPENS=${BENCH_OPENS:-300}
IDLE=${BENCH_IDLE:-1000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[links] %s\n' "$*" >&2; }
die() { printf 'bench/links.sh: error: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
for t in iperf3 python3 openssl ssh-keygen ip; do
  command -v "$t" >/dev/null || die "'$t' not found: apt-get install -y iperf3 python3 openssl openssh-client iproute2"
done
if [[ -z ${MESHGATE_BIN:-} ]]; then
  say "building release binaries (--features quic)"
  (cd "$ROOT" && cargo build --release --features quic --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN=$ROOT/target/release/meshgate
fi
MESHGATE_BIN=$(readlink -f "$MESHGATE_BIN")
[[ -x $MESHGATE_BIN ]] || die "$MESHGATE_BIN is not an executable"

TMP=$(mktemp -d); chmod 755 "$TMP"
A=mgla$$; B=mglb$$
cleanup() {
  for ns in "$A" "$B"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  done
  sleep 0.3
  ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
ip netns add "$A"; ip netns add "$B"
ip link add "va$$" type veth peer name "vb$$"
ip link set "va$$" netns "$A"; ip link set "vb$$" netns "$B"
ip -n "$A" addr add 10.250.0.2/24 dev "va$$"; ip -n "$B" addr add 10.250.0.1/24 dev "vb$$"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set "va$$" up; ip -n "$B" link set "vb$$" up
inA() { ip netns exec "$A" "$@"; }
inB() { ip netns exec "$B" "$@"; }

# A test PKI: a CA, B's server certificate, A's client certificate.
cd "$TMP"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj "/CN=bench CA" \
  -keyout ca.key -out ca.pem -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
leaf() { # leaf NAME EXT
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$2" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  chmod 600 "$1.key"
}
leaf b "subjectAltName=DNS:b.bench
extendedKeyUsage=serverAuth"
leaf a "subjectAltName=URI:spiffe://bench/a
extendedKeyUsage=clientAuth"
ssh-keygen -q -t ed25519 -N '' -f door_host
ssh-keygen -q -t ed25519 -N '' -C a -f link_key
cp link_key.pub authorized_keys

IPERF=5201; ECHO=7000; HOLD=7001
mkdir -p b/tenants/default a/tenants/default
printf 'node: b\nadmin: 127.0.0.1:9000\nlog: warn\n' > b/meshgate.yaml
printf 'node: a\nadmin: 127.0.0.1:9000\nlog: warn\n' > a/meshgate.yaml
printf 'kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n' > b/tenants/default/default.yaml
TLS="tls_cert: $TMP/b.pem
tls_key: $TMP/b.key
client_ca: $TMP/ca.pem
trust_forwarded: [\"spiffe://bench/a\"]
max_streams: 1024"
printf 'kind: ssh\nlisten: 10.250.0.1:2222\nhost_key_file: %s/door_host\nauthorized_keys_file: %s/authorized_keys\nmax_channels: 2048\n' "$TMP" "$TMP" > b/tenants/default/ssh.yaml
printf 'kind: h2\nlisten: 10.250.0.1:15008\n%s\n' "$TLS" > b/tenants/default/h2.yaml
printf 'kind: quic\nlisten: 10.250.0.1:15009\n%s\n' "$TLS" > b/tenants/default/quic.yaml
CLIENT="server_name: b.bench
ca: $TMP/ca.pem
tls_cert: $TMP/a.pem
tls_key: $TMP/a.key"
printf 'kind: ssh_link\nserver: 10.250.0.1:2222\nhost_key: "%s"\nkey_file: %s/link_key\n' "$(cut -d' ' -f1,2 door_host.pub)" "$TMP" > a/tenants/default/ssh.yaml
printf 'kind: h2_link\nserver: 10.250.0.1:15008\n%s\n' "$CLIENT" > a/tenants/default/h2.yaml
printf 'kind: quic_link\nserver: 10.250.0.1:15009\n%s\n' "$CLIENT" > a/tenants/default/quic.yaml
port=8100
for via in ssh h2 quic; do
  for target in "$IPERF" "$ECHO" "$HOLD"; do
    printf 'kind: pipe\nlisten: 127.0.0.1:%s\nremote: 127.0.0.1:%s\nvia: %s\nmax_connections: 5000\n' "$port" "$target" "$via" > "a/tenants/default/$via-$target.yaml"
    port=$((port + 1))
  done
done
pipe_port() { # pipe_port VIA TARGET
  local i=0 via target
  for via in ssh h2 quic; do for target in "$IPERF" "$ECHO" "$HOLD"; do
    [[ $via == "$1" && $target == "$2" ]] && { echo $((8100 + i)); return; }
    i=$((i + 1))
  done; done
}

inB iperf3 -s -p "$IPERF" >/dev/null 2>&1 &
cat > echo.py <<'EOF'
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(1024)
def serve(c):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
inB python3 echo.py &
inB python3 "$HERE/hold.py" serve "$HOLD" &
ulimit -n 65536 2>/dev/null || true
inB "$MESHGATE_BIN" --config-dir "$TMP/b" > b.log 2>&1 &
sleep 0.5
inA "$MESHGATE_BIN" --config-dir "$TMP/a" > a.log 2>&1 &
pidof_ns() { ip netns pids "$1" | while read -r p; do [[ $(readlink "/proc/$p/exe") == "$(readlink -f "$MESHGATE_BIN")" ]] && echo "$p"; done; }
up() { # up INSTANCE: the link is connected
  inA python3 - "$1" <<'EOF'
import json, sys, urllib.request
m = json.load(urllib.request.urlopen("http://127.0.0.1:9000/api/v1/modules", timeout=2))
sys.exit(0 if any(x["instance"] == sys.argv[1] and x["details"].get("connected") for x in m) else 1)
EOF
}
for via in ssh h2 quic; do
  for _ in $(seq 100); do up "$via" 2>/dev/null && break; sleep 0.1; done
  up "$via" || { tail -n 20 a.log b.log >&2; die "$via link did not come up"; }
done
MGA=$(pidof_ns "$A"); MGB=$(pidof_ns "$B")
say "links up (meshgate A pid $MGA, B pid $MGB)"

ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
iperf() { # iperf HOST PORT PARALLEL -> "Gbps cpuA% cpuB%"
  local a0 b0 t0 g
  a0=$(ticks "$MGA"); b0=$(ticks "$MGB"); t0=$(date +%s.%N)
  g=$(inA timeout $((DURATION + 30)) iperf3 -c "$1" -p "$2" -P "$3" -t "$DURATION" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo 0)
  python3 -c "import os; hz=os.sysconf('SC_CLK_TCK'); t=$(date +%s.%N)-$t0; print('$g %.0f %.0f' % (($(ticks "$MGA")-$a0)/hz/t*100, ($(ticks "$MGB")-$b0)/hz/t*100))"
}
opens() { # opens HOST PORT -> median ms of connect + 1 byte each way + close
  inA python3 - "$1" "$2" "$OPENS" <<'EOF'
import socket, statistics, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ts = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection((host, port), 5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"x"); s.recv(1); s.close()
    ts.append(time.perf_counter() - t)
print("%.3f" % (statistics.median(ts) * 1000))
EOF
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle() { # idle PORT -> KiB per flow on A and B ("- -" if they could not all be opened)
  local a0 b0 pid
  a0=$(rss "$MGA"); b0=$(rss "$MGB")
  rm -f hold.in hold.out; mkfifo hold.in
  inA python3 "$HERE/hold.py" open 127.0.0.1 "$1" "$IDLE" < hold.in > hold.out 2>&1 & pid=$!
  exec 9>hold.in
  for _ in $(seq 300); do grep -q '^ok' hold.out 2>/dev/null && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if grep -q "^ok $IDLE" hold.out; then
    sleep 1
    python3 -c "print('%.1f %.1f' % (($(rss "$MGA")-$a0)/$IDLE, ($(rss "$MGB")-$b0)/$IDLE))"
  else
    say "could not hold $IDLE flows on port $1: $(tail -n 1 hold.out)"
    echo "- -"
  fi
  exec 9>&-
  wait "$pid" 2>/dev/null || true
  sleep 1
}
rtt() { inA ping -c 20 -i 0.05 -q 10.250.0.1 | awk -F/ '/rtt/ {print $5}'; }
ratio() { python3 -c "a,b=$1,$2; print('%.2f' % (a/b) if b else '-')"; }
per_gbit() { python3 -c "g,a,b=$1,$2,$3; print('%.0f' % ((a+b)/g) if g else '-')"; }

declare -A G CA CB P PA PB O IA IB
say "opening flows ($OPENS each)"
RTT=$(rtt)
D_O=$(opens 10.250.0.1 "$ECHO")
for via in ssh h2 quic; do O[$via]=$(opens 127.0.0.1 "$(pipe_port "$via" "$ECHO")"); done
say "one iperf3 stream, ${DURATION}s each: direct, ssh, h2, quic"
read -r D_G _ _ < <(iperf 10.250.0.1 "$IPERF" 1)
for via in ssh h2 quic; do
  read -r G[$via] CA[$via] CB[$via] < <(iperf 127.0.0.1 "$(pipe_port "$via" "$IPERF")" 1)
done
say "100 parallel streams"
read -r D_P _ _ < <(iperf 10.250.0.1 "$IPERF" 100)
for via in ssh h2 quic; do
  read -r P[$via] PA[$via] PB[$via] < <(iperf 127.0.0.1 "$(pipe_port "$via" "$IPERF")" 100)
done
say "$IDLE idle flows each"
for via in ssh h2 quic; do read -r IA[$via] IB[$via] < <(idle "$(pipe_port "$via" "$HOLD")"); done

cat <<EOF

== meshgate gateway links ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, two namespaces over a veth pair, RTT ${RTT} ms) ==
one stream         direct $D_G Gbps
EOF
for via in ssh h2 quic; do
  printf '  %-5s link      %6s Gbps (%sx direct)   CPU A %s%% + B %s%% of a core = %s%% per Gbit/s\n' \
    "$via" "${G[$via]}" "$(ratio "${G[$via]}" "$D_G")" "${CA[$via]}" "${CB[$via]}" "$(per_gbit "${G[$via]}" "${CA[$via]}" "${CB[$via]}")"
done
printf '  h2 / ssh: %sx (target >= 1.0)   quic / h2: %sx (target >= 0.8)\n' "$(ratio "${G[h2]}" "${G[ssh]}")" "$(ratio "${G[quic]}" "${G[h2]}")"
echo "100 streams        direct $D_P Gbps"
for via in ssh h2 quic; do
  printf '  %-5s link      %6s Gbps (%sx direct)   CPU A %s%% + B %s%%\n' "$via" "${P[$via]}" "$(ratio "${P[$via]}" "$D_P")" "${PA[$via]}" "${PB[$via]}"
done
echo "open a flow        direct $D_O ms (median of $OPENS: connect, 1 byte each way, close)"
for via in ssh h2 quic; do
  printf '  %-5s link      %6s ms (adds %s ms; target < 1 RTT + 0.2 = %s ms)\n' "$via" "${O[$via]}" \
    "$(python3 -c "print('%.3f' % (${O[$via]} - $D_O))")" "$(python3 -c "print('%.3f' % ($RTT + 0.2))")"
done
echo "idle flows         KiB per flow held ($IDLE open through each link)"
for via in ssh h2 quic; do
  printf '  %-5s link      A %s KiB + B %s KiB\n' "$via" "${IA[$via]}" "${IB[$via]}"
done
