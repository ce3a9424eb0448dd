#!/usr/bin/env bash
# Builds the agent binary into its own target directory (so a test can run
# this while `cargo test` holds the lock of the main one). Prints its path.
# PROFILE=release for an optimised build (the benchmarks); debug by default
# (the demo and the tests): target/agent/<profile>/acme-agent.
set -euo pipefail
cd "$(dirname "$0")/.."
# Called from inside `cargo test` too: drop the variables cargo set for the
# calling crate, or build scripts that watch them (ring's) rerun and the
# build is redone each time it is called from a different place.
unset CARGO_MANIFEST_DIR CARGO_MANIFEST_PATH CARGO_CRATE_NAME CARGO_PRIMARY_PACKAGE CARGO_TARGET_TMPDIR OUT_DIR
for v in $(compgen -e | grep -E '^CARGO_(PKG|BIN)_' || true); do unset "$v"; done
target_dir=target/agent
# The agent serves the filter built from the same commit (Istio fetches it).
ACME_FILTER_WASM="$PWD/$(scripts/build-filter.sh 2>/dev/null)"
export ACME_FILTER_WASM
profile="${PROFILE:-debug}"
if [ "$profile" = release ]; then
  cargo build --quiet --release -p acme-agent --bin acme-agent --target-dir "$target_dir"
else
  cargo build --quiet -p acme-agent --bin acme-agent --target-dir "$target_dir"
fi
echo "$target_dir/$profile/acme-agent"
