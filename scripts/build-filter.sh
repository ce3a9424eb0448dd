#!/usr/bin/env bash
# Builds the filter as shipped: release profile (opt-level z, LTO, strip) for
# wasm32-wasip1, then wasm-opt when binaryen is installed. Prints the path.
set -euo pipefail
cd "$(dirname "$0")/.."
# Called from inside `cargo test` too: drop the variables cargo set for the
# calling crate, or build scripts that watch them (ring's) rerun and the
# build is redone each time it is called from a different place.
unset CARGO_MANIFEST_DIR CARGO_MANIFEST_PATH CARGO_CRATE_NAME CARGO_PRIMARY_PACKAGE CARGO_TARGET_TMPDIR OUT_DIR
for v in $(compgen -e | grep -E '^CARGO_(PKG|BIN)_' || true); do unset "$v"; done
target_dir=target/filter
cargo build --quiet --release -p acme-filter --target wasm32-wasip1 --target-dir "$target_dir"
wasm="$target_dir/wasm32-wasip1/release/acme_filter.wasm"
out="$target_dir/acme_filter.wasm"
if command -v wasm-opt >/dev/null 2>&1; then
  wasm-opt -Oz --enable-bulk-memory --enable-sign-ext --strip-debug --strip-producers "$wasm" -o "$out"
else
  cp "$wasm" "$out"
fi
printf '%s (%s bytes; cargo output %s bytes)\n' "$out" "$(stat -c %s "$out")" "$(stat -c %s "$wasm")" >&2
echo "$out"
