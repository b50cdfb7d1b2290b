#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test.
#
# As root it installs what the tests need when missing: xfsprogs and
# e2fsprogs for the real-kernel fault tests, fuse3 (fusermount3) for the
# FUSE-backed disks, prometheus (also promtool) and prometheus-alertmanager
# for the alerting end-to-end test, systemd (systemd-analyze) for the unit's
# verify and security checks, iptables for the cluster nemesis (a node cut
# off from its peers). Without root those tests print SKIPPED. CI sets
# DATANODE_REQUIRE_KERNEL_TESTS=1 so that a skip fails the run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
command -v mkfs.xfs >/dev/null 2>&1 || need_packages+=(xfsprogs)
command -v mkfs.ext4 >/dev/null 2>&1 || need_packages+=(e2fsprogs)
command -v fusermount3 >/dev/null 2>&1 || need_packages+=(fuse3)
command -v promtool >/dev/null 2>&1 || need_packages+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need_packages+=(prometheus-alertmanager)
command -v systemd-analyze >/dev/null 2>&1 || need_packages+=(systemd)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need_packages+=(iptables)
if [ "${#need_packages[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

# The shipped alert rules and their unit tests.
if command -v promtool >/dev/null 2>&1; then
    (cd config/prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml)
elif [ "${DATANODE_REQUIRE_KERNEL_TESTS:-}" = 1 ]; then
    echo "promtool is required (apt-get install prometheus)" >&2
    exit 1
else
    echo "SKIPPED: alert rule tests (promtool not installed; apt-get install prometheus)"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
