#!/usr/bin/env bash
# `meshgate run -- CMD` between two network namespaces: A runs meshgate
# and the command, B an iperf3 server at 10.251.0.1. In one run:
#   - the time `meshgate run -- true` takes (start the tenant, make the
#     namespace, run a command that exits, tear down), median of 10;
#   - one iperf3 stream from A to B: direct, through a `kind: pipe` in A
#     (the same tenant, splice between two kernel sockets), and from inside
#     `meshgate run` (the namespace's kernel TCP -> TUN -> meshgate's
#     userspace TCP -> a kernel socket), as ratios to direct and to the
#     pipe, with meshgate's CPU per Gbit/s;
#   - 8 parallel streams the same three ways.
#
#   bench/run.sh                                     # builds a release binary
#   MESHGATE_BIN=target/release/meshgate bench/run.sh
#
# Needs root (namespaces; meshgate itself runs as root here, which `run`
# does not need), iperf3, python3. Knobs: BENCH_DURATION (default 10),
# BENCH_KEEP=1.
set -euo pipefail

DURATION=${BENCH_DURATION:-10}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[run] %s\n' "$*" >&2; }
die() { printf 'bench/run.sh: error: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
for t in iperf3 python3 ip; do
  command -v "$t" >/dev/null || die "'$t' not found: apt-get install -y iperf3 python3 iproute2"
done
if [[ -z ${MESHGATE_BIN:-} ]]; then
  say "building the release binary"
  (cd "$ROOT" && cargo build --release --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN=$ROOT/target/release/meshgate
fi
MESHGATE_BIN=$(readlink -f "$MESHGATE_BIN")
[[ -x $MESHGATE_BIN ]] || die "$MESHGATE_BIN is not an executable"

TMP=$(mktemp -d); chmod 755 "$TMP"
A=mgra$$; B=mgrb$$
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
ip link add "ra$$" type veth peer name "rb$$"
ip link set "ra$$" netns "$A"; ip link set "rb$$" netns "$B"
ip -n "$A" addr add 10.251.0.2/24 dev "ra$$"; ip -n "$B" addr add 10.251.0.1/24 dev "rb$$"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set "ra$$" up; ip -n "$B" link set "rb$$" up
inA() { ip netns exec "$A" "$@"; }
inB() { ip netns exec "$B" "$@"; }

cd "$TMP"
mkdir -p cfg/tenants/bench
printf 'admin: off\nlog: warn\ndrain_timeout: 1s\n' > cfg/meshgate.yaml
printf 'kind: vnet\ndefault: true\nroutes:\n  - to: 10.251.0.0/24\n    via: direct\n' > cfg/tenants/bench/net.yaml
printf 'kind: pipe\nlisten: 127.0.0.1:5202\nremote: 10.251.0.1:5201\n' > cfg/tenants/bench/iperf.yaml
inB iperf3 -s -p 5201 >/dev/null 2>&1 &
sleep 0.5

# Startup: `meshgate run -- true`, median of 10.
times=()
for _ in $(seq 10); do
  t0=$(date +%s%N)
  inA "$MESHGATE_BIN" --config-dir cfg run --tenant bench -- true
  times+=($(( ($(date +%s%N) - t0) / 1000000 )))
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 5p)

gbps() { python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'; }
# ticks PID: user+system ticks of a process (all its threads) so far.
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
HZ=$(getconf CLK_TCK)

row() { # row NAME STREAMS
  local streams=$2 direct pipe run cpu_pipe cpu_run mg t0 t1 out
  direct=$(inA iperf3 -c 10.251.0.1 -p 5201 -t "$DURATION" -P "$streams" -J | gbps)
  inA "$MESHGATE_BIN" --config-dir cfg >/dev/null 2>&1 &
  local job=$!
  for _ in $(seq 50); do inA python3 -c 'import socket; socket.create_connection(("127.0.0.1",5202),0.2)' 2>/dev/null && break; sleep 0.1; done
  mg=$(pgrep -n -f -- "$MESHGATE_BIN --config-dir cfg\$")
  t0=$(ticks "$mg")
  pipe=$(inA iperf3 -c 127.0.0.1 -p 5202 -t "$DURATION" -P "$streams" -J | gbps)
  t1=$(ticks "$mg")
  cpu_pipe=$(python3 -c "print('%.2f' % (($t1-$t0)/$HZ/$DURATION))")
  kill "$mg"; wait "$job" 2>/dev/null || true
  rm -f cfg/tenants/bench/iperf.yaml.off
  mv cfg/tenants/bench/iperf.yaml cfg/tenants/bench/iperf.yaml.off
  out=$TMP/run.json
  inA "$MESHGATE_BIN" --config-dir cfg run --tenant bench -- iperf3 -c 10.251.0.1 -p 5201 -t "$DURATION" -P "$streams" -J > "$out" &
  job=$!
  sleep 0.5
  # `ip netns exec` execs meshgate: the same process; sample its ticks
  # until it is gone (the iperf3 run is its last DURATION seconds).
  mg=$(pgrep -n -f -- "--config-dir cfg run --tenant bench" || true)
  t0=$(ticks "$mg"); t1=$t0
  while [[ -n $mg && -e /proc/$mg ]]; do v=$(ticks "$mg"); [[ $v -gt 0 ]] && t1=$v; sleep 0.2; done
  wait "$job" || true
  run=$(gbps < "$out")
  cpu_run=$(python3 -c "print('%.2f' % (($t1-$t0)/$HZ/$DURATION))")
  mv cfg/tenants/bench/iperf.yaml.off cfg/tenants/bench/iperf.yaml
  python3 - "$1" "$direct" "$pipe" "$run" "$cpu_pipe" "$cpu_run" <<'PY'
import sys
name, direct, pipe, run, cpu_pipe, cpu_run = sys.argv[1], *map(float, sys.argv[2:])
print(f"{name:<10} direct {direct:6.2f} Gbit/s | pipe {pipe:6.2f} ({pipe/direct:4.2f}x direct) | run {run:6.2f} ({run/direct:4.2f}x direct, {run/pipe:4.2f}x pipe)")
print(f"{'':<10} meshgate CPU: pipe {cpu_pipe:.2f} core ({cpu_pipe/pipe:.2f}/Gbit/s), run {cpu_run:.2f} core ({cpu_run/max(run,0.01):.2f}/Gbit/s)")
PY
}

echo "meshgate run -- true: median ${median} ms (of ${times[*]})"
row "1 stream" 1
row "8 streams" 8
