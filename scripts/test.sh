#!/usr/bin/env bash
# Every test of the workspace, on a fresh machine as on a warm one: installs
# what is missing (scripts/setup.sh), builds the filter, checks formatting and
# clippy, runs the native tests (wasmtime host, real Envoy), the year of
# renewals optimized, then the filter core's tests again in Node's V8.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# Incremental caches add gigabytes to a build that CI always starts clean
# (a full-disk CI run failed on them); a developer's own `cargo test` keeps them.
export CARGO_INCREMENTAL=0

step() { printf '\n== %s\n' "$*" >&2; }

step "build the filter (wasm32-wasip1, release)"
scripts/build-filter.sh

step "build the agent binary the end-to-end tests run"
scripts/build-agent.sh

step "build the real control plane the kube_real tests start (Go; cached by go.sum)"
# Cold: 4.5-6 min on 2 cores (docs/testing.md); then a no-op that prints the cached directory.
scripts/build-control-plane.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p acme-filter --target wasm32-wasip1 -- -D warnings

step "dependencies: licenses, sources, bans (deny.toml)"
# Advisories need the RustSec database from GitHub, which these machines do
# not reach; run 'cargo deny check advisories' where it can be fetched.
cargo deny check bans licenses sources

step "workspace tests"
# The year of renewals runs optimized, at full size, in the next step.
cargo test --workspace --all-targets -- --skip a_year_of_renewals

step "a year of renewals at 10,000 certificates (optimized: the sim profile)"
# Cold, the optimized build of the agent's dependencies takes ~5 min on 2
# cores (docs/testing.md); warm, the run takes about a minute.
cargo test --profile sim -p acme-agent --test year

step "filter core tests in V8 (wasm32-unknown-unknown, wasm-bindgen-test under Node)"
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  cargo test -p acme-filter-core --target wasm32-unknown-unknown --lib
