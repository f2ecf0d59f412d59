#!/usr/bin/env bash
# Installs everything the tests need, then runs every check and test:
# formatting, clippy (all targets, all features) and the whole test suite with
# the real peers (nginx, curl, promtool, iperf3, wireguard-go, wg) required.
#
#   scripts/test.sh          # as root, or with sudo available for apt-get
#
# This is the command README.md gives and the one .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A PACKAGES=(
  [nginx]=nginx
  [curl]=curl
  [promtool]=prometheus
  [iperf3]=iperf3
  [haproxy]=haproxy
  [wireguard-go]=wireguard-go
  [wg]=wireguard-tools
  [ip]=iproute2
  [python3]=python3
  [pkill]=procps
  [ping]=iputils-ping
  [dnsmasq]=dnsmasq-base
  [unshare]=util-linux
  [iptables]=iptables
  [nft]=nftables
  [ssh]=openssh-client
  [ssh-keygen]=openssh-client
  [sshd]=openssh-server
  # The h2 door's second client (its built-in http2 module).
  [node]=nodejs
  # The etcd store's tests run Debian's etcd and write with its etcdctl;
  # etcd-client's build compiles etcd's protobufs with protoc.
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  [protoc]=protobuf-compiler
  # deploy/systemd is checked with systemd-analyze verify and security.
  [systemd-analyze]=systemd
  # ring and aws-lc-sys (russh's crypto) compile C.
  [cc]=build-essential
  # tests/deploy.rs makes the admin token the manifests ask for.
  [openssl]=openssl
  # The dashboard is loaded in headless Chromium, driven by Selenium.
  [chromium]=chromium
  [chromedriver]=chromium-driver
)

missing=()
for cmd in "${!PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGES[$cmd]}")
done
# The audit records' schema is checked with Python's jsonschema.
python3 -c 'import jsonschema' >/dev/null 2>&1 || missing+=(python3-jsonschema)
# (Debian's Python: tests/ui.rs runs /usr/bin/python3, whatever is first in PATH.)
/usr/bin/python3 -c 'import selenium' >/dev/null 2>&1 || missing+=(python3-selenium)
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The h2 door's first client: pycurl from PyPI, whose wheel brings libcurl 8
# with nghttp2 (HTTPS2 proxies; Debian's libcurl is older), into
# target/pydeps, where tests/h2.rs looks for it.
if ! PYTHONPATH=target/pydeps python3 -c 'import pycurl' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "installing pycurl into target/pydeps"
  python3 -m pip install --quiet --disable-pip-version-check --target target/pydeps pycurl
fi

# deploy/k8s is validated against the Kubernetes API's schemas by
# kubernetes-validate from PyPI (offline), into target/pydeps too.
if ! PYTHONPATH=target/pydeps python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "installing kubernetes-validate into target/pydeps"
  python3 -m pip install --quiet --disable-pip-version-check --target target/pydeps --upgrade kubernetes-validate
fi

if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

export MESHGATE_REQUIRE_TOOLS=1
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-features 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The end-to-end suites again with the kernel engine as the node's default
# (a TUN in an unnamed user+net namespace), where this machine allows it.
if ((status == 0)) && [[ $(id -u) -eq 0 ]] && [[ -c /dev/net/tun ]]; then
  echo "== cargo test (end-to-end suites, MESHGATE_NODE__ENGINE=kernel)"
  MESHGATE_NODE__ENGINE=kernel cargo test --all-features \
    --test netns_wireguard --test netns_vnets --test cloudgateway --test wireguard --test wg_uapi --test pipe 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

# Fuzz the parsers for a bounded time (issue: a few million executions, not
# a 24-hour run): the WireGuard datagram path on its socket-free core, the
# `wg` socket's protocol, config documents, IP packets, DNS answers, SOCKS and
# PROXY protocol headers.
# Needs a nightly toolchain (cargo fuzz uses sanitizers); skipped without one
# (the targets' bodies still ran over their seeds in `cargo test`).
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
if ((status == 0)) && ((FUZZ_SECONDS > 0)) && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked >/dev/null 2>&1
  flog="$(mktemp)"
  for target in wg_datagram uapi_parse config_documents ip_packets tcp_segments socks proxy_protocol http_proxy h2_request authorized_keys policy dns_query; do
    echo "== cargo fuzz run $target (${FUZZ_SECONDS}s)"
    set +e
    # New inputs go to fuzz/corpus/TARGET (not kept); the checked-in seeds
    # (also run on stable by tests/fuzz_seeds.rs) start it off.
    mkdir -p "fuzz/corpus/$target"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- -max_total_time="$FUZZ_SECONDS" >"$flog" 2>&1
    rc=$?
    set -e
    tail -n 3 "$flog"
    ((rc == 0)) || { echo "fuzz target $target failed (fuzz/artifacts/$target holds the input)"; status=1; }
  done
  rm -f "$flog"
else
  echo "== fuzzing skipped (needs a nightly toolchain and passing tests)"
fi
exit "$status"
