# Shared by every example (sourced, not run).

# meshgate_bin: the directory holding meshgate and meshgatectl
# ($MESHGATE_BIN_DIR, or a fresh release build of this checkout).
meshgate_bin() {
  if [[ -n "${MESHGATE_BIN_DIR:-}" ]]; then echo "$MESHGATE_BIN_DIR"; return; fi
  local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  (cd "$root" && cargo build --release --bins -q >&2)
  echo "$root/target/release"
}
