#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is missing,
# brings up the real services (testenv/up.sh), then formatting, lints, build
# and every test, then every fuzz target for a few seconds (fuzz/run.sh).
# Fails if any step fails or if no test ran.
#
#   scripts/test.sh           the suite on the services as they are
#   scripts/test.sh --fresh   first stops the services and deletes their data
#                             (testenv/down.sh --purge: databases, topics,
#                             connectors, subjects, the cluster's objects), so
#                             the run meets what a new user's machine has
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case ${1:-} in
  --fresh) testenv/down.sh --purge ;;
  "") ;;
  *) echo "usage: scripts/test.sh [--fresh]" >&2; exit 2 ;;
esac

# Build output outside the clone, so CI's fresh clone reuses earlier builds.
# Its own directory: the workspace is built instrumented for coverage here
# (below), which a plain build must not mistake for its own artifacts.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/statefabric/target-cov}
# CI builds once per run: incremental state would only grow the cache.
export CARGO_INCREMENTAL=0
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# The run fails when line coverage of the workspace (tests, benches and
# generated code excluded: tools/coverage) is under this many percent.
COVERAGE_FLOOR=${STATEFABRIC_COVERAGE_FLOOR:-85}
# The cache is shared by every run on this machine and the disk is not
# ours alone: past 30 GiB, start it afresh rather than fill the disk.
if [[ -d $CARGO_TARGET_DIR ]] && (( $(du -s "$CARGO_TARGET_DIR" | cut -f1) > 30 * 1024 * 1024 )); then
  echo "build cache over 30 GiB: cleaning it"
  cargo clean
fi

testenv/up.sh
# shellcheck disable=SC1091
. "${STATEFABRIC_ENV_DIR:-/var/tmp/statefabric-env}/env.sh"

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The embedded main job builds with nothing but the Rust toolchain: no
# librdkafka (cmake, curl and OpenSSL headers) in its dependency tree.
cargo check -p statefabric-cli --no-default-features --locked
if cargo tree -p statefabric-cli --no-default-features -e normal,build --locked | grep -qE 'rdkafka|openssl-sys'; then
  echo "fabric dev (--no-default-features) must not need librdkafka or OpenSSL" >&2
  exit 1
fi
# From here the workspace's own crates are built with coverage counters
# (scripts/coverage-rustc), and every process of the run — test binaries and
# the sidecars, control planes and CLIs they and the SDK suites start —
# writes them to a profile under $profiles: one run measures the coverage.
plain_rustflags=${RUSTFLAGS-}
export RUSTC_WRAPPER=$PWD/scripts/coverage-rustc
# Cargo's fingerprints do not see what the wrapper adds: this marker makes
# every artifact of these builds distinct from a plain build's, so neither
# is ever taken for the other.
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }--cfg statefabric_coverage"
profiles=$CARGO_TARGET_DIR/coverage/profiles
rm -rf "$profiles"; mkdir -p "$profiles"
# %8m: a pool of eight files per binary, merged into as processes exit, so
# a run that starts a thousand sidecars leaves a few dozen files.
export LLVM_PROFILE_FILE=$profiles/%8m.profraw
# The process tests drive the real binaries, found next to the test executables.
cargo build --workspace --bins --locked

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# The Python SDK: its stubs generated from proto/ while it is installed into
# the test venv (testenv/python-clients.txt), type-checked, and its pytest
# suite run against real sidecars (the binaries built above).
py_log=$(mktemp)
ts_log=$(mktemp)
trap 'rm -f "$log" "$py_log" "$ts_log"' EXIT
"$STATEFABRIC_TEST_PYTHON" -m pip install --quiet --disable-pip-version-check --no-build-isolation ./sdk/python
"$STATEFABRIC_TEST_PYTHON" -m mypy --config-file sdk/python/pyproject.toml \
  --cache-dir "$CARGO_TARGET_DIR/mypy" -p statefabric
set +e
(cd sdk/python && "$STATEFABRIC_TEST_PYTHON" -m pytest -p no:cacheprovider -q) 2>&1 | tee "$py_log"
py_status=${PIPESTATUS[0]}
set -e
if (( status == 0 )); then status=$py_status; fi

# The TypeScript SDK: dependencies by its lockfile, stubs generated from
# proto/ and compiled strictly (tsc), node's test runner against real
# sidecars.
(cd sdk/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
set +e
(cd sdk/typescript && npm test --silent) 2>&1 | tee "$ts_log"
ts_status=${PIPESTATUS[0]}
set -e
if (( status == 0 )); then status=$ts_status; fi
unset LLVM_PROFILE_FILE

# Line coverage of the run (tools/coverage): the profiles against the
# coverage maps of the binaries that wrote them, per crate; under the floor
# fails the run.
cov_objects=$(mktemp)
cov_log=$(mktemp)
trap 'rm -f "$log" "$py_log" "$ts_log" "$cov_objects" "$cov_log"' EXIT
{ cargo test --workspace --locked --no-run --message-format=json
  cargo build --workspace --bins --locked --message-format=json
} 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("reason") == "compiler-artifact" and message.get("executable"):
        print(message["executable"])' | sort -u > "$cov_objects"
cov_target=$HOME/.cache/statefabric/target-tools
CARGO_TARGET_DIR=$cov_target RUSTC_WRAPPER= RUSTFLAGS=$plain_rustflags cargo build -q --release --locked \
  --manifest-path tools/coverage/Cargo.toml
set +e
"$cov_target/release/statefabric-coverage" --root . --profiles "$profiles" \
  --objects "$cov_objects" --min "$COVERAGE_FLOOR" --worst 15 2>&1 | tee "$cov_log"
cov_status=${PIPESTATUS[0]}
set -e
if (( status == 0 )); then status=$cov_status; fi
unset RUSTC_WRAPPER
if [[ -n $plain_rustflags ]]; then export RUSTFLAGS=$plain_rustflags; else unset RUSTFLAGS; fi

# Every fuzz target for a few seconds (fuzz/run.sh; longer on demand).
fuzz_log=$(mktemp)
trap 'rm -f "$log" "$py_log" "$ts_log" "$cov_objects" "$cov_log" "$fuzz_log"' EXIT
set +e
fuzz/run.sh "${STATEFABRIC_FUZZ_SECONDS:-10}" 2>&1 | tee "$fuzz_log"
fuzz_status=${PIPESTATUS[0]}
set -e
if (( status == 0 )); then status=$fuzz_status; fi

# The topics, groups and tenants the tests made would otherwise pile up run
# after run.
testenv/prune-kafka.sh
testenv/prune-postgres.sh
testenv/prune-kubernetes.sh

# Sum the per-binary summaries: a green run that executed nothing is a failure.
read -r passed failed < <(
  {
    awk '/^test result:/ { p += $4; f += $6 } END { print p+0, f+0 }' "$log"
    # pytest's last line: "2 failed, 30 passed, 1 error in 20.1s".
    tail -n 1 "$py_log" | awk '{ for (i = 2; i <= NF; i++) { w = $i; sub(/,$/, "", w)
      if (w == "passed") p += $(i-1); if (w == "failed" || w ~ /^error/) f += $(i-1) } }
      END { print p+0, f+0 }'
    # node --test's summary: "# pass 27", "# fail 0".
    awk '/^# pass / { p = $3 } /^# fail / { f = $3 } END { print p+0, f+0 }' "$ts_log"
    awk '/^fuzz .*: passed/ { p++ } /^fuzz .*: FAILED/ { f++ } END { print p+0, f+0 }' "$fuzz_log"
  } | awk '{ p += $1; f += $2 } END { print p, f }'
)
echo "${passed} passed, ${failed} failed"
if (( status != 0 )); then
  exit "$status"
fi
if (( passed == 0 )); then
  echo "no test ran" >&2
  exit 1
fi
