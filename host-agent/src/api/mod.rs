//! The challenge API the filters long-poll (`docs/challenge-sync.md`), the
//! renew request, and the embedded filter module; the probes and metrics have
//! a listener of their own ([`health_router`]).
//!
//! Who may do what: on a Unix socket, every peer the credentials check let
//! in; on TCP with a token, a request that proves the token
//! ([`auth`]), and it gets its answer signed; on loopback TCP without a
//! token (not a shipped shape: warned at start), anyone may poll and
//! no one may renew. Everything a client controls is bounded
//! ([`serve`]): connections and their age, unauthenticated connections per
//! peer, held long-polls, header sizes and the time to send them. No handler
//! reads a request body.

pub mod auth;
pub mod serve;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::challenges::ChallengeSet;
use crate::metrics::Metrics;
use crate::ports::requests::{RenewRefused, Request};
pub use serve::{Conn, HEADER_READ_TIMEOUT, Listener, MAX_HEADER_BYTES, MAX_HEADERS, Peer};

/// Longest hold the API grants, whatever `wait` asks.
pub const MAX_WAIT_SECONDS: u64 = 300;
/// How far a signed state-changing request's time may be from ours.
const RENEW_CLOCK_SKEW_MS: u64 = 60_000;
/// Nonces of signed renew requests remembered against replay (within the
/// skew window): more in that window are refused.
const MAX_REMEMBERED_NONCES: usize = 10_000;

/// What the API handlers share.
pub struct ApiState {
    pub challenges: Arc<ChallengeSet>,
    /// The token filters and the `renew` command prove, if configured.
    pub token: Option<String>,
    /// Set once the agent can serve its purpose (account loaded).
    pub ready: AtomicBool,
    /// Flips to true on shutdown: held long-polls answer at once.
    pub shutdown: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
    /// Where `POST /v1/renew/{name}` goes; `None` answers 503.
    pub manager: Option<mpsc::Sender<Request>>,
    /// Long-polls held at once, of `max_held_polls`.
    pub held_polls: Arc<Semaphore>,
    max_held_polls: usize,
    /// Connection bounds of the API listener.
    pub limits: serve::Limits,
    /// Nonces of signed renew requests seen recently.
    replays: Mutex<VecDeque<(u64, String)>>,
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
        config: &crate::config::ChallengeApi,
    ) -> Arc<Self> {
        Arc::new(Self {
            challenges,
            token,
            ready: AtomicBool::new(false),
            shutdown: watch::Sender::new(false),
            metrics,
            manager,
            held_polls: Arc::new(Semaphore::new(config.max_held_polls)),
            max_held_polls: config.max_held_polls,
            limits: serve::Limits {
                max_connections: config.max_connections,
                max_unauthenticated_per_peer: config
                    .max_unauthenticated_per_peer
                    .min(config.max_connections),
            },
            replays: Mutex::new(VecDeque::new()),
        })
    }

    /// Remembers a renew request's nonce; false when it was seen already
    /// (a replay) or too many are remembered.
    fn first_use(&self, nonce: &str, now_ms: u64) -> bool {
        let mut seen = self
            .replays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while seen
            .front()
            .is_some_and(|(at, _)| now_ms.saturating_sub(*at) > 2 * RENEW_CLOCK_SKEW_MS)
        {
            seen.pop_front();
        }
        if seen.len() >= MAX_REMEMBERED_NONCES || seen.iter().any(|(_, n)| n == nonce) {
            return false;
        }
        seen.push_back((now_ms, nonce.to_owned()));
        true
    }
}

/// Who a request comes from, as far as the API can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// A Unix socket peer the credentials check let in.
    Peer,
    /// Proved the token; its answer is signed with this nonce.
    Token { nonce: String, time_ms: u64 },
    /// Loopback TCP with no token configured.
    Anonymous,
}

/// A request turned away: its status and the reason given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refused(StatusCode, &'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (
            self.0,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(auth::SCHEME),
            )],
            self.1,
        )
            .into_response()
    }
}

fn unauthorized(state: &ApiState) -> Refused {
    state.metrics.refused("api", "unauthenticated");
    Refused(
        StatusCode::UNAUTHORIZED,
        "missing or wrong token proof (challenge_api.token)\n",
    )
}

/// Who the caller is; a 401 when a token is configured and not proven.
fn authenticate(
    state: &ApiState,
    conn: &Conn,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Caller, Refused> {
    if matches!(conn.peer, Peer::Unix { .. }) {
        return Ok(Caller::Peer);
    }
    let Some(token) = &state.token else {
        return Ok(Caller::Anonymous);
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::parse);
    match presented {
        Some(p) if auth::verify_request(token, &p, method.as_str(), path) => {
            conn.slot.authenticate();
            Ok(Caller::Token {
                nonce: p.nonce,
                time_ms: p.time_ms,
            })
        }
        _ => Err(unauthorized(state)),
    }
}

/// Signs `response` for a caller that proved the token (the filter refuses
/// an unsigned answer then: whoever sits on the agent's port cannot answer).
async fn signed(state: &ApiState, caller: &Caller, response: Response) -> Response {
    let (Caller::Token { nonce, .. }, Some(token)) = (caller, &state.token) else {
        return response;
    };
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let signature = auth::sign_response(token, nonce, parts.status.as_u16(), &bytes);
    if let Ok(value) = HeaderValue::from_str(&signature) {
        parts.headers.insert(auth::SIGNATURE_HEADER, value);
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

async fn challenges(
    State(state): State<Arc<ApiState>>,
    Extension(conn): Extension<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let caller = match authenticate(&state, &conn, &method, &uri, &headers) {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    let answer = poll(&state, &query).await;
    signed(&state, &caller, answer).await
}

/// The long-poll itself (`docs/challenge-sync.md`).
async fn poll(state: &ApiState, query: &HashMap<String, String>) -> Response {
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
    // The caller's version means something only for this instance: any other
    // (a previous agent process, or a number someone made up) gets the
    // current set at once, and the agent never follows it.
    let same_instance = query
        .get("instance")
        .is_none_or(|i| i == state.challenges.instance());
    let mut versions = state.challenges.subscribe();
    let current = *versions.borrow_and_update();
    if current == asked && same_instance {
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

/// Whether `caller` may change state (force a renewal, which spends the
/// CA's limits): an allowed peer, or a fresh, never seen token proof.
fn may_change_state(state: &ApiState, caller: &Caller, now_ms: u64) -> Result<(), Refused> {
    let refused = match caller {
        Caller::Peer => return Ok(()),
        Caller::Token { nonce, time_ms } => {
            if now_ms.abs_diff(*time_ms) > RENEW_CLOCK_SKEW_MS {
                Refused(
                    StatusCode::UNAUTHORIZED,
                    "the request's time is more than 60 s from the agent's clock\n",
                )
            } else if !state.first_use(nonce, now_ms) {
                Refused(StatusCode::UNAUTHORIZED, "a replayed request\n")
            } else {
                return Ok(());
            }
        }
        Caller::Anonymous => Refused(
            StatusCode::FORBIDDEN,
            "renew needs challenge_api.token (or the agent's Unix socket)\n",
        ),
    };
    state.metrics.refused("api", "unauthenticated");
    Err(refused)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `POST /v1/renew/{name}`: order a new certificate now (the `renew`
/// subcommand).
async fn renew(
    State(state): State<Arc<ApiState>>,
    Extension(conn): Extension<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let caller = match authenticate(&state, &conn, &method, &uri, &headers) {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    if let Err(refused) = may_change_state(&state, &caller, now_ms()) {
        return refused.into_response();
    }
    let answer = forward_renew(&state, name).await;
    signed(&state, &caller, answer).await
}

async fn forward_renew(state: &ApiState, name: String) -> Response {
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

/// The embedded filter module (Istio fetches it from here). Public: it is
/// the same file as in the agent's release.
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

/// The challenge API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/challenges", get(challenges))
        .route("/filter.wasm", get(filter_wasm))
        .route("/filter.wasm.sha256", get(filter_wasm_sha256))
        .route("/v1/renew/{name}", post(renew))
        .with_state(state)
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
    let free = state.held_polls.available_permits();
    state
        .metrics
        .set_polls_held(state.max_held_polls.saturating_sub(free));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The probes and metrics (`[health] listen`): nothing here changes state
/// or reveals a key or a challenge, but metrics name every certificate.
pub fn health_router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Binds the challenge API's `listen`: a Unix socket (0660, or 0666 when
/// uids outside its group are allowed) with its peer policy, or TCP.
pub fn bind(api: &crate::config::ChallengeApi) -> Result<Listener, crate::Error> {
    use crate::config::Listen;
    match &api.listen {
        Listen::Tcp(addr) => crate::net::bind_tcp(*addr)
            .map(Listener::Tcp)
            .map_err(|source| crate::Error::Io {
                context: format!("binding the challenge API to {addr}"),
                source,
            }),
        Listen::Unix(path) => {
            let own = crate::net::own_ids().0;
            let mode = match &api.allowed_uids {
                Some(uids) if uids.iter().any(|u| *u != own) => 0o666,
                _ => 0o660,
            };
            let bound = crate::net::bind_unix(path, mode)?;
            let policy = crate::net::PeerPolicy::resolve(
                api.allowed_uids.as_deref(),
                api.allowed_gids.as_deref(),
                bound.gid,
            );
            Ok(Listener::Unix(bound.listener, policy))
        }
    }
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(listener: tokio::net::TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

/// Serves the challenge API on `listener` until `shutdown` resolves; held
/// long-polls are answered at once then, so shutdown never waits for a hold
/// to run out.
pub async fn serve(
    listener: impl Into<Listener>,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let served = serve::Served {
        name: "api",
        router: router(Arc::clone(&state)),
        slots: serve::Slots::new(state.limits),
        metrics: Arc::clone(&state.metrics),
    };
    let stopping = state.shutdown.subscribe();
    let flag = state.shutdown.clone();
    tokio::spawn(async move {
        shutdown.await;
        flag.send_replace(true);
    });
    serve::serve(listener.into(), served, stopping).await;
    Ok(())
}

/// Connections the probes and metrics listener serves at once.
const HEALTH_MAX_CONNECTIONS: usize = 64;
/// Of those, per peer address (the kubelet's probes come from one).
const HEALTH_MAX_PER_PEER: usize = 16;

/// Serves the probes and metrics on `listener` until the API's shutdown.
pub async fn serve_health(listener: tokio::net::TcpListener, state: Arc<ApiState>) {
    let served = serve::Served {
        name: "health",
        router: health_router(Arc::clone(&state)),
        slots: serve::Slots::new(serve::Limits {
            max_connections: HEALTH_MAX_CONNECTIONS,
            max_unauthenticated_per_peer: HEALTH_MAX_PER_PEER,
        }),
        metrics: Arc::clone(&state.metrics),
    };
    serve::serve(Listener::Tcp(listener), served, state.shutdown.subscribe()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renew_nonce_is_taken_once_and_forgotten_after_the_window() {
        let state = ApiState::new(Arc::new(ChallengeSet::new()), Some("t".repeat(20)));
        assert!(state.first_use("aa", 1_000_000));
        assert!(!state.first_use("aa", 1_000_001), "a replay");
        assert!(state.first_use("bb", 1_000_002));
        let later = 1_000_000 + 2 * RENEW_CLOCK_SKEW_MS + 1;
        assert!(
            state.first_use("aa", later + 10),
            "long after, the time check refuses it anyway"
        );
    }

    #[test]
    fn only_an_allowed_peer_or_a_fresh_proof_may_change_state() {
        let state = ApiState::new(Arc::new(ChallengeSet::new()), Some("t".repeat(20)));
        let now = 5_000_000;
        assert!(may_change_state(&state, &Caller::Peer, now).is_ok());
        assert!(may_change_state(&state, &Caller::Anonymous, now).is_err());
        let fresh = Caller::Token {
            nonce: "00".repeat(16),
            time_ms: now - 1_000,
        };
        assert!(may_change_state(&state, &fresh, now).is_ok());
        assert!(may_change_state(&state, &fresh, now).is_err(), "replayed");
        let stale = Caller::Token {
            nonce: "11".repeat(16),
            time_ms: now - 2 * RENEW_CLOCK_SKEW_MS,
        };
        assert!(may_change_state(&state, &stale, now).is_err());
    }
}
