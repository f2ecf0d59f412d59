#!/usr/bin/env bash
# A fleet on etcd: three meshgate nodes on one etcd prefix (Debian's
# etcd-server, started here on loopback). Prints, from one run:
#   - config propagation: `meshgatectl apply` of 1, 100 and 10,000 new
#     tenant documents -> every node runs them (ms);
#   - RSS of a node holding those 10,101 tenants from etcd, against the
#     same documents from a config directory (the ratio);
#   - failover: SIGKILL of the node holding 1, then 1,000 `replicas: 1`
#     tenants -> the other nodes run all of them (lease_ttl 10 s, the
#     default: the target is within it).
#
#   bench/fleet.sh                          # builds release binaries (feature etcd)
#   MESHGATE_BIN=target/release/meshgate BENCH_MANY=2000 bench/fleet.sh
#
# Needs etcd and etcdctl (apt-get install etcd-server etcd-client) and
# python3; no root.
set -euo pipefail

MANY=${BENCH_MANY:-10000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
say() { printf '[fleet] %s\n' "$*" >&2; }
die() { printf 'bench/fleet.sh: error: %s\n' "$*" >&2; exit 1; }
for t in etcd etcdctl python3; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install etcd-server etcd-client python3)"
done
if [[ -z ${MESHGATE_BIN:-} ]]; then
  say "building release binaries (feature etcd)"
  (cd "$ROOT" && cargo build --release --features etcd --bins -q) >&2 || die "cargo build failed"
  MESHGATE_BIN=$ROOT/target/release/meshgate
fi
CTL=${MESHGATECTL_BIN:-$(dirname "$MESHGATE_BIN")/meshgatectl}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

TMP=$(mktemp -d)
cleanup() {
  pkill -P $$ 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
exec python3 - "$MESHGATE_BIN" "$CTL" "$TMP" "$MANY" <<'PY'
import json, os, signal, socket, subprocess, sys, time, urllib.request

mg, ctl, tmp, many = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def say(*a):
    print("[fleet]", *a, file=sys.stderr, flush=True)

cport, pport = port(), port()
etcd = subprocess.Popen(
    ["etcd", "--name", "b", "--data-dir", f"{tmp}/etcd",
     "--listen-client-urls", f"http://127.0.0.1:{cport}", "--advertise-client-urls", f"http://127.0.0.1:{cport}",
     "--listen-peer-urls", f"http://127.0.0.1:{pport}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
     "--initial-cluster", f"b=http://127.0.0.1:{pport}",
     # One transaction carries a whole directory.
     "--max-txn-ops", str(2 * many + 1000), "--max-request-bytes", str(64 << 20)],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"etcd://127.0.0.1:{cport}/mg"
env = dict(os.environ, ETCDCTL_API="3")
for _ in range(200):
    if subprocess.run(["etcdctl", "--endpoints", f"http://127.0.0.1:{cport}", "endpoint", "health"],
                      env=env, capture_output=True).returncode == 0:
        break
    time.sleep(0.05)
else:
    sys.exit("etcd did not start")

cfg = f"{tmp}/cfg"
os.makedirs(f"{cfg}/tenants")
os.makedirs(f"{cfg}/nodes")
os.makedirs(f"{cfg}/placement")
nodes = {}
for n in ["n1", "n2", "n3"]:
    a = port()
    with open(f"{cfg}/nodes/{n}.yaml", "w") as f:
        f.write(f"admin: 127.0.0.1:{a}\nlog: warn\n")
    nodes[n] = {"admin": a}

def apply():
    r = subprocess.run([ctl, "apply", cfg, "--etcd", url], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"meshgatectl apply: {r.stderr}")

def vnet(t, i):
    os.makedirs(f"{cfg}/tenants/{t}", exist_ok=True)
    with open(f"{cfg}/tenants/{t}/net.yaml", "w") as f:
        f.write(f"kind: vnet\nroutes:\n  - to: 10.{i // 250 % 250}.{i % 250}.0/24\n    via: direct\n")

def get(a, path, timeout=5):
    with urllib.request.urlopen(f"http://127.0.0.1:{a}{path}", timeout=timeout) as r:
        return json.load(r)

def tenants(a):
    try:
        return len(get(a, "/api/v1/tenants"))
    except Exception:
        return -1

def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS"):
                return int(l.split()[1]) / 1024
    return 0

apply()
for n, v in nodes.items():
    v["p"] = subprocess.Popen([mg, "--store", url, "--node-name", n],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for v in nodes.values():
    while tenants(v["admin"]) < 0:
        time.sleep(0.05)

# Propagation.
total, next_i = 0, 0
results = []
for count in [1, 100, many]:
    for _ in range(count):
        vnet(f"t{next_i}", next_i); next_i += 1
    total += count
    t0 = time.monotonic()
    apply()
    wrote = time.monotonic() - t0
    pending = set(nodes)
    while pending:
        for n in list(pending):
            if tenants(nodes[n]["admin"]) >= total:
                pending.discard(n)
        if time.monotonic() - t0 > 300:
            sys.exit(f"{count} documents not applied on {pending} within 300 s")
        time.sleep(0.005 if count < 1000 else 0.1)
    took = time.monotonic() - t0
    results.append((count, wrote, took))
    say(f"{count} documents: applied on 3 nodes after {took*1000:.0f} ms")

# RSS: etcd store against a directory with the same documents.
time.sleep(2)
rss_etcd = sum(rss(v["p"].pid) for v in nodes.values()) / 3
dcfg = f"{tmp}/dircfg"
os.makedirs(dcfg)
os.symlink(f"{cfg}/tenants", f"{dcfg}/tenants")
da = port()
with open(f"{dcfg}/meshgate.yaml", "w") as f:
    f.write(f"admin: 127.0.0.1:{da}\nlog: warn\n")
dp = subprocess.Popen([mg, "--config-dir", dcfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while tenants(da) < total:
    time.sleep(0.1)
time.sleep(2)
rss_dir = rss(dp.pid)
dp.terminate(); dp.wait()

# Failover of 1 and of 1,000 replicas: 1 tenants.
def holds():
    r = subprocess.run([ctl, "fleet", "status", "--store", url, "--json"], capture_output=True, text=True)
    return {n["node"]: (n["alive"], len(n.get("holds", []))) for n in json.loads(r.stdout)["nodes"]}

fail = []
alive = dict(nodes)
for count in [1, 1000]:
    base = next_i
    for _ in range(count):
        t = f"f{next_i}"
        vnet(t, next_i); next_i += 1
        with open(f"{cfg}/placement/{t}.yaml", "w") as f:
            f.write("replicas: 1\n")
    apply()
    deadline = time.monotonic() + 60
    while True:
        h = holds()
        held = sum(c for n, (a, c) in h.items() if n in alive)
        if held >= count + sum(x[0] for x in fail):
            break
        if time.monotonic() > deadline:
            sys.exit(f"the {count} replicas: 1 tenants were not all placed: {h}")
        time.sleep(0.2)
    expect = held
    victim = max((n for n in alive), key=lambda n: h[n][1])
    moved = h[victim][1]
    alive[victim]["p"].send_signal(signal.SIGKILL)
    alive[victim]["p"].wait()
    t0 = time.monotonic()
    del alive[victim]
    while True:
        h = holds()
        if victim not in h or not h[victim][0]:
            held = sum(c for n, (a, c) in h.items() if n in alive)
            if held >= expect:
                break
        if time.monotonic() - t0 > 60:
            sys.exit(f"failover of {count} not done in 60 s: {h}")
        time.sleep(0.05)
    took = time.monotonic() - t0
    fail.append((count, moved, took))
    say(f"failover: {moved} of {count} tenants moved off a killed node in {took:.2f} s")

print()
print("meshgate fleet on etcd (3 nodes, one etcd on loopback)")
print(f"{'documents applied':<28}{'write (ms)':>12}{'on 3 nodes (ms)':>18}")
for c, w, t in results:
    print(f"{c:<28}{w*1000:>12.0f}{t*1000:>18.0f}")
print()
print(f"RSS with {total} tenants: etcd store {rss_etcd:.0f} MiB, directory {rss_dir:.0f} MiB, ratio {rss_etcd/rss_dir:.2f}")
print()
print(f"{'replicas: 1 tenants':<28}{'on killed node':>16}{'all running again (s)':>24}")
for c, m, t in fail:
    print(f"{c:<28}{m:>16}{t:>24.2f}")
print("(lease_ttl 10 s, the default: a dead node's tenants run elsewhere within it)")
for v in alive.values():
    v["p"].terminate()
etcd.terminate()
PY
