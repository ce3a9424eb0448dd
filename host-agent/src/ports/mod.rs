//! The seams between the services and the adapters: traits and the records
//! they pass, no I/O of their own.

pub mod events;
pub mod issuer;
pub mod leader;
pub mod requests;
pub mod secrets;
pub mod sink;
pub mod solver;
pub mod store;
