#!/usr/bin/env bash
# Idle cost at scale: N tenants (default 10,000), each one WireGuard
# instance with 10 peers and no traffic. Prints, from one run: the time
# until /readyz answers 200, the RSS once ready, and the CPU meshgate
# burns while nothing happens (over BENCH_IDLE seconds, default 20).
#
#   bench/scale.sh                                  # builds release binaries
#   MESHGATE_BIN=target/release/meshgate BENCH_TENANTS=2000 bench/scale.sh
#   BENCH_SHARE_PORT=1 BENCH_TENANTS=100000 bench/scale.sh   # one UDP port for all
#
# No root needed: every instance listens on an ephemeral UDP port on the
# host (or, with BENCH_SHARE_PORT=1, all share one port: share_port: true)
# and serves no UAPI socket. Targets: at 10,000 tenants ready < 10 s,
# RSS < 1 GiB; at 100,000 on a shared port ready < 30 s, RSS < 4 GiB; idle
# CPU < 5% of a core. The cost of a handshake on a shared port of 100,000
# instances is bench/port.sh's.
set -euo pipefail

TENANTS=${BENCH_TENANTS:-10000}
IDLE=${BENCH_IDLE:-20}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[scale] %s\n' "$*" >&2; }
die() { printf 'bench/scale.sh: error: %s\n' "$*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 not found"
if [[ -z ${MESHGATE_BIN:-} ]]; then
  say "building release binaries"
  (cd "$ROOT" && cargo build --release --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN=$ROOT/target/release/meshgate
fi

TMP=$(mktemp -d)
PID=""
cleanup() {
  [[ -n $PID ]] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
ADMIN=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

SHARE=${BENCH_SHARE_PORT:-}
MODE="a UDP port each"
if [[ -n $SHARE ]]; then
  MODE="one shared UDP port"
  PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  say "writing $TENANTS tenants (one WireGuard instance with 10 peers each, all on UDP port $PORT)"
else
  say "writing $TENANTS tenants (one WireGuard instance with 10 peers each, each its own port)"
fi
mkdir -p "$TMP/cfg/tenants"
printf 'admin: 127.0.0.1:%s\nlog: warn\n' "$ADMIN" > "$TMP/cfg/meshgate.yaml"
# Every instance has its own private key (a shared port refuses the same
# key twice); any 32 random bytes are a WireGuard private key.
python3 - "$TMP/cfg/tenants" "$TENANTS" "${PORT:-}" <<'PY'
import base64, os, sys
root, n, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def key():
    return base64.b64encode(os.urandom(32)).decode()
# Peers' public keys: random 32 bytes stand in (the peers never connect).
peers = "".join(
    f"  - name: p{i}\n    public_key: {key()}\n    allowed_ips: [10.0.0.{i + 1}/32]\n"
    for i in range(1, 11))
port_keys = f"listen_port: {port}\nshare_port: true\n" if port else ""
for t in range(1, n + 1):
    d = os.path.join(root, f"t{t}")
    os.mkdir(d)
    with open(os.path.join(d, "wg0.yaml"), "w") as f:
        f.write(f"kind: wireguard\nprivate_key: {key()}\naddress: 10.0.0.1/24\n"
                f"uapi: off\n{port_keys}peers:\n{peers}")
PY

say "starting meshgate"
T0=$(date +%s.%N)
"$MESHGATE_BIN" --config-dir "$TMP/cfg" > "$TMP/meshgate.log" 2>&1 &
PID=$!
until python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$ADMIN/readyz', timeout=1).status == 200 else 1)" 2>/dev/null; do
  kill -0 "$PID" 2>/dev/null || { tail -5 "$TMP/meshgate.log"; die "meshgate exited"; }
  sleep 0.2
done
T1=$(date +%s.%N)
READY=$(python3 -c "print('%.1f' % ($T1 - $T0))")
RSS=$(awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$PID/status")
say "ready in ${READY}s; measuring idle CPU for ${IDLE}s"
HZ=$(getconf CLK_TCK)
C0=$(awk '{print $14 + $15}' "/proc/$PID/stat")
sleep "$IDLE"
C1=$(awk '{print $14 + $15}' "/proc/$PID/stat")
CPU=$(python3 -c "print('%.1f' % (100 * ($C1 - $C0) / $HZ / $IDLE))")

cat <<EOF

== meshgate idle cost at scale ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores) ==
$TENANTS tenants x 1 WireGuard instance x 10 peers, no traffic, $MODE
ready     ${READY} s   (target < 10 s at 10,000; < 30 s at 100,000)
RSS       ${RSS} MiB  (target < 1024 MiB at 10,000; < 4096 MiB at 100,000)
idle CPU  ${CPU}% of one core  (target < 5%)
EOF
