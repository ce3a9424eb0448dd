#!/usr/bin/env bash
# Builds the filter as shipped: release profile (opt-level z, LTO, strip) for
# wasm32-wasip1, unused SDK callbacks removed (filter/exports.txt), then
# wasm-opt. Prints the path.
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
for tool in wasm-metadce wasm-opt; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing: scripts/setup.sh installs it (Debian's binaryen)" >&2; exit 1; }
done
# Keep only the exports listed in filter/exports.txt (why: see there),
# then let wasm-opt drop the code only they reached.
# Every output goes through a private temporary file renamed into place:
# test binaries run this script concurrently and read the result.
graph=$(mktemp "$target_dir/.exports.XXXXXX")
tmp=$(mktemp "$target_dir/.acme_filter.XXXXXX")
trap 'rm -f "$graph" "$tmp" "$tmp.opt"' EXIT
grep -v -e '^#' -e '^$' filter/exports.txt \
  | awk 'BEGIN { print "[" } { printf "%s{\"name\": \"%s\", \"export\": \"%s\", \"root\": true}\n", (NR > 1 ? "," : ""), $1, $1 } END { print "]" }' >"$graph"
wasm-metadce --enable-bulk-memory --enable-sign-ext -f "$graph" "$wasm" -o "$tmp" >/dev/null
wasm-opt -Oz --enable-bulk-memory --enable-sign-ext --strip-debug --strip-producers "$tmp" -o "$tmp.opt"
chmod 644 "$tmp.opt"
mv -f "$tmp.opt" "$out"
printf '%s (%s bytes; cargo output %s bytes)\n' "$out" "$(stat -c %s "$out")" "$(stat -c %s "$wasm")" >&2
echo "$out"
