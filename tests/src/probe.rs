//! A probe module for real Envoy: a proxy-wasm filter (hand-written WAT, no
//! SDK) that does nothing but count the HTTP contexts Envoy creates in it.
//! Creating a context is a VM entry, so this tells whether a filter
//! configuration keeps ordinary requests out of the VM altogether.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// The Envoy stat the probe increments once per HTTP context.
pub const HTTP_CONTEXTS_STAT: &str = "wasmcustom.probe_http_contexts";

const PROBE_WAT: &str = r#"(module
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "probe_http_contexts")
  (global $metric (mut i32) (i32.const 0))
  (func (export "_initialize"))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    ;; counter (type 0) named by the 19 bytes at 16; its id is written at 64
    (drop (call $define (i32.const 0) (i32.const 16) (i32.const 19) (i32.const 64)))
    (global.set $metric (i32.load (i32.const 64)))
    (i32.const 1))
  ;; A root context has no parent (0); an HTTP context has its root's id.
  (func (export "proxy_on_context_create") (param $context i32) (param $parent i32)
    (if (local.get $parent)
      (then (drop (call $increment (global.get $metric) (i64.const 1))))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))
"#;

/// Writes the probe's `.wasm` into `dir` and returns its path.
pub fn http_context_counter(dir: &Path) -> Result<PathBuf> {
    let bytes = wat::parse_str(PROBE_WAT).context("assembling the probe module")?;
    let path = dir.join("probe.wasm");
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Writes into `dir` the least a proxy-wasm filter can do to answer a
/// request: a module with no SDK whose only work per request is one
/// `proxy_send_local_response` with `body` and `headers` held in its data. The
/// benchmark compares the filter's inline answer with it and with Envoy's
/// `direct_response`: what it costs over `direct_response` is what entering
/// the VM costs, whatever a filter does.
pub fn answer_floor(dir: &Path, body: &str, headers: &[(&str, &str)]) -> Result<PathBuf> {
    let map = crate::proxy_wasm_host::encode_pairs(headers);
    // The body lives at 1024 and the headers at 8192, in one 64 KiB page.
    anyhow::ensure!(
        body.len() <= 8192 - 1024 && map.len() <= 65536 - 8192,
        "the floor module holds a body up to 7 KiB and headers up to 56 KiB"
    );
    let wat = format!(
        r#"(module
  (import "env" "proxy_send_local_response"
    (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{body}")
  (data (i32.const 8192) "{map}")
  (func (export "_initialize"))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 16384))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; 200, no details, the body, the headers, no gRPC status (-1); then pause
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0)
      (i32.const 1024) (i32.const {body_len}) (i32.const 8192) (i32.const {map_len})
      (i32.const -1)))
    (i32.const 1))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))
"#,
        body = escape(body.as_bytes()),
        body_len = body.len(),
        map = escape(&map),
        map_len = map.len(),
    );
    let bytes = wat::parse_str(&wat).context("assembling the floor module")?;
    let path = dir.join("answer-floor.wasm");
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Bytes as a WAT string literal's content.
fn escape(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}
