//! The challenge solvers (`crate::ports::solver::Solver`): HTTP-01 through
//! the filters, tls-alpn-01 through the SDS server, dns-01 through RFC 2136.

pub mod dns;
pub mod http01;
pub mod tls_alpn01;
