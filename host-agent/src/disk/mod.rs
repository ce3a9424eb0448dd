//! Adapters on the local disk: the state directory and the SDS/PEM files.

pub mod sink;
pub mod store;
