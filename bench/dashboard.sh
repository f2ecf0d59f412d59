#!/usr/bin/env bash
# The dashboard's live streams at scale: a node with 1,000 tenants and
# 10,000 live flows (UDP sessions through one tenant's pipe), then 1 and
# 32 clients of /api/v1/events?tenant=acme (the largest update: that
# tenant's 500 newest flows and every tenant's counts). Prints the admin
# thread's CPU (from /proc/PID/task/TID/stat) and the bytes the streams
# received per second: with every stream fed once a second, 32 streams get
# 32 times one stream's bytes.
#
#   bench/dashboard.sh                         # builds the release binary
#   MESHGATE_BIN=target/release/meshgate bench/dashboard.sh
#
# Needs cargo and python3; loopback only, no root.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${MESHGATE_BIN:-}
if [[ -z $BIN ]]; then
    (cd "$ROOT" && cargo build --release --bin meshgate >&2)
    BIN=$ROOT/target/release/meshgate
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
exec python3 - "$BIN" "$TMP" <<'PY'
import json, os, socket, subprocess, sys, threading, time, urllib.request
binary, tmp = sys.argv[1], sys.argv[2]
TOKEN = 'dashboard-bench-token-0123456789'
def free_port(kind):
    s = socket.socket(socket.AF_INET, kind); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p
admin, pipe = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sink.bind(('127.0.0.1', 0))
cfg = os.path.join(tmp, 'cfg')
def write(rel, text):
    p = os.path.join(cfg, rel); os.makedirs(os.path.dirname(p), exist_ok=True); open(p, 'w').write(text)
write('meshgate.yaml', f'node: bench\nadmin: 127.0.0.1:{admin}\nadmin_token: {TOKEN}\ndrain_timeout: 1s\nlog: warn\n')
for i in range(999):
    write(f'tenants/t{i:04}/net.yaml', 'kind: vnet\nroutes:\n  - to: 10.0.0.0/8\n    via: direct\n')
write('tenants/acme/udp.yaml', f'kind: pipe\nprotocol: udp\nlisten: 127.0.0.1:{pipe}\nremote: 127.0.0.1:{sink.getsockname()[1]}\nmax_connections: 20000\n')
p = subprocess.Popen([binary, '--config-dir', cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    def get(path):
        r = urllib.request.Request(f'http://127.0.0.1:{admin}{path}', headers={'Authorization': 'Bearer ' + TOKEN})
        return urllib.request.urlopen(r, timeout=10).read()
    for _ in range(150):
        try:
            get('/readyz'); break
        except Exception:
            time.sleep(0.2)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10000)]
    for c in clients:
        c.bind(('127.0.0.1', 0))
    for _ in range(60):
        for i, c in enumerate(clients):
            c.sendto(b'x', ('127.0.0.1', pipe))
            if i % 500 == 0:
                time.sleep(0.02)
        if json.loads(get('/api/v1/overview'))['flows_total'] >= 10000:
            break
    tid = next(t for t in os.listdir(f'/proc/{p.pid}/task')
               if open(f'/proc/{p.pid}/task/{t}/comm').read().strip() == 'meshgate-admin')
    def cpu():
        f = open(f'/proc/{p.pid}/task/{tid}/stat').read().rsplit(')', 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')
    print(f'== dashboard streams: 1,000 tenants, {json.loads(get("/api/v1/overview"))["flows_total"]} live flows ==')
    for n in (1, 32):
        held = []
        got = [0] * n
        for _ in range(n):
            s = socket.create_connection(('127.0.0.1', admin))
            s.sendall(f'GET /api/v1/events?tenant=acme HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n\r\n'.encode())
            held.append(s)
        def reader(i, s):
            while True:
                try:
                    d = s.recv(1 << 20)
                except OSError:
                    return
                if not d:
                    return
                got[i] += len(d)
        for i, s in enumerate(held):
            threading.Thread(target=reader, args=(i, s), daemon=True).start()
        time.sleep(2)
        c0, t0, g0 = cpu(), time.time(), sum(got)
        time.sleep(10)
        c1, t1, g1 = cpu(), time.time(), sum(got)
        print(f'{n:3d} streams: admin thread {100 * (c1 - c0) / (t1 - t0):4.0f}% of a core, streams received {(g1 - g0) / (t1 - t0) / 1e6:5.2f} MB/s')
        for s in held:
            s.close()
        time.sleep(2)
finally:
    p.terminate()
    p.wait()
PY
