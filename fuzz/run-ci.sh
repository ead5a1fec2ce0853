#!/usr/bin/env bash
# The CI fuzz step: builds every cargo-fuzz target once (stable toolchain with
# RUSTC_BOOTSTRAP=1 for -Zsanitizer=address; libFuzzer's C++ needs a C++ compiler), replays
# every regression fixture under fuzz/regressions/<target>/, then runs each target for
# FUZZ_SECONDS (default 10) seeded from the malformed-input tables (integration-tests/tables,
# written out by the `table-seeds` binary) plus the regression fixtures. Fails on any crash,
# leak, timeout or out-of-memory (the config and certificate targets are seeded from an
# `scm init-dev` set-up); a crashing input is kept under $FUZZ_OUT/artifacts.
#
#   bash fuzz/run-ci.sh                 # all targets, 10 s each
#   FUZZ_SECONDS=300 bash fuzz/run-ci.sh frame_decoder telnet_codec   # longer, some targets
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${FUZZ_SECONDS:-10}
out=${FUZZ_OUT:-$(mktemp -d)}
mkdir -p "$out"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || {
  echo "libFuzzer needs a C++ compiler: apt-get install g++" >&2
  exit 1
}

# Seeds from the malformed-input tables. Built with the same command as scripts/test.sh
# (and before RUSTC_BOOTSTRAP is set), so that the workspace build is reused as is.
cargo build --quiet --workspace --bins
debug=${CARGO_TARGET_DIR:-$root/target}/debug
"$debug/table-seeds" --out "$out/seeds"
# Configuration files and certificates of a development set-up seed the config and
# certificate targets (certificates as DER).
"$debug/scm" init-dev --out "$out/dev" --machines 1,2 >/dev/null
mkdir -p "$out/seeds/scm_config" "$out/seeds/agent_config" "$out/seeds/cert_identity"
cp "$out/dev/scm.toml" "$out/seeds/scm_config/"
cp "$out/dev/"agent-*.toml "$out/dev/backoffice.toml" "$out/seeds/agent_config/"
for pem in "$out/dev/"*.pem; do
  case $pem in *-key.pem) continue ;; esac
  sed '/-----/d' "$pem" | base64 -d >"$out/seeds/cert_identity/$(basename "$pem" .pem).der"
done

# Stable rustc ships the ASan runtime for x86_64-unknown-linux-gnu; the -Z flags that
# cargo fuzz passes are allowed with RUSTC_BOOTSTRAP=1 (nightly works too).
export RUSTC_BOOTSTRAP=1
# The bundled SQLite amalgamation (rusqlite, linked by the `scm` targets) has two
# function-local static arrays named `aiOff`; ASan's ODR check reports them although
# internal-linkage statics cannot violate the ODR. Every other ASan check stays on.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
triple=$(rustc -vV | sed -n 's/^host: //p')
started=$(date +%s)
# 16 codegen units: much faster to build, fuzzing speed is still ample for 10 s runs.
(cd fuzz && cargo fuzz build --codegen-units 16 --target "$triple")
bindir=$root/fuzz/target/$triple/release
echo "fuzz targets built in $(( $(date +%s) - started )) s"

mapfile -t all < <(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//')
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

failed=()
for t in "${targets[@]}"; do
  bin=$bindir/$t
  [ -x "$bin" ] || { echo "no fuzz target $t (have: ${all[*]})" >&2; exit 1; }
  seeds=$out/seeds/$t
  mkdir -p "$seeds" "$out/corpus/$t" "$out/artifacts/$t"
  regress=()
  if [ -d "fuzz/regressions/$t" ]; then
    mapfile -t regress < <(find "fuzz/regressions/$t" -type f | sort)
  fi
  if [ ${#regress[@]} -gt 0 ]; then
    echo "== $t: replaying ${#regress[@]} regression fixture(s) =="
    if ! "$bin" -runs=1 "${regress[@]}" >"$out/$t.replay.log" 2>&1; then
      tail -40 "$out/$t.replay.log"
      failed+=("$t (regression fixture)")
      continue
    fi
    cp "${regress[@]}" "$seeds/"
  fi
  echo "== $t: fuzzing ${secs} s from $(find "$seeds" -type f | wc -l) seeds =="
  if "$bin" -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
      "$out/corpus/$t" "$seeds" >"$out/$t.log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$out/$t.log" | tail -2 || true
  else
    tail -60 "$out/$t.log"
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing FAILED: ${failed[*]}; inputs under $out/artifacts, logs under $out" >&2
  exit 1
fi
echo "fuzzing passed: ${#targets[@]} target(s), ${secs} s each, in $(( $(date +%s) - started )) s"
