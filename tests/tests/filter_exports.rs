//! The shipped `.wasm` exports exactly `filter/exports.txt`, and that list
//! covers every proxy-wasm callback the filter implements: the build removes
//! the SDK's other exports so that Envoy skips those callbacks, and a callback
//! implemented but removed would never run.

use std::collections::BTreeSet;

use acme_tests::{filter_wasm, workspace_root};
use wasmtime::{Engine, Module};

/// The export through which Envoy reaches each SDK callback a filter may
/// implement (proxy-wasm 0.2 Rust SDK trait methods).
const CALLBACK_EXPORTS: &[(&str, &str)] = &[
    ("on_vm_start", "proxy_on_vm_start"),
    ("on_configure", "proxy_on_configure"),
    ("on_tick", "proxy_on_tick"),
    ("on_queue_ready", "proxy_on_queue_ready"),
    ("on_done", "proxy_on_done"),
    ("on_log", "proxy_on_log"),
    ("on_http_call_response", "proxy_on_http_call_response"),
    ("on_grpc_call_response", "proxy_on_grpc_close"),
    ("on_foreign_function", "proxy_on_foreign_function"),
    ("on_http_request_headers", "proxy_on_request_headers"),
    ("on_http_request_body", "proxy_on_request_body"),
    ("on_http_request_trailers", "proxy_on_request_trailers"),
    ("on_http_response_headers", "proxy_on_response_headers"),
    ("on_http_response_body", "proxy_on_response_body"),
    ("on_http_response_trailers", "proxy_on_response_trailers"),
];

fn listed_exports() -> BTreeSet<String> {
    std::fs::read_to_string(workspace_root().join("filter/exports.txt"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn built_filter_exports_exactly_the_list() {
    let module = Module::from_file(&Engine::default(), filter_wasm().unwrap()).unwrap();
    let exported: BTreeSet<String> = module.exports().map(|e| e.name().to_owned()).collect();
    assert_eq!(exported, listed_exports());
}

#[test]
fn every_implemented_callback_is_exported() {
    let source = std::fs::read_to_string(workspace_root().join("filter/src/lib.rs")).unwrap();
    let listed = listed_exports();
    let mut implemented = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.trim_start().strip_prefix("fn on_") else {
            continue;
        };
        let name = format!("on_{}", rest.split('(').next().unwrap());
        let export = CALLBACK_EXPORTS
            .iter()
            .find(|(method, _)| *method == name)
            .map(|(_, export)| *export)
            .unwrap_or_else(|| {
                panic!("filter/src/lib.rs implements `{name}`: add it to CALLBACK_EXPORTS")
            });
        assert!(
            listed.contains(export),
            "filter/src/lib.rs implements `{name}` but filter/exports.txt does not keep `{export}`: Envoy would never call it"
        );
        implemented.push(name);
    }
    // The scan itself must see the callbacks the filter is known to have.
    for known in ["on_configure", "on_tick", "on_http_request_headers"] {
        assert!(
            implemented.iter().any(|n| n == known),
            "{known} not found in {implemented:?}"
        );
    }
}
