#!/usr/bin/env bash
# The disk's own limit for the WAL workloads, measured with fio alone:
# sync writes (write + fdatasync per block) into fresh and into already
# written space, at the block sizes of W1, W3 and W4 (see BENCHMARKS.md).
# (terse v3: field 48 is write KiB/s, 49 write IOPS.) `cargo bench --bench wal` runs the same jobs side by side with the WAL;
# this script is for checking a disk on its own.
#
#   benches/fio-baseline.sh [DIR] [SECONDS]
set -euo pipefail
dir=${1:-target/bench-data/fio}
seconds=${2:-5}
command -v fio >/dev/null || { echo "fio is not installed (apt-get install fio)" >&2; exit 1; }
mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT

run() { # name bs numjobs overwrite size
    fio --name="$1" --directory="$dir" --rw=write --bs="$2" --numjobs="$3" --overwrite="$4" \
        --size="$5" --ioengine=sync --fdatasync=1 --group_reporting --time_based --runtime="$seconds" \
        --output-format=terse --terse-version=3 |
        awk -F';' -v name="$1" '{ printf "%-28s %10.0f ops/s %10.1f MiB/s\n", name, $49, $48 / 1024 }'
    rm -f "$dir"/*
}

run "4KiB-overwrite"   4k 1 1 256m
run "4KiB-fresh"       4k 1 0 256m
run "64KiB-overwrite" 64k 1 1 1g
run "1MiB-overwrite"   1m 1 1 1g
run "1MiB-fresh"       1m 1 0 1g
for jobs in 4 16 64; do
    run "4KiB-x${jobs}-files-overwrite" 4k "$jobs" 1 16m
done
