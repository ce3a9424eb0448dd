#!/usr/bin/env bash
# Pins the Istio manifests to the filter built from this commit: writes its
# sha256 into the EnvoyFilter and WasmPlugins (the agent serves this exact
# module; Envoy and istio-agent refuse one whose sha256 differs). The Istio
# manifest test fails with a pointer here when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
wasm=$(scripts/build-filter.sh 2>/dev/null)
sha=$(sha256sum "$wasm" | cut -d' ' -f1)
for f in envoy-config/istio/envoyfilter.yaml envoy-config/istio/wasmplugin/wasmplugin.yaml \
         envoy-config/istio/gateway-api/wasmplugin.yaml; do
  sed -i -E "s/^( *sha256: )[0-9a-f]{64}\$/\1$sha/" "$f"
done
echo "pinned $sha"
