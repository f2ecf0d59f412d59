#!/usr/bin/env bash
# A shared WireGuard port (share_port) at 100,000 instances: join cost, and
# the cost of routing a datagram by session index, an initiation with a
# hint (one MAC1 check) and one without (a scan), against one MAC1 check
# measured in the same run.
#
#   bench/port.sh                            # 100,000 instances
#   BENCH_MEMBERS=10000 bench/port.sh
#
# Needs only cargo (builds the bench in release mode).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -q --bench port
