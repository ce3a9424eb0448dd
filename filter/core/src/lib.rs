//! Host-independent core of the ACME HTTP-01 filter.
//!
//! Everything that decides something lives here, in plain Rust with no proxy-wasm
//! dependency, so it is unit-tested natively and under V8 (`wasm32-unknown-unknown`
//! with `wasm-bindgen-test`). The `acme-filter` cdylib is a thin layer that moves
//! bytes between these types and the proxy-wasm host.

pub mod auth;
pub mod backoff;
pub mod challenge;
pub mod config;
mod error;
pub mod lease;
pub mod poller;
pub mod request;
pub mod snapshot;
pub mod store;
pub mod token;

pub use error::Error;

/// Test attribute that runs natively under `cargo test` and in V8 under
/// `wasm-bindgen-test-runner`, so one body proves both targets.
#[cfg(test)]
macro_rules! both_targets_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
        #[cfg_attr(not(target_arch = "wasm32"), test)]
        fn $name() $body
    };
}
#[cfg(test)]
pub(crate) use both_targets_test;
