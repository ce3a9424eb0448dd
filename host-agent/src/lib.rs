//! The companion agent: holds the ACME account, orders and renews certificates,
//! publishes pending HTTP-01 challenges to the filter over the sync protocol
//! (`docs/challenge-sync.md`), and delivers certificates to Envoy.
//!
//! This crate is the library behind the `acme-agent` binary, so tests drive the
//! same code the binary runs.

pub mod acme;
pub mod api;
pub mod certificate;
pub mod challenges;
pub mod config;
pub mod control;
pub mod disk;
pub mod domain;
pub mod error;
pub mod files;
pub mod filter_wasm;
mod http1;
pub mod kubernetes;
pub mod manager;
pub mod metrics;
pub mod net;
pub mod on_demand;
pub mod ports;
pub mod sds;
pub mod solvers;
pub mod status;
pub mod time;

pub use error::Error;
