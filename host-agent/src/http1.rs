//! One HTTP/1.1 request on a connection of its own, for the agent's small
//! plain-HTTP calls (the self-check through Envoy, the `renew` subcommand to
//! the running agent).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};

/// Sends `request` to `target` and returns the status and at most `max_body`
/// bytes of body. Errors say which step failed.
pub(crate) async fn send(
    target: impl ToSocketAddrs + std::fmt::Display,
    request: http::Request<Empty<Bytes>>,
    max_body: usize,
) -> Result<(u16, Bytes), String> {
    let stream = TcpStream::connect(&target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    // One small request, then wait for the answer: no Nagle delay.
    let _ = stream.set_nodelay(true);
    let (status, _, body) = exchange(stream, &target.to_string(), request, max_body).await?;
    Ok((status, body))
}

/// Sends `request` on a connected `stream` (`target` names it in errors);
/// the status, headers and at most `max_body` bytes of body.
pub(crate) async fn exchange<S>(
    stream: S,
    target: &str,
    request: http::Request<Empty<Bytes>>,
    max_body: usize,
) -> Result<(u16, http::HeaderMap, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {target}: {e}"))?;
    let conn = tokio::spawn(conn);
    let what = format!("{} {} at {target}", request.method(), request.uri());
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| format!("reading the answer to {what}: {e}"))?
        .to_bytes();
    conn.abort();
    Ok((status, headers, body))
}
