//! The agent's pure core: what a certificate is, names and their checks, when
//! to renew, what the CA's limits allow. No I/O, no clock reads (every
//! function takes `now`), no network or runtime types.

pub mod budget;
pub mod journal;
pub mod names;
pub mod schedule;
pub mod spec;
