#!/usr/bin/env bash
# The side-by-side benchmarks (docs/benchmarks.md): installs what is missing,
# builds the filter and the release agent, then runs every comparison on
# loopback, interleaved, and prints a markdown table (written nowhere: paste
# it into docs/benchmarks.md). About 12 minutes on 2 cores (lego alone takes
# most of it); `--quick` for fewer rounds, `--only <part>` for one part.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-filter.sh >/dev/null
PROFILE=release scripts/build-agent.sh >/dev/null
cargo run --quiet -p acme-tests --bin bench -- "$@"
