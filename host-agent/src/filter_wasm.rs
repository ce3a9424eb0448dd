//! The filter's `.wasm` built from the same commit as this agent, embedded at
//! build time (`scripts/build-agent.sh`), served at `/filter.wasm` so Istio's
//! `WasmPlugin` and `EnvoyFilter` fetch it from the agent's Service: no extra
//! pod, and no way for filter and agent versions to drift apart.

static BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/acme_filter.wasm"));

/// The embedded module, or `None` when this build has none.
pub fn bytes() -> Option<&'static [u8]> {
    (!BYTES.is_empty()).then_some(BYTES)
}

/// Lower-case hex SHA-256 of the embedded module, as Istio's `sha256` fields
/// expect it.
pub fn sha256() -> Option<String> {
    bytes().map(|b| {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    })
}
