//! The challenge API the filter long-polls (`docs/challenge-sync.md`), with
//! `/healthz` and `/readyz` on the same listener.
//!
//! Everything a client controls is bounded, so no client can exhaust the
//! agent: connections served at once (more wait in the kernel's backlog),
//! long-polls held at once (one more is answered 503 at once), the time to
//! send request headers, which is also how long a keep-alive connection may
//! sit idle (`HEADER_READ_TIMEOUT`), and their size (`MAX_HEADER_BYTES`, 431
//! above). No handler reads a request body.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::warn;

use crate::challenges::ChallengeSet;
use crate::manager::{RenewRefused, Request};
use crate::metrics::Metrics;

/// Longest hold the API grants, whatever `wait` asks.
pub const MAX_WAIT_SECONDS: u64 = 300;
/// Time a client has to send a request's headers, counted from the moment the
/// connection is ready for one: also the longest a keep-alive connection idles.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) read; more is a 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most request headers read.
pub const MAX_HEADERS: usize = 64;

/// What the API handlers share.
pub struct ApiState {
    pub challenges: Arc<ChallengeSet>,
    /// Bearer token the filter must present, if any.
    pub token: Option<String>,
    /// Set once the agent can serve its purpose (account loaded).
    pub ready: AtomicBool,
    /// Flips to true on shutdown: held long-polls answer at once.
    pub shutdown: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
    /// Where `POST /v1/renew/{name}` goes; `None` answers 503.
    pub manager: Option<mpsc::Sender<Request>>,
    /// Connections served at once.
    pub connections: Arc<Semaphore>,
    /// Long-polls held at once.
    pub held_polls: Arc<Semaphore>,
}

impl ApiState {
    pub fn new(challenges: Arc<ChallengeSet>, token: Option<String>) -> Arc<Self> {
        Self::with_parts(
            challenges,
            token,
            Arc::new(Metrics::new()),
            None,
            &crate::config::ChallengeApi::default(),
        )
    }

    /// The state the agent runs with: its metrics, and the manager that takes
    /// renewal requests.
    pub fn with_parts(
        challenges: Arc<ChallengeSet>,
        token: Option<String>,
        metrics: Arc<Metrics>,
        manager: Option<mpsc::Sender<Request>>,
        limits: &crate::config::ChallengeApi,
    ) -> Arc<Self> {
        Arc::new(Self {
            challenges,
            token,
            ready: AtomicBool::new(false),
            shutdown: watch::Sender::new(false),
            metrics,
            manager,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            held_polls: Arc::new(Semaphore::new(limits.max_held_polls)),
        })
    }
}

/// Compares without an early exit, so response time does not tell how much of
/// a guessed token was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &ApiState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|presented| same_secret(presented.as_bytes(), token.as_bytes()))
}

async fn challenges(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    // A replica that does not hold the Lease (or has not started) has no
    // challenges of its own: its empty set must never replace the holder's
    // in a filter that reached it anyway. The filter keeps its data and
    // polls again.
    if !state.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "not ready: this agent does not serve challenges (yet)\n",
        )
            .into_response();
    }
    let version = query.get("version").and_then(|v| v.parse::<u64>().ok());
    let wait = query.get("wait").and_then(|v| v.parse::<u64>().ok());
    let (Some(asked), Some(wait)) = (version, wait) else {
        return (
            StatusCode::BAD_REQUEST,
            "version and wait must be unsigned integers\n",
        )
            .into_response();
    };
    // A filter that holds a newer version than ours (the agent restarted with
    // a clock that went back) gets a version above it, so the versions it
    // sees only grow and it never mistakes our set for an older one.
    state.challenges.advance_past(asked);
    let mut versions = state.challenges.subscribe();
    let current = *versions.borrow_and_update();
    if current == asked {
        let Ok(_held) = Arc::clone(&state.held_polls).try_acquire_owned() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "too many long-polls held\n",
            )
                .into_response();
        };
        let mut shutdown = state.shutdown.subscribe();
        let hold = Duration::from_secs(wait.min(MAX_WAIT_SECONDS));
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
            }
            () = tokio::time::sleep(hold) => return StatusCode::NOT_MODIFIED.into_response(),
            _ = shutdown.wait_for(|stopping| *stopping) => {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
        }
    }
    Json(state.challenges.snapshot()).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    state.metrics.set_challenges_pending(state.challenges.len());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Whether a caller at `peer` (already past the token check) may force a
/// renewal: anyone holding the configured token, else only this host.
fn may_force_renewal(token_configured: bool, peer: std::net::IpAddr) -> bool {
    token_configured || peer.is_loopback()
}

/// `POST /v1/renew/{name}`: order a new certificate now (the `renew`
/// subcommand). Same bearer token as the challenge API.
async fn renew(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if !authorized(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    // Forcing orders spends the CA's rate limits: without a token, only a
    // caller on this host may (the `renew` subcommand, `kubectl exec`).
    if !may_force_renewal(state.token.is_some(), peer.ip()) {
        return (
            StatusCode::FORBIDDEN,
            "renew needs challenge_api.token when called from another host\n",
        )
            .into_response();
    }
    let Some(manager) = &state.manager else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no certificate manager\n").into_response();
    };
    let (reply, answer) = oneshot::channel();
    if manager
        .send(Request::Renew {
            name: name.clone(),
            reply,
        })
        .await
        .is_err()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match answer.await {
        Ok(Ok(())) => (StatusCode::ACCEPTED, format!("renewing {name}\n")).into_response(),
        Ok(Err(RenewRefused::Unknown)) => (
            StatusCode::NOT_FOUND,
            format!("no certificate named {name:?}\n"),
        )
            .into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
    }
}

const NO_FILTER: &str =
    "this agent was built without the filter inside (build it with scripts/build-agent.sh)\n";

/// The embedded filter module (Istio fetches it from here).
async fn filter_wasm() -> Response {
    match crate::filter_wasm::bytes() {
        Some(bytes) => ([(header::CONTENT_TYPE, "application/wasm")], bytes).into_response(),
        None => (StatusCode::NOT_FOUND, NO_FILTER).into_response(),
    }
}

/// Its SHA-256 in hex, for `WasmPlugin.spec.sha256` and `RemoteDataSource.sha256`.
async fn filter_wasm_sha256() -> Response {
    match crate::filter_wasm::sha256() {
        Some(hex) => format!("{hex}\n").into_response(),
        None => (StatusCode::NOT_FOUND, NO_FILTER).into_response(),
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/challenges", get(challenges))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/filter.wasm", get(filter_wasm))
        .route("/filter.wasm.sha256", get(filter_wasm_sha256))
        .route("/v1/renew/{name}", axum::routing::post(renew))
        .with_state(state)
}

/// Connections the kernel queues while `max_connections` are served: the
/// standard library's 128 would make clients beyond it retry their SYN for
/// seconds during a burst.
const LISTEN_BACKLOG: u32 = 1024;

/// The API's listening socket.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves the API on `listener` until `shutdown` resolves; held long-polls are
/// answered at once then, so shutdown never waits for a hold to run out.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Arc::clone(&state));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&state.connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin or stop.
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            },
        );
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_header_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS);
        let connection = builder.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let connection = graceful.watch(connection);
        let metrics = Arc::clone(&state.metrics);
        tokio::spawn(async move {
            let _permit = permit;
            metrics.api_connection_opened();
            // A client that goes away or times out is no error of ours.
            let _ = connection.await;
            metrics.api_connection_closed();
        });
    }
    state.shutdown.send_replace(true);
    // Held long-polls answer at once now; anything else gets a moment.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_renewal_needs_the_token_or_this_host() {
        let remote: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        assert!(!may_force_renewal(false, remote));
        assert!(may_force_renewal(true, remote));
        assert!(may_force_renewal(false, "127.0.0.1".parse().unwrap()));
        assert!(may_force_renewal(false, "::1".parse().unwrap()));
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
