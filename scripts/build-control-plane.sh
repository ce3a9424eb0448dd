#!/usr/bin/env bash
# Builds the real Kubernetes control plane the kube_real tests start
# (kube-apiserver, etcd, kubectl) from the Go module in tools/control-plane/,
# at the versions its go.mod and go.sum pin, with `go build` from the Go
# module proxy (nothing is vendored into the repository).
#
#   scripts/build-control-plane.sh        # prints the directory of the binaries
#
# The binaries go into a cache outside the repository keyed by the hash of
# go.mod, go.sum and this script's build flags:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/envoy-acme/control-plane/<hash>/bin
# so a second run only prints that path. A cold build downloads the modules
# into Go's module cache and compiles in a throwaway build cache under
# /dev/shm when it has room, else $TMPDIR (removed afterwards: it is
# gigabytes, the binaries are not). Any failure is
# loud and non-zero: the tests that need these binaries must not run without.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[control-plane] %s\n' "$*" >&2; }

module=tools/control-plane
bins=(kube-apiserver etcd kubectl)
# Bumped when the flags below change, so the cache key changes with them.
flags_version=1

go=""
if command -v go >/dev/null 2>&1; then
  go=$(command -v go)
elif [ -x /usr/local/go/bin/go ]; then
  go=/usr/local/go/bin/go
else
  log "no Go toolchain: install Go 1.26 or newer (https://go.dev/dl), then run this again"
  exit 1
fi

key=$(cat "$module/go.mod" "$module/go.sum" <(echo "flags $flags_version") | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/envoy-acme/control-plane/$key"
have_all=true
for b in "${bins[@]}"; do
  [ -x "$cache/bin/$b" ] || have_all=false
done
if $have_all; then
  echo "$cache/bin"
  exit 0
fi

mkdir -p "$cache"
# The build cache peaks at ~7 GB: on a tmpfs (RAM) when one has room, so a
# short disk is not filled; CONTROL_PLANE_TMPDIR chooses.
tmp="${CONTROL_PLANE_TMPDIR:-}"
if [ -z "$tmp" ]; then
  tmp="${TMPDIR:-/tmp}"
  shm_free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
  if [ -w /dev/shm ] && [ "${shm_free_kb:-0}" -gt $((10 * 1024 * 1024)) ]; then
    tmp=/dev/shm
  fi
fi
work=$(mktemp -d "$tmp/control-plane.XXXXXX")
trap 'rm -rf "$work"' EXIT
export GOCACHE="$work/go-build"
export GOTMPDIR="$work"
export GOFLAGS="-mod=readonly -trimpath -buildvcs=false"
export CGO_ENABLED=0

cd "$module"
kube=$("$go" list -m -f '{{.Version}}' k8s.io/kubernetes)
etcd=$("$go" list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
minor=$(echo "$kube" | cut -d. -f2)
# What Kubernetes' own build stamps (hack/lib/version.sh), so that
# /version and `kubectl version` name the release instead of v0.0.0-master.
ld="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $pkg.gitVersion=$kube -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ld+=" -X $pkg.gitTreeState=clean"
done

log "building kube-apiserver and kubectl $kube, etcd $etcd with $("$go" env GOVERSION)"
start=$(date +%s)
nice "$go" build -ldflags "$ld" -o "$work/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
nice "$go" build -ldflags "-s -w" -o "$work/bin/etcd" go.etcd.io/etcd/server/v3
for b in "${bins[@]}"; do
  [ -x "$work/bin/$b" ] || { log "go build left no $b"; exit 1; }
done
"$work/bin/kube-apiserver" --version >&2
"$work/bin/etcd" --version | head -1 >&2

rm -rf "$cache/bin" "$cache/bin.new"
cp -r "$work/bin" "$cache/bin.new"
mv "$cache/bin.new" "$cache/bin"
log "built in $(($(date +%s) - start)) s"
echo "$cache/bin"
