//! Serving HTTP/1.1 on the agent's small listeners (the challenge API, the
//! probes), with every connection accounted for.
//!
//! A Unix socket's peers are checked by credentials when they connect and
//! are trusted from then on. A TCP connection starts unauthenticated: it
//! takes one of a peer's few unauthenticated slots, and when that peer (or
//! everyone together) opens more, the oldest unauthenticated connection is
//! closed, so idle or looping clients churn each other out and never hold
//! the listener. A connection whose request proves the token leaves that
//! pool and is not evicted; one that does not is closed after its answer.
//! Every connection lives at most [`MAX_CONNECTION_AGE`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tracing::warn;

use crate::metrics::Metrics;
use crate::net::{PeerPolicy, RefusalLog};

/// Time a client has to send a request's headers, counted from the moment the
/// connection is ready for one: also the longest a keep-alive connection idles.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) read; more is a 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most request headers read.
pub const MAX_HEADERS: usize = 64;
/// A connection is closed (after the answer in progress) at this age.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    /// Only peers the policy allows are served.
    Unix(UnixListener, PeerPolicy),
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// Allowed by its credentials when it connected.
    Unix {
        uid: u32,
        gid: u32,
    },
}

/// A request's connection: its peer and its slot (request extension).
#[derive(Clone)]
pub struct Conn {
    pub peer: Peer,
    pub slot: Arc<Slot>,
}

/// Bounds of one listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_unauthenticated_per_peer: usize,
}

/// The connections of one listener.
pub struct Slots {
    limits: Limits,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    total: usize,
    /// Unauthenticated connections, oldest first.
    waiting: VecDeque<Waiting>,
    per_peer: HashMap<IpAddr, usize>,
}

struct Waiting {
    id: u64,
    peer: IpAddr,
    evict: oneshot::Sender<()>,
    /// Resolves (or errs) once the connection's socket is closed.
    closed: oneshot::Receiver<()>,
    /// The slot's flag: set when eviction took it out of the count.
    released: Arc<AtomicBool>,
}

/// One connection's place; released when dropped.
pub struct Slot {
    id: u64,
    slots: Arc<Slots>,
    authenticated: AtomicBool,
    /// Already taken out of the count (evicted).
    released: Arc<AtomicBool>,
}

impl Slot {
    /// Whether a request on this connection proved who it is.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::SeqCst)
    }

    /// Takes the connection out of the unauthenticated pool: it can no
    /// longer be evicted for others.
    pub fn authenticate(&self) {
        if !self.authenticated.swap(true, Ordering::SeqCst) {
            self.slots.lock().take_waiting(self.id);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        inner.take_waiting(self.id);
        if !self.released.load(Ordering::SeqCst) {
            inner.total = inner.total.saturating_sub(1);
        }
    }
}

impl Inner {
    fn take_waiting(&mut self, id: u64) -> Option<Waiting> {
        let at = self.waiting.iter().position(|w| w.id == id)?;
        let waiting = self.waiting.remove(at)?;
        if let Some(n) = self.per_peer.get_mut(&waiting.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&waiting.peer);
            }
        }
        Some(waiting)
    }

    /// Closes the oldest unauthenticated connection (of `peer`, if given);
    /// what resolves once its socket is closed.
    fn evict_oldest(&mut self, peer: Option<IpAddr>) -> Option<oneshot::Receiver<()>> {
        let id = self
            .waiting
            .iter()
            .find(|w| peer.is_none_or(|p| w.peer == p))
            .map(|w| w.id)?;
        let waiting = self.take_waiting(id)?;
        self.total = self.total.saturating_sub(1);
        waiting.released.store(true, Ordering::SeqCst);
        let _ = waiting.evict.send(());
        Some(waiting.closed)
    }
}

/// What [`Slots::admit`] decided.
pub struct Admitted {
    pub slot: Arc<Slot>,
    /// Fires when the connection is evicted.
    pub evicted: oneshot::Receiver<()>,
    /// Dropped by the connection once its socket is closed.
    pub closed: oneshot::Sender<()>,
    /// Connections closed to make room: each resolves once its socket is,
    /// so the listener never holds more sockets than its bound.
    pub evictions: Vec<oneshot::Receiver<()>>,
}

impl Slots {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new connection from `peer` (`None`: authenticated by
    /// its credentials already), evicting the oldest unauthenticated
    /// connection when needed; `None` when every slot is authenticated.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Option<Admitted> {
        let mut inner = self.lock();
        let mut evictions = Vec::new();
        if let Some(ip) = peer
            && inner.per_peer.get(&ip).copied().unwrap_or(0)
                >= self.limits.max_unauthenticated_per_peer
        {
            evictions.extend(inner.evict_oldest(Some(ip)));
        }
        if inner.total >= self.limits.max_connections {
            evictions.push(inner.evict_oldest(None)?);
        }
        inner.next_id += 1;
        inner.total += 1;
        let id = inner.next_id;
        let (evict, evicted) = oneshot::channel();
        let (closed, closed_rx) = oneshot::channel();
        let released = Arc::new(AtomicBool::new(false));
        if let Some(ip) = peer {
            inner.waiting.push_back(Waiting {
                id,
                peer: ip,
                evict,
                closed: closed_rx,
                released: Arc::clone(&released),
            });
            *inner.per_peer.entry(ip).or_default() += 1;
        }
        let slot = Arc::new(Slot {
            id,
            slots: Arc::clone(self),
            authenticated: AtomicBool::new(peer.is_none()),
            released,
        });
        drop(inner);
        Some(Admitted {
            slot,
            evicted,
            closed,
            evictions,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

/// One listener's settings for [`serve`].
pub struct Served {
    /// `api` or `health`: the metrics' label.
    pub name: &'static str,
    pub router: Router,
    pub slots: Arc<Slots>,
    pub metrics: Arc<Metrics>,
}

/// Accepts the next connection: its stream and peer, or `None` when it was
/// refused (its peer's credentials) or failed.
async fn accept(listener: &Listener, served: &Served, refusals: &RefusalLog) -> Option<(Io, Peer)> {
    let failed = |e: std::io::Error| {
        // Out of file descriptors and the like: wait, do not spin or stop.
        warn!(listener = served.name, "accepting a connection: {e}");
    };
    match listener {
        Listener::Tcp(listener) => match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                Some((Io::Tcp(stream), Peer::Tcp(peer)))
            }
            Err(e) => {
                failed(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        },
        Listener::Unix(listener, policy) => match listener.accept().await {
            Ok((stream, _)) => {
                if !crate::net::peer_allowed(&stream, policy, refusals) {
                    served.metrics.refused(served.name, "peer");
                    return None;
                }
                let cred = stream.peer_cred().ok()?;
                Some((
                    Io::Unix(stream),
                    Peer::Unix {
                        uid: cred.uid(),
                        gid: cred.gid(),
                    },
                ))
            }
            Err(e) => {
                failed(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        },
    }
}

/// Either kind of stream.
enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Serves `served.router` on `listener` until `shutdown` flips to true; then
/// every connection is closed after its answer in progress (held long-polls
/// answer at once on the same signal), waiting at most 5 s.
pub async fn serve(listener: Listener, served: Served, mut shutdown: watch::Receiver<bool>) {
    let refusals = RefusalLog::new(served.name);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener, &served, &refusals) => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Some((io, peer)) = accepted else {
            continue;
        };
        let ip = match peer {
            Peer::Tcp(addr) => Some(addr.ip()),
            Peer::Unix { .. } => None,
        };
        let Some(admitted) = served.slots.admit(ip) else {
            served.metrics.refused(served.name, "full");
            continue;
        };
        for closing in admitted.evictions {
            served.metrics.refused(served.name, "evicted");
            // Its task closes it at once; waiting keeps the sockets held
            // within the bound even when tasks lag (a stuck one is not
            // waited for long).
            let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
        }
        let conn = Conn {
            peer,
            slot: admitted.slot,
        };
        let task = connection(
            io,
            conn,
            served.router.clone(),
            (admitted.evicted, admitted.closed),
            shutdown.clone(),
        );
        let metrics = Arc::clone(&served.metrics);
        connections.spawn(async move {
            metrics.api_connection_opened();
            task.await;
            metrics.api_connection_closed();
        });
    }
    // Answers in progress get a moment; anything left is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}

async fn connection(
    io: Io,
    conn: Conn,
    router: Router,
    evicted: (oneshot::Receiver<()>, oneshot::Sender<()>),
    shutdown: watch::Receiver<bool>,
) {
    match io {
        Io::Tcp(stream) => drive(stream, conn, router, evicted, shutdown).await,
        Io::Unix(stream) => drive(stream, conn, router, evicted, shutdown).await,
    }
}

/// Serves one connection until it ends, is evicted, ages out or the
/// listener shuts down.
async fn drive<S>(
    stream: S,
    conn: Conn,
    router: Router,
    (mut evicted, closed): (oneshot::Receiver<()>, oneshot::Sender<()>),
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Declared first, dropped last: after the connection and its socket.
    let _closed = closed;
    let slot = Arc::clone(&conn.slot);
    let service = tower::ServiceExt::map_request(
        router,
        move |mut request: axum::extract::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(conn.clone());
            request
        },
    );
    let closing = Arc::clone(&slot);
    // An answer to a request that did not authenticate the connection ends
    // it: only proven callers keep a connection.
    let service =
        tower::ServiceExt::map_response(service, move |mut response: axum::response::Response| {
            if !closing.is_authenticated() {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        });
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
    let mut connection = std::pin::pin!(connection);
    let age = tokio::time::sleep(MAX_CONNECTION_AGE);
    let mut age = std::pin::pin!(age);
    let mut ending = false;
    loop {
        tokio::select! {
            // A client that goes away or times out is no error of ours.
            _ = connection.as_mut() => break,
            Ok(()) = &mut evicted => break,
            () = &mut age, if !ending => {
                connection.as_mut().graceful_shutdown();
                ending = true;
            }
            _ = shutdown.wait_for(|stop| *stop), if !ending => {
                connection.as_mut().graceful_shutdown();
                ending = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(max: usize, per_peer: usize) -> Arc<Slots> {
        Slots::new(Limits {
            max_connections: max,
            max_unauthenticated_per_peer: per_peer,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn a_peer_over_its_share_evicts_its_own_oldest() {
        let slots = slots(10, 2);
        let mut first = slots.admit(Some(A)).unwrap();
        let _second = slots.admit(Some(A)).unwrap();
        let other = slots.admit(Some(B)).unwrap();
        let third = slots.admit(Some(A)).unwrap();
        assert_eq!(third.evictions.len(), 1);
        assert!(first.evicted.try_recv().is_ok(), "the oldest of A went");
        assert_eq!(slots.open(), 3);
        drop(first.slot);
        assert_eq!(slots.open(), 3, "an evicted slot is not counted twice");
        drop(other);
        assert_eq!(slots.open(), 2);
    }

    #[test]
    fn an_authenticated_connection_is_never_evicted_and_a_full_listener_refuses() {
        let slots = slots(2, 2);
        let mut kept = slots.admit(Some(A)).unwrap();
        kept.slot.authenticate();
        let peer = slots.admit(None).unwrap();
        assert!(peer.slot.is_authenticated());
        assert!(slots.admit(Some(B)).is_none(), "every slot is proven");
        assert!(kept.evicted.try_recv().is_err());
        drop(peer);
        let mut waiting = slots.admit(Some(B)).unwrap();
        let newer = slots.admit(Some(A)).unwrap();
        assert_eq!(newer.evictions.len(), 1);
        assert!(waiting.evicted.try_recv().is_ok());
    }
}
