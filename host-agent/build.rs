//! Embeds the filter's `.wasm` when `ACME_FILTER_WASM` names it
//! (`scripts/build-agent.sh` builds the filter first and sets it), so an agent
//! serves exactly the filter built from its own commit. Without it the agent
//! is built with no filter inside and says so when asked for one.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=ACME_FILTER_WASM");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bytes = match std::env::var_os("ACME_FILTER_WASM") {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            std::fs::read(&path).unwrap_or_else(|e| {
                panic!("ACME_FILTER_WASM={}: {e}", path.display());
            })
        }
        _ => Vec::new(),
    };
    std::fs::write(out.join("acme_filter.wasm"), bytes).expect("writing OUT_DIR/acme_filter.wasm");
}
