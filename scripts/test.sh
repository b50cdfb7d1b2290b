#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test.
#
# As root it installs what the real-kernel fault tests need (xfsprogs) when
# missing; without root those tests print SKIPPED. CI sets
# DATANODE_REQUIRE_KERNEL_TESTS=1 so that a skip fails the run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
command -v mkfs.xfs >/dev/null 2>&1 || need_packages+=(xfsprogs)
if [ "${#need_packages[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
