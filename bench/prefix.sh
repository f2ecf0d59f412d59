#!/usr/bin/env bash
# Longest-prefix match at 100,000 prefixes: PrefixTable (one hash map per
# prefix length) against the sorted linear scan it replaced, in one run.
# Prints build time and ns per lookup for both, and the ratio.
#
#   bench/prefix.sh                          # 100,000 prefixes, 1,000,000 lookups
#   BENCH_PREFIXES=1000000 bench/prefix.sh
#
# Needs only cargo (builds the bench in release mode).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -q --bench prefix
