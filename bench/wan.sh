#!/usr/bin/env bash
# WAN benchmark (root): WireGuard tunnels across a path that delays and
# loses datagrams, as the internet does. This kernel has no netem, so the
# path is bench/wanrelay (a UDP relay with delay, random loss and a
# rate-limited bottleneck queue) in a namespace R between A and B:
#
#   A 10.234.1.1 --veth-- R (wanrelay) --veth-- B 10.234.2.1
#   A 10.233.0.1 --------- veth ---------------- B 10.233.0.2   (loss-free row)
#
# For each path row, single-stream iperf3 A -> B through:
#   wireguard-go + kernel TCP, BBR      (iperf3 -C bbr, over wireguard-go interfaces)
#   wireguard-go + kernel TCP, Cubic    (iperf3 -C cubic)
#   meshgate userspace                  (client pipe -> meshgate WireGuard -> server pipe)
#   meshgate kernel                     (the same with engine: kernel on both nodes)
# with the CPU both meshgate processes used, per Gbit/s carried, and, on
# relayed rows, ACKs/MB: the tunnel datagrams B sent back per MB of tunnel
# datagrams it received (read from the relay's --stats-file around each run;
# target: meshgate userspace within 1.5x of meshgate kernel).
#
# Then fairness at one shared bottleneck (one wanrelay, two pairs, 100 Mbit/s,
# 10 ms each way, a one-BDP queue of 250,000 bytes), flows started together:
#   (a) meshgate userspace (its default BBR) vs wireguard-go + kernel Cubic:
#       each flow's Mbps, meshgate's share (target <= 2/3), Jain's index (>= 0.8);
#   (b) two meshgate userspace flows (iperf3 -P 2): Jain's index (>= 0.95).
# Each target gets PASS or MISS; a MISS does not fail the script.
#
#   bench/wan.sh                                   # builds release binaries
#   MESHGATE_BIN_DIR=target/release bench/wan.sh
#   WAN_ROWS=none WAN_FAIR_DURATION=20 MESHGATE_BIN_DIR=target/release bench/wan.sh   # fairness only
#
# Knobs: BENCH_DURATION (seconds per iperf3 run, default 10), WAN_RATE
# (bottleneck, default 1gbit), WAN_QUEUE (bottleneck queue, default 1m),
# WAN_ROWS (default "10ms:0 10ms:0.5% 2ms:0.1% veth"; "none": no rows), WAN_CC
# (meshgate's congestion_control on both nodes, e.g. cubic; default BBR),
# WAN_FAIRNESS (0: skip the fairness section; default 1), WAN_FAIR_DURATION
# (seconds per fairness run, default 30), BENCH_KEEP=1.
set -euo pipefail

DURATION=${BENCH_DURATION:-10}
RATE=${WAN_RATE:-1gbit}
QUEUE=${WAN_QUEUE:-1m}
ROWS=${WAN_ROWS:-"10ms:0 10ms:0.5% 2ms:0.1% veth"}
[[ $ROWS == none ]] && ROWS=""
FAIRNESS=${WAN_FAIRNESS:-1}
FAIR_DURATION=${WAN_FAIR_DURATION:-30}
# The fairness section's bottleneck: RTT 20 ms x 100 Mbit/s = 250,000 bytes (one BDP).
FAIR_RATE=100mbit; FAIR_DELAY=10ms; FAIR_QUEUE=250000
# Targets (also in bench/README.md).
TARGET_ACKS_RATIO=1.5   # meshgate userspace ACKs/MB <= 1.5x meshgate kernel's
TARGET_FAIR_SHARE=0.667 # meshgate's share of the total against a kernel Cubic flow <= 2/3
TARGET_FAIR_JAIN=0.8    # Jain's index, meshgate vs kernel Cubic >= 0.8
TARGET_SELF_JAIN=0.95   # Jain's index, two meshgate flows >= 0.95
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[wan] %s\n' "$*" >&2; }
die() { printf 'bench/wan.sh: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
for t in ip iperf3 wireguard-go wg python3 cargo; do
  command -v "$t" >/dev/null || die "'$t' not found: scripts/test.sh installs everything"
done

if [[ -z ${MESHGATE_BIN_DIR:-} ]]; then
  say "building release binaries"
  (cd "$ROOT" && cargo build --release --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN_DIR=$ROOT/target/release
fi
MESHGATE_BIN_DIR=$(cd "$MESHGATE_BIN_DIR" && pwd)
say "building wanrelay"
cargo build --release -q --manifest-path "$HERE/wanrelay/Cargo.toml" --target-dir "$HERE/wanrelay/target" >&2 || die "wanrelay build failed"
RELAY=$HERE/wanrelay/target/release/wanrelay

P="mgw$$"
A="$P-a"; B="$P-b"; R="$P-r"
TMP=$(mktemp -d); chmod 755 "$TMP"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in "$A" "$B" "$R"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
bg() { local ns=$1 log=$2; shift 2; ip netns exec "$ns" "$@" >"$log" 2>&1 & LAST=$!; PIDS+=("$LAST"); }

# ---------------------------------------------------------------- topology --
for n in "$A" "$B" "$R"; do ip netns add "$n"; nsx "$n" ip link set lo up; done
ip link add "${P}ar" netns "$A" type veth peer name "${P}ra" netns "$R"
ip link add "${P}rb" netns "$R" type veth peer name "${P}br" netns "$B"
ip link add "${P}ab" netns "$A" type veth peer name "${P}ba" netns "$B"
nsx "$A" ip addr add 10.234.1.1/24 dev "${P}ar"; nsx "$A" ip link set "${P}ar" up
nsx "$R" ip addr add 10.234.1.2/24 dev "${P}ra"; nsx "$R" ip link set "${P}ra" up
nsx "$R" ip addr add 10.234.2.2/24 dev "${P}rb"; nsx "$R" ip link set "${P}rb" up
nsx "$B" ip addr add 10.234.2.1/24 dev "${P}br"; nsx "$B" ip link set "${P}br" up
nsx "$A" ip addr add 10.233.0.1/24 dev "${P}ab"; nsx "$A" ip link set "${P}ab" up
nsx "$B" ip addr add 10.233.0.2/24 dev "${P}ba"; nsx "$B" ip link set "${P}ba" up

umask 077
for k in ga gb ms mc; do "$MESHGATE_BIN_DIR/meshgatectl" genkey > "$TMP/$k.key"; done
umask 022
pub() { "$MESHGATE_BIN_DIR/meshgatectl" pubkey < "$TMP/$1.key"; }

# wireguard-go on both sides (unique names: /var/run/wireguard is shared).
WGA="${P}ga"; WGB="${P}gb"
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
nsx "$A" wireguard-go "$WGA" >/dev/null 2>&1; nsx "$B" wireguard-go "$WGB" >/dev/null 2>&1
nsx "$A" wg set "$WGA" private-key "$TMP/ga.key" listen-port 51001 peer "$(pub gb)" allowed-ips 10.200.0.2/32
nsx "$B" wg set "$WGB" private-key "$TMP/gb.key" listen-port 51002 peer "$(pub ga)" allowed-ips 10.200.0.1/32
nsx "$A" ip addr add 10.200.0.1/24 dev "$WGA"; nsx "$A" ip link set "$WGA" up
nsx "$B" ip addr add 10.200.0.2/24 dev "$WGB"; nsx "$B" ip link set "$WGB" up

# meshgate: a server in B (10.192.0.1, pipe to iperf3 on its loopback) and a
# client in A (pipe 127.0.0.1:5201 through the tunnel). WAN_CC sets both
# nodes' congestion_control (default: each engine's own, BBR).
CC_LINE=""
[[ -n ${WAN_CC:-} ]] && CC_LINE="congestion_control: $WAN_CC"

mkdir -p "$TMP/ms/tenants/default" "$TMP/mc/tenants/default"
printf 'node: server\nadmin: 127.0.0.1:9000\ndrain_timeout: 1s\n' > "$TMP/ms/meshgate.yaml"
printf 'node: client\nadmin: 127.0.0.1:9000\ndrain_timeout: 1s\n' > "$TMP/mc/meshgate.yaml"
cat > "$TMP/ms/tenants/default/wg0.yaml" <<EOF
kind: wireguard
$CC_LINE
private_key_file: $TMP/ms.key
listen_port: 51830
address: 10.192.0.1/24
uapi: off
peers:
  - name: client
    public_key: $(pub mc)
    allowed_ips: [10.192.0.2/32]
EOF
cat > "$TMP/ms/tenants/default/iperf.yaml" <<EOF
kind: pipe
listen: 10.192.0.1:5201
listen_via: wg0
remote: 127.0.0.1:5202
EOF
cat > "$TMP/mc/tenants/default/iperf.yaml" <<EOF
kind: pipe
listen: 127.0.0.1:5201
via: wg0
remote: 10.192.0.1:5201
EOF
# For RSS per 1,000 tunnelled connections: a pipe pair to a holder in B.
cat > "$TMP/ms/tenants/default/hold.yaml" <<EOF
kind: pipe
listen: 10.192.0.1:5300
listen_via: wg0
remote: 127.0.0.1:5301
max_connections: 5000
EOF
cat > "$TMP/mc/tenants/default/hold.yaml" <<EOF
kind: pipe
listen: 127.0.0.1:5300
via: wg0
remote: 10.192.0.1:5300
max_connections: 5000
EOF
client_wg() { # client_wg ENDPOINT
  cat > "$TMP/mc/tenants/default/wg0.yaml" <<EOF
kind: wireguard
$CC_LINE
private_key_file: $TMP/mc.key
address: 10.192.0.2/32
uapi: off
peers:
  - name: server
    public_key: $(pub ms)
    endpoint: $1
    persistent_keepalive: 5
    allowed_ips: [10.192.0.0/24]
EOF
}

bg "$B" "$TMP/iperf-b.log" iperf3 -s -p 5201
bg "$B" "$TMP/iperf-b2.log" iperf3 -s -p 5202 -B 127.0.0.1
bg "$B" "$TMP/hold.log" python3 "$HERE/hold.py" serve 5301

wait_ok() { for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

MS_PID=""; MC_PID=""
start_meshgate() { # start_meshgate ENGINE ENDPOINT
  stop_meshgate
  client_wg "$2"
  bg "$B" "$TMP/ms-$1.log" env MESHGATE_NODE__ENGINE="$1" "$MESHGATE_BIN_DIR/meshgate" --config-dir "$TMP/ms"; MS_PID=$LAST
  bg "$A" "$TMP/mc-$1.log" env MESHGATE_NODE__ENGINE="$1" "$MESHGATE_BIN_DIR/meshgate" --config-dir "$TMP/mc"; MC_PID=$LAST
  wait_ok nsx "$B" python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:9000/readyz")' || { cat "$TMP/ms-$1.log"; die "meshgate server not ready"; }
  wait_ok nsx "$A" python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:9000/readyz")' || { cat "$TMP/mc-$1.log"; die "meshgate client not ready"; }
  wait_ok nsx "$A" iperf3 -c 127.0.0.1 -p 5201 -t 1 || { cat "$TMP/mc-$1.log" "$TMP/ms-$1.log"; die "no path through meshgate ($1)"; }
}
stop_meshgate() {
  for p in $MS_PID $MC_PID; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  MS_PID=""; MC_PID=""
}

# The main pid of meshgate inside `ip netns exec ... env ...` (exec chain: same pid).
cpu_ticks() { # cpu_ticks PID... -> utime+stime of them and their helpers, in ticks
  local sum=0 p
  for p in "$@"; do
    for q in "$p" $(pgrep -P "$p" || true); do
      [[ -r /proc/$q/stat ]] || continue
      sum=$((sum + $(awk '{print $14 + $15}' "/proc/$q/stat")))
    done
  done
  echo "$sum"
}
HZ=$(getconf CLK_TCK)

rss_kib() { # rss_kib PID... -> VmRSS of them and their helpers, KiB
  local sum=0 p
  for p in "$@"; do
    for q in "$p" $(pgrep -P "$p" || true); do
      [[ -r /proc/$q/status ]] || continue
      sum=$((sum + $(awk '/^VmRSS:/ {print $2}' "/proc/$q/status")))
    done
  done
  echo "$sum"
}

declare -A RSS_PER_1000=()
rss_per_1000() { # rss_per_1000 ENGINE: MiB both meshgates add for 1,000 held tunnelled connections
  local before after fifo="$TMP/hold-$1.fifo"
  before=$(rss_kib "$MS_PID" "$MC_PID")
  mkfifo "$fifo"
  nsx "$A" python3 "$HERE/hold.py" open 127.0.0.1 5300 1000 < "$fifo" > "$TMP/hold-$1.out" 2>&1 &
  local opener=$!
  exec 7>"$fifo"
  for _ in $(seq 300); do grep -q '^ok' "$TMP/hold-$1.out" 2>/dev/null && break; sleep 0.1; done
  after=$(rss_kib "$MS_PID" "$MC_PID")
  exec 7>&-
  wait "$opener" 2>/dev/null || true
  rm -f "$fifo"
  if grep -q '^ok' "$TMP/hold-$1.out"; then
    RSS_PER_1000[$1]=$(python3 -c "print('%.1f' % (($after - $before) / 1024))")
  else
    RSS_PER_1000[$1]="-"; say "holding 1,000 connections failed ($1): $(cat "$TMP/hold-$1.out")"
  fi
}

iperf() { # iperf CC HOST PORT -> Mbps
  local cc=$1 host=$2 port=$3
  nsx "$A" timeout $((DURATION + 30)) iperf3 -c "$host" -p "$port" -t "$DURATION" ${cc:+-C "$cc"} -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))' ||
    echo 0
}

RELAY_PIDS=()
start_relay() { # start_relay NAME RELAY-ARGS...: a wanrelay in R writing $TMP/relay-NAME.stats
  local name=$1; shift
  rm -f "$TMP/relay-$name.log" "$TMP/relay-$name.stats"
  bg "$R" "$TMP/relay-$name.log" "$RELAY" --stats-file "$TMP/relay-$name.stats" "$@"; RELAY_PIDS+=("$LAST")
  wait_ok grep -q '^ready' "$TMP/relay-$name.log" || { cat "$TMP/relay-$name.log"; die "wanrelay $name did not start"; }
}
start_relays() { # start_relays DELAY LOSS
  stop_relays
  local args=(--delay "$1" --loss "$2" --rate "$RATE" --queue "$QUEUE")
  start_relay wg --listen 10.234.1.2:40001 --to 10.234.2.1:51002 "${args[@]}"
  start_relay mg --listen 10.234.1.2:40002 --to 10.234.2.1:51830 "${args[@]}"
}
stop_relays() {
  for p in "${RELAY_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  RELAY_PIDS=()
}

# A relay's counters: one line of key=value pairs (bench/wanrelay --stats-file,
# rewritten every 200 ms). The pause lets datagrams still on the path arrive
# and the file catch up. No file (the veth row): an empty line.
relay_snap() { # relay_snap STATS-FILE-OR-EMPTY
  [[ -n $1 ]] || { echo; return 0; }
  sleep 0.5
  cat "$1"
}
# ACK datagrams per MB received: datagrams B sent back (back_datagrams) per
# 1e6 bytes of datagrams that reached B (forth_passed_bytes), between two
# snapshots; KEY-PREFIX picks one pair of a shared relay (e.g. pair1_).
acks_per_mb() { # acks_per_mb BEFORE AFTER [KEY-PREFIX]
  python3 - "$1" "$2" "${3:-}" <<'EOF'
import sys
def kv(line):
    return dict(f.split("=", 1) for f in line.split())
a, b, pre = kv(sys.argv[1]), kv(sys.argv[2]), sys.argv[3]
try:
    acks = int(b[pre + "back_datagrams"]) - int(a[pre + "back_datagrams"])
    mb = (int(b[pre + "forth_passed_bytes"]) - int(a[pre + "forth_passed_bytes"])) / 1e6
    print("%.0f" % (acks / mb) if mb > 0 else "-")
except KeyError:
    print("-")
EOF
}
verdict() { # verdict VALUE OP TARGET -> PASS or MISS (OP: le or ge)
  python3 -c "import sys; v, op, t = sys.argv[1:]; ok = v != '-' and (float(v) <= float(t) if op == 'le' else float(v) >= float(t)); print('PASS' if ok else 'MISS')" "$1" "$2" "$3"
}

results=()
for row in $ROWS; do
  if [[ $row == veth ]]; then
    label="loss-free veth"; stop_relays
    wg_ep=10.233.0.2:51002; mg_ep=10.233.0.2:51830
    wg_stats=""; mg_stats=""
  else
    delay=${row%%:*}; loss=${row#*:}
    label="$delay each way, $loss loss, $RATE bottleneck"
    start_relays "$delay" "$loss"
    wg_ep=10.234.1.2:40001; mg_ep=10.234.1.2:40002
    wg_stats=$TMP/relay-wg.stats; mg_stats=$TMP/relay-mg.stats
  fi
  say "row: $label"
  nsx "$A" wg set "$WGA" peer "$(pub gb)" endpoint "$wg_ep" persistent-keepalive 5
  wait_ok nsx "$A" ping -c 1 -W 1 10.200.0.2 || die "no path through wireguard-go"
  s0=$(relay_snap "$wg_stats"); W_BBR=$(iperf bbr 10.200.0.2 5201); s1=$(relay_snap "$wg_stats")
  K_BBR=$(acks_per_mb "$s0" "$s1")
  s0=$(relay_snap "$wg_stats"); W_CUBIC=$(iperf cubic 10.200.0.2 5201); s1=$(relay_snap "$wg_stats")
  K_CUBIC=$(acks_per_mb "$s0" "$s1")
  line="$(printf '%-44s wg-go+BBR %6s (%s ACKs/MB) | wg-go+Cubic %6s (%s ACKs/MB)' "$label" "$W_BBR" "$K_BBR" "$W_CUBIC" "$K_CUBIC")"
  declare -A K_MG=()
  for engine in userspace kernel; do
    start_meshgate "$engine" "$mg_ep"
    s0=$(relay_snap "$mg_stats")
    c0=$(cpu_ticks "$MS_PID" "$MC_PID")
    M=$(iperf "" 127.0.0.1 5201)
    c1=$(cpu_ticks "$MS_PID" "$MC_PID")
    s1=$(relay_snap "$mg_stats")
    K_MG[$engine]=$(acks_per_mb "$s0" "$s1")
    cpu=$(python3 -c "print('%.2f' % (($c1 - $c0) / $HZ / $DURATION))")
    per=$(python3 -c "m=$M; print('%.2f' % (($c1 - $c0) / $HZ / $DURATION / (m / 1000)) if m > 0 else '-')")
    rb=$(python3 -c "print('%.2f' % ($M / $W_BBR) if $W_BBR > 0 else '-')")
    rc=$(python3 -c "print('%.2f' % ($M / $W_CUBIC) if $W_CUBIC > 0 else '-')")
    [[ -n ${RSS_PER_1000[$engine]:-} ]] || rss_per_1000 "$engine"
    line+="$(printf ' | meshgate %s %6s (%sx BBR, %sx Cubic; %s cores, %s cores/Gbps; %s MiB per 1,000 conns; %s ACKs/MB)' "$engine" "$M" "$rb" "$rc" "$cpu" "$per" "${RSS_PER_1000[$engine]}" "${K_MG[$engine]}")"
  done
  stop_meshgate
  if [[ ${K_MG[userspace]} != - && ${K_MG[kernel]} != - && ${K_MG[kernel]} != 0 ]]; then
    ka=$(python3 -c "print('%.2f' % (${K_MG[userspace]} / ${K_MG[kernel]}))")
    line+=" | ACKs/MB userspace/kernel ${ka}x (target <= ${TARGET_ACKS_RATIO}x: $(verdict "$ka" le "$TARGET_ACKS_RATIO"))"
  fi
  results+=("$line")
done
stop_relays

# ------------------------------------------------------------- fairness --
fair=()
jain() { python3 -c "import sys; x = [float(v) for v in sys.argv[1:]]; s = sum(v * v for v in x); print('%.2f' % (sum(x) ** 2 / (len(x) * s)) if s > 0 else '-')" "$@"; }
fair_iperf() { # fair_iperf OUT HOST [IPERF3-ARGS...]: iperf3 -J in A, in the background (pid in LAST)
  local out=$1 host=$2; shift 2
  nsx "$A" timeout $((FAIR_DURATION + 30)) iperf3 -c "$host" -t "$FAIR_DURATION" -J "$@" >"$out" 2>"$out.err" &
  LAST=$!; PIDS+=("$LAST")
}
mbps_of() { # mbps_of JSON-FILE [STREAM]: receiver Mbps of the whole test, or of one stream (0-based)
  python3 - "$@" <<'EOF' 2>/dev/null || echo 0
import json, sys
j = json.load(open(sys.argv[1]))
if len(sys.argv) > 2:
    bps = j["end"]["streams"][int(sys.argv[2])]["receiver"]["bits_per_second"]
else:
    bps = j["end"]["sum_received"]["bits_per_second"]
print("%.0f" % (bps / 1e6))
EOF
}
relay_key() { # relay_key LINE KEY
  tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'
}
drops() { # drops KEY: how much the relay counter KEY grew between snapshots $s0 and $s1
  echo $(( $(relay_key "$s1" "$1") - $(relay_key "$s0" "$1") ))
}
if [[ $FAIRNESS != 0 ]]; then
  say "fairness: $FAIR_RATE, $FAIR_DELAY each way, $FAIR_QUEUE-byte queue, ${FAIR_DURATION}s"
  # One relay, one bottleneck per direction: pair 0 carries wireguard-go, pair 1 meshgate.
  start_relay fair --pair 10.234.1.2:40011=10.234.2.1:51002 --pair 10.234.1.2:40012=10.234.2.1:51830 \
    --delay "$FAIR_DELAY" --loss 0 --rate "$FAIR_RATE" --queue "$FAIR_QUEUE"
  fs=$TMP/relay-fair.stats
  nsx "$A" wg set "$WGA" peer "$(pub gb)" endpoint 10.234.1.2:40011 persistent-keepalive 5
  wait_ok nsx "$A" ping -c 1 -W 1 10.200.0.2 || die "no path through wireguard-go (fairness)"
  start_meshgate userspace 10.234.1.2:40012
  mg_cc=${WAN_CC:-bbr}

  say "fairness (a): meshgate userspace ($mg_cc) and wg-go + kernel Cubic together"
  s0=$(relay_snap "$fs")
  fair_iperf "$TMP/fair-mg.json" 127.0.0.1 -p 5201; p1=$LAST
  fair_iperf "$TMP/fair-cubic.json" 10.200.0.2 -p 5201 -C cubic; p2=$LAST
  wait "$p1" || true; wait "$p2" || true
  s1=$(relay_snap "$fs")
  FM=$(mbps_of "$TMP/fair-mg.json"); FC=$(mbps_of "$TMP/fair-cubic.json")
  share=$(python3 -c "t = $FM + $FC; print('%.2f' % ($FM / t) if t > 0 else '-')")
  ja=$(jain "$FM" "$FC")
  fair+=("$(printf '%-44s meshgate %4s (%s ACKs/MB) | wg-go+Cubic %4s (%s ACKs/MB) | meshgate share %s (target <= 2/3: %s) | Jain %s (target >= %s: %s) | queue drops: meshgate %s, wg-go+Cubic %s' \
    "(a) meshgate userspace ($mg_cc) vs wg-go+Cubic" "$FM" "$(acks_per_mb "$s0" "$s1" pair1_)" "$FC" "$(acks_per_mb "$s0" "$s1" pair0_)" \
    "$share" "$(verdict "$share" le "$TARGET_FAIR_SHARE")" "$ja" "$TARGET_FAIR_JAIN" "$(verdict "$ja" ge "$TARGET_FAIR_JAIN")" \
    "$(drops pair1_forth_queue_full)" "$(drops pair0_forth_queue_full)")")

  say "fairness (b): two meshgate userspace flows together"
  s0=$(relay_snap "$fs")
  fair_iperf "$TMP/fair-mg2.json" 127.0.0.1 -p 5201 -P 2; p1=$LAST
  wait "$p1" || true
  s1=$(relay_snap "$fs")
  F1=$(mbps_of "$TMP/fair-mg2.json" 0); F2=$(mbps_of "$TMP/fair-mg2.json" 1)
  jb=$(jain "$F1" "$F2")
  fair+=("$(printf '%-44s flow 1 %4s | flow 2 %4s | Jain %s (target >= %s: %s) | both: %s ACKs/MB, queue drops %s' \
    "(b) meshgate userspace ($mg_cc) x2" "$F1" "$F2" "$jb" "$TARGET_SELF_JAIN" "$(verdict "$jb" ge "$TARGET_SELF_JAIN")" \
    "$(acks_per_mb "$s0" "$s1" pair1_)" "$(drops pair1_forth_queue_full)")")
  stop_meshgate
  stop_relays
fi

if [[ ${#results[@]} -gt 0 ]]; then
  cat <<EOF

== meshgate WAN benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, iperf3 ${DURATION}s single stream, Mbps) ==
path: wanrelay (delay each way, random loss, bottleneck $RATE with a $QUEUE queue); cores = CPU of both meshgate processes and their helpers;
MiB per 1,000 conns = RSS both meshgate processes (and helpers) add while 1,000 tunnelled connections are held open (measured once per engine, first row);
ACKs/MB = tunnel datagrams B sent back per MB of tunnel datagrams it received (relay counters; '-' without a relay)
EOF
  printf '%s\n' "${results[@]}"
fi
if [[ ${#fair[@]} -gt 0 ]]; then
  cat <<EOF

== fairness at a shared bottleneck ($(date -u '+%Y-%m-%d %H:%M UTC'), iperf3 ${FAIR_DURATION}s, flows started together, receiver Mbps) ==
path: one wanrelay, $FAIR_RATE bottleneck, $FAIR_DELAY each way, $FAIR_QUEUE-byte queue (one BDP), no random loss; Jain = (x1+x2)^2 / (2 (x1^2+x2^2))
EOF
  printf '%s\n' "${fair[@]}"
fi
