//! The client side of the agent's control endpoints, for subcommands that
//! talk to a running agent (`renew`): over its Unix socket (the kernel tells
//! the agent who we are), or over TCP proving the token, and then only an
//! answer signed with the token is believed.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::Empty;

use crate::api::auth;
use crate::config::{ChallengeApi, Listen};
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn post(api: &ChallengeApi, path: &str) -> Result<(u16, String), Error> {
    let mut request = http::Request::post(path).header(http::header::HOST, "acme-agent");
    let nonce = auth::nonce();
    let signing = match (&api.listen, &api.token) {
        (Listen::Tcp(_), Some(token)) => Some(token),
        _ => None,
    };
    if let Some(token) = signing {
        let proof = auth::authorization(token, &nonce, now_ms(), "POST", path);
        request = request.header(http::header::AUTHORIZATION, proof);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let unreachable = |e: String| failed(format!("{e} (is the agent running?)"));
    let (status, headers, body) = match &api.listen {
        Listen::Unix(socket) => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| unreachable(format!("connecting to {}: {e}", socket.display())))?;
            http1::exchange(stream, &socket.display().to_string(), request, 64 * 1024).await
        }
        Listen::Tcp(addr) => {
            let target = reachable(*addr);
            let stream = tokio::net::TcpStream::connect(target)
                .await
                .map_err(|e| unreachable(format!("connecting to {target}: {e}")))?;
            http1::exchange(stream, &target.to_string(), request, 64 * 1024).await
        }
    }
    .map_err(unreachable)?;
    if let Some(token) = signing {
        let signature = headers
            .get(auth::SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !auth::verify_response(token, &nonce, status, &body, signature) {
            return Err(failed(format!(
                "the answer ({status}) is not signed with the token: is something else listening at {}?",
                reachable_text(&api.listen)
            )));
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn reachable_text(listen: &Listen) -> String {
    match listen {
        Listen::Tcp(addr) => reachable(*addr).to_string(),
        Listen::Unix(path) => path.display().to_string(),
    }
}

/// Asks the agent listening at `api` to renew `name` now. The agent's answer
/// on success; its refusal as the error.
pub async fn renew(api: &ChallengeApi, name: &str) -> Result<String, Error> {
    let (status, body) = post(api, &format!("/v1/renew/{name}")).await?;
    if status == 202 {
        Ok(body)
    } else {
        Err(failed(format!("{status}: {}", body.trim())))
    }
}
