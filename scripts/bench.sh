#!/usr/bin/env bash
# The benchmark: the SCM and Mosquitto (mutual TLS MQTT) side by side on the same
# workloads, in one run on this machine (see docs/benchmarks.md and bench/README.md).
#
#   scripts/bench.sh            full run (about 3 minutes after the build); writes docs/benchmarks.md
#   scripts/bench.sh --quick    smoke run (CI, under 2 minutes); writes no report
#
# Builds release binaries (BENCH_PROFILE=dev: debug ones, for the smoke run), installs
# Debian's mosquitto if it is missing, raises the open-file limit, and runs scm-bench
# pinned to CPU 1 (the servers it starts are pinned to CPU 0).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${BENCH_PROFILE:-release}
quick=0
for a in "$@"; do
    if [ "$a" = "--quick" ]; then quick=1; fi
done
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto (Debian package)"
    apt-get install -y --no-install-recommends mosquitto >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends mosquitto >/dev/null; }
fi
if [ "$profile" = "release" ]; then
    cargo build --release -p scm -p scm-bench
    bin=target/release
else
    cargo build -p scm -p scm-bench
    bin=target/debug
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
args=(--scm-bin "$bin/scm" --command "scripts/bench.sh${*:+ $*}")
if [ "$quick" = 0 ]; then
    args+=(--out docs/benchmarks.md)
fi
pin=(taskset -c 1)
if [ "$(nproc)" -lt 2 ]; then
    echo "warning: fewer than 2 CPUs; the server and the load generator share CPU 0" >&2
    pin=(taskset -c 0)
fi
if [ "$(id -u)" = 0 ]; then
    pin=(nice -n -15 "${pin[@]}")
fi
exec "${pin[@]}" "$bin/scm-bench" "${args[@]}" "$@"
