#!/usr/bin/env bash
# SSH door on loopback: one iperf3 stream through an `ssh -L` forward into
# meshgate's SSH door, against the same forward through OpenSSH's own sshd
# on the same machine, with the same cipher, from one run; and `ssh -W`
# one-shot sessions per second through each.
#
#   bench/ssh.sh                                    # builds release binaries
#   MESHGATE_BIN=target/release/meshgate bench/ssh.sh
#
# Needs root (sshd runs as root with its own config; nothing of the host's
# sshd is touched), iperf3, ssh, sshd. Knobs: BENCH_DURATION (default 10),
# BENCH_SESSIONS (default 50), BENCH_KEEP=1. Target (issue): >= 1.0x sshd.
set -euo pipefail

DURATION=${BENCH_DURATION:-10}
SESSIONS=${BENCH_SESSIONS:-50}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[ssh] %s\n' "$*" >&2; }
die() { printf 'bench/ssh.sh: error: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (to run a private sshd)"
SSHD=/usr/sbin/sshd
for t in iperf3 ssh ssh-keygen python3 "$SSHD"; do
  command -v "$t" >/dev/null || die "'$t' not found: apt-get install -y iperf3 openssh-client openssh-server"
done
if [[ -z ${MESHGATE_BIN:-} ]]; then
  say "building release binaries"
  (cd "$ROOT" && cargo build --release --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN=$ROOT/target/release/meshgate
fi

TMP=$(mktemp -d); chmod 755 "$TMP"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}" $(cat "$TMP/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IPERF=$(free_port); MG=$(free_port); SD=$(free_port); ADMIN=$(free_port)

ssh-keygen -q -t ed25519 -N '' -C bench -f "$TMP/user"
ssh-keygen -q -t ed25519 -N '' -f "$TMP/sshd_host"
cp "$TMP/user.pub" "$TMP/authorized_keys"
mkdir -p /run/sshd "$TMP/cfg/tenants/bench"
cat > "$TMP/sshd_config" <<EOF
Port $SD
ListenAddress 127.0.0.1
HostKey $TMP/sshd_host
AuthorizedKeysFile $TMP/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
PidFile none
AllowTcpForwarding yes
EOF
"$SSHD" -D -e -f "$TMP/sshd_config" > "$TMP/sshd.log" 2>&1 & SSHD_PID=$!; PIDS+=($!)
printf 'admin: 127.0.0.1:%s\nlog: warn\n' "$ADMIN" > "$TMP/cfg/meshgate.yaml"
# iperf3 is on loopback: an SSH user reaches it only through a route that names it.
printf 'kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n' > "$TMP/cfg/tenants/bench/default.yaml"
cat > "$TMP/cfg/tenants/bench/ssh.yaml" <<EOF
kind: ssh
listen: 127.0.0.1:$MG
host_key_file: $TMP/mg_host
authorized_keys_file: $TMP/authorized_keys
EOF
"$MESHGATE_BIN" --config-dir "$TMP/cfg" > "$TMP/meshgate.log" 2>&1 & MG_PID=$!; PIDS+=($!)
iperf3 -s -B 127.0.0.1 -p "$IPERF" > "$TMP/iperf.log" 2>&1 & PIDS+=($!)
sleep 1

SSH_OPTS=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o LogLevel=ERROR -i "$TMP/user")
forward() { # forward PORT CIPHER -> local port (an ssh -L in the background)
  local lport; lport=$(free_port)
  # Not a child of this $(...): its pid goes to a file for the cleanup,
  # and its output elsewhere so the substitution returns.
  ssh "${SSH_OPTS[@]}" -c "$2" -p "$1" -N -o ExitOnForwardFailure=yes -L "127.0.0.1:$lport:127.0.0.1:$IPERF" root@127.0.0.1 \
    >"$TMP/fwd-$lport.log" 2>&1 </dev/null &
  echo $! >> "$TMP/pids"
  for _ in $(seq 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$lport),1)" 2>/dev/null && break; sleep 0.1; done
  echo "$lport"
}
iperf() { # iperf PORT -> Gbps
  timeout $((DURATION + 30)) iperf3 -c 127.0.0.1 -p "$1" -t "$DURATION" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo 0
}
ticks() { # ticks PID... -> CPU clock ticks (user + system) of them and their descendants
  local sum=0 p c
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || continue
    # Fields after the command name, which is in parentheses.
    sum=$((sum + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    for c in $(pgrep -P "$p"); do sum=$((sum + $(ticks "$c"))); done
  done
  echo "$sum"
}
measure() { # measure SERVER_PID PORT CIPHER -> "Gbps server% client%" (CPU in % of one core)
  local lport client s0 c0 t0 gbps
  lport=$(forward "$2" "$3"); client=$(tail -n 1 "$TMP/pids")
  s0=$(ticks "$1"); c0=$(ticks "$client"); t0=$(date +%s.%N)
  gbps=$(iperf "$lport")
  python3 -c "import os; hz=os.sysconf('SC_CLK_TCK'); t=$(date +%s.%N)-$t0; print('$gbps %.0f %.0f' % (($(ticks "$1")-$s0)/hz/t*100, ($(ticks "$client")-$c0)/hz/t*100))"
}
ratio() { python3 -c "a,b=$1,$2; print('%.2f' % (a/b) if b else '-')"; }
sessions() { # sessions PORT -> ssh -W one-shots per second
  local t0 t1
  t0=$(date +%s.%N)
  for _ in $(seq "$SESSIONS"); do
    echo | ssh "${SSH_OPTS[@]}" -p "$1" -W "127.0.0.1:$IPERF" root@127.0.0.1 >/dev/null 2>&1 || true
  done
  t1=$(date +%s.%N)
  python3 -c "print('%.1f' % ($SESSIONS / ($t1 - $t0)))"
}

rows=()
for cipher in chacha20-poly1305@openssh.com aes128-gcm@openssh.com; do
  say "iperf3 ${DURATION}s through ssh -L ($cipher): sshd, meshgate"
  read -r T_SD CPU_SD CLI_SD < <(measure "$SSHD_PID" "$SD" "$cipher")
  read -r T_MG CPU_MG CLI_MG < <(measure "$MG_PID" "$MG" "$cipher")
  rows+=("$(printf '%-32s sshd %6s Gbps | meshgate %6s Gbps (%sx sshd; target >= 1.0x)' "$cipher" "$T_SD" "$T_MG" "$(ratio "$T_MG" "$T_SD")")")
  rows+=("$(printf '%-32s CPU, %% of one core: sshd %s, its ssh client %s | meshgate %s, its ssh client %s' "" "$CPU_SD" "$CLI_SD" "$CPU_MG" "$CLI_MG")")
done
say "ssh -W one-shot sessions ($SESSIONS each)"
S_SD=$(sessions "$SD")
S_MG=$(sessions "$MG")

cat <<EOF

== meshgate SSH door benchmark (loopback, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores) ==
EOF
printf '%s\n' "${rows[@]}"
echo "ssh -W sessions/s                sshd $S_SD | meshgate $S_MG ($(ratio "$S_MG" "$S_SD")x)"
