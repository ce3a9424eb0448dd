//! The agent as Envoy's secret discovery service: every installed certificate
//! is served as an SDS `Secret` under its name and under each of its DNS
//! names, so Envoy's on-demand certificate selector with the SNI mapper
//! (`envoy.tls.certificate_selectors.on_demand_secret`, Envoy 1.37+) finds it
//! by the client's SNI, and one static listener serves any number of them.
//!
//! Only the delta protocol is spoken, over ADS (`DeltaAggregatedResources`)
//! and plain SDS (`DeltaSecrets`): with state-of-the-world a name the server
//! does not serve can only be left out, which hangs that handshake for good
//! (see `../shared/FACTS.md`); with delta it is answered with a removal and
//! the handshake fails at once.
//!
//! Versions are a digest of the certificate chain, so they are the same after
//! an agent restart and Envoy's `initial_resource_versions` on reconnect are
//! honoured without resending anything.
//!
//! Bounded: names per stream ([`MAX_NAMES_PER_STREAM`]; more are answered as
//! removed and not tracked), name length (253), streams per connection. The
//! listener is for Envoy alone: loopback by default.

mod listener;
mod server;
mod sink;
mod stream;

pub use listener::{Listener, socket_mode};
pub use server::{ALPN_SECRETS, SECRETS_HEADER, SdsServer, serve};
pub use sink::SdsSink;
pub use stream::MAX_NAMES_PER_STREAM;
