//! Test support: a proxy-wasm host on wasmtime that runs the built filter, and
//! helpers that build the filter and find the workspace's tools.

pub mod a2c;
pub mod agent;
pub mod envoy;
pub mod fake_kube;
pub mod http;
pub mod kube_apiserver;
pub mod named;
pub mod pebble;
pub mod probe;
pub mod proxy_wasm_host;
pub mod schemas;
pub mod sync_server;
pub mod tls;
pub mod tls_probe;
pub mod world;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

/// Runs `future` to its end on a runtime of its own: the agent's state store
/// and sinks are async, and most tests that call them directly are not.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// The workspace root.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

/// Builds the filter as shipped (`scripts/build-filter.sh`: release profile for
/// `wasm32-wasip1`, then `wasm-opt`) and returns the `.wasm`. Runs the build the
/// first time a test process asks, so a test never runs a stale file; cargo makes
/// that a no-op when nothing changed. The build has its own target directory so
/// it never waits on the lock of the `cargo test` that runs us.
pub fn filter_wasm() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_filter().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_filter() -> Result<PathBuf> {
    let output = Command::new(workspace_root().join("scripts/build-filter.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running scripts/build-filter.sh")?;
    if !output.status.success() {
        bail!("building the filter failed ({})", output.status);
    }
    let path = String::from_utf8(output.stdout)?;
    let wasm = workspace_root().join(path.trim());
    if !wasm.is_file() {
        bail!("{} was not produced", wasm.display());
    }
    Ok(wasm)
}

/// The built filter compiled for wasmtime, once per test process.
pub fn filter_module() -> Result<(wasmtime::Engine, wasmtime::Module)> {
    static MODULE: OnceLock<std::result::Result<(wasmtime::Engine, wasmtime::Module), String>> =
        OnceLock::new();
    MODULE
        .get_or_init(|| {
            let wasm = filter_wasm().map_err(|e| format!("{e:#}"))?;
            let engine = wasmtime::Engine::default();
            let module =
                proxy_wasm_host::Vm::compile(&engine, &wasm).map_err(|e| format!("{e:#}"))?;
            Ok((engine, module))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A JSON sync snapshot as the agent sends it: `(token, identifier)` pairs, with
/// key authorizations `<token>.<thumbprint>`.
pub fn snapshot_json(version: u64, challenges: &[(&str, &str)]) -> String {
    let items: Vec<String> = challenges
        .iter()
        .map(|(token, identifier)| {
            format!(
                r#"{{"token":"{token}","key_authorization":"{}","identifier":"{identifier}"}}"#,
                key_authorization(token)
            )
        })
        .collect();
    format!(
        r#"{{"version":{version},"challenges":[{}]}}"#,
        items.join(",")
    )
}

/// The key authorization [`snapshot_json`] uses for `token`.
pub fn key_authorization(token: &str) -> String {
    format!("{token}.{THUMBPRINT}")
}

/// A well-formed account key thumbprint (base64url, 43 characters).
pub const THUMBPRINT: &str = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
