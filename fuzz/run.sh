#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/fuzz_targets with cargo-fuzz (libFuzzer,
# nightly toolchain), each for SECONDS; prints one line per target,
# "fuzz TARGET: passed (N runs)" or "fuzz TARGET: FAILED", and exits 1 if
# any failed (the crashing input is kept in fuzz/artifacts/TARGET).
#
#   fuzz/run.sh [--keep] [SECONDS] [TARGET...]
#
# The test command runs every target for a few seconds; run longer on
# demand (e.g. `fuzz/run.sh 600 crdt_ops`). New inputs go to a scratch
# corpus; the kept corpus (fuzz/corpus/TARGET, in git) is read, and only
# --keep merges what the run found into it (libFuzzer's -merge=1, which
# keeps only inputs that add coverage).
#
# Built without a sanitizer: the workspace forbids unsafe code, so
# AddressSanitizer would look for little but cost a second build of every
# dependency and half the speed; debug assertions and overflow checks are on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

keep=false
if [[ ${1:-} == --keep ]]; then keep=true; shift; fi
seconds=${1:-10}
shift || true
targets=("$@")

CARGO_FUZZ_VERSION=0.13.2
# Nightly and the workspace's stable builds do not share artifacts.
fuzz_target_dir=${STATEFABRIC_FUZZ_TARGET_DIR:-$HOME/.cache/statefabric/target-fuzz}
main_target_dir=${CARGO_TARGET_DIR:-$HOME/.cache/statefabric/target}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal >&2 \
    || { echo "fuzz: no nightly toolchain and rustup cannot install one" >&2; exit 1; }
fi
if [[ $(cargo fuzz --version 2>/dev/null) != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" >&2
fi

# Every clone builds the workspace's crates anew here (paths differ): start
# the cache afresh past 10 GiB rather than let it grow run by run.
if [[ -d $fuzz_target_dir ]] && (( $(du -s "$fuzz_target_dir" | cut -f1) > 10 * 1024 * 1024 )); then
  echo "fuzz: build cache over 10 GiB: cleaning it" >&2
  rm -rf "$fuzz_target_dir"
fi

# The state_api target talks to a real sidecar (the workspace's debug build).
(cd .. && CARGO_TARGET_DIR=$main_target_dir cargo build --quiet --locked -p statefabric-sidecar --bin statefabric-sidecar)
export STATEFABRIC_FUZZ_SIDECAR=$main_target_dir/debug/statefabric-sidecar

build=(--sanitizer none --debug-assertions --target-dir "$fuzz_target_dir")
cargo +nightly fuzz build "${build[@]}" >&2

if (( ${#targets[@]} == 0 )); then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target" "$scratch/$target"
  log=$scratch/$target.log
  # In a session of its own, so that what it started (the state_api
  # target's sidecar) is stopped with it; its temporary files in scratch.
  TMPDIR=$scratch setsid cargo +nightly fuzz run "${build[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 &
  session=$!
  status=0
  wait "$session" || status=$?
  kill -- -"$session" 2>/dev/null || true
  if (( status == 0 )); then
    runs=$(awk '/stat::number_of_executed_units:/ { print $2 }' "$log")
    echo "fuzz $target: passed (${runs:-?} runs in ${seconds}s)"
    if $keep; then
      cargo +nightly fuzz run "${build[@]}" "$target" "corpus/$target" "$scratch/$target" -- -merge=1 >/dev/null 2>&1
    fi
  else
    echo "fuzz $target: FAILED; the end of its log:"
    tail -n 40 "$log" | sed 's/^/  /'
    failed=$((failed + 1))
  fi
done
(( failed == 0 ))
