//! The client side of the agent's control endpoints, for subcommands that
//! talk to a running agent (`renew`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::Empty;

use crate::config::ChallengeApi;
use crate::{Error, http1};

fn failed(reason: impl Into<String>) -> Error {
    Error::Io {
        context: "asking the running agent".into(),
        source: std::io::Error::other(reason.into()),
    }
}

/// Where to reach an API that listens on `listen`: a wildcard address is
/// reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => (Ipv4Addr::LOCALHOST, a.port()).into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => (Ipv6Addr::LOCALHOST, a.port()).into(),
        other => other,
    }
}

async fn post(api: &ChallengeApi, path: &str) -> Result<(u16, String), Error> {
    let mut request = http::Request::post(path).header(http::header::HOST, "acme-agent");
    if let Some(token) = &api.token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let (status, body) = http1::send(reachable(api.listen), request, 64 * 1024)
        .await
        .map_err(|e| failed(format!("{e} (is the agent running?)")))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Asks the agent listening at `api` to renew `name` now. The agent's answer
/// on success; its refusal as the error.
pub fn renew(api: &ChallengeApi, name: &str) -> Result<String, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let (status, body) = runtime.block_on(post(api, &format!("/v1/renew/{name}")))?;
    if status == 202 {
        Ok(body)
    } else {
        Err(failed(format!("{status}: {}", body.trim())))
    }
}
