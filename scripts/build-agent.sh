#!/usr/bin/env bash
# Builds the agent binary into its own target directory (so a test can run
# this while `cargo test` holds the lock of the main one). Prints its path.
# PROFILE=release for an optimised build (the demo); debug by default.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=target/agent
profile="${PROFILE:-debug}"
if [ "$profile" = release ]; then
  cargo build --quiet --release -p acme-agent --bin acme-agent --target-dir "$target_dir"
else
  cargo build --quiet -p acme-agent --bin acme-agent --target-dir "$target_dir"
fi
echo "$target_dir/$profile/acme-agent"
