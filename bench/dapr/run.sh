#!/usr/bin/env bash
# The State API against Dapr, side by side (bench/src/bin/dapr-peer-bench.rs):
# builds daprd once (cached outside the clone), our binaries as they ship
# (the `dist` profile: fat LTO, one codegen unit; the benchmark itself with
# --release), and runs the benchmark against the test environment's Postgres
# and Redis.
# Arguments go to the benchmark, e.g. `--seconds 4 --sets 1 --backends sqlite`.
# A command, not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash testenv/up.sh >/dev/null
# shellcheck disable=SC1091
. /var/tmp/statefabric-env/env.sh
daprd="$(bench/dapr/build-daprd.sh)"
export CARGO_TARGET_DIR="${STATEFABRIC_RELEASE_TARGET:-$HOME/.cache/statefabric/target-release}"
cargo build --profile dist -q -p statefabric-cli -p statefabric-sidecar
cargo build --release -q -p statefabric-bench --bin dapr-peer-bench
export STATEFABRIC_BENCH_BINARIES="$CARGO_TARGET_DIR/dist"
exec "$CARGO_TARGET_DIR/release/dapr-peer-bench" --daprd "$daprd" "$@"
