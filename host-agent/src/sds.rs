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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::Error;
use crate::ports::secrets::{Gate, SecretSet, normalized};
use crate::ports::sink::{CertificateSink, IssuedCertificate, SECRET_TYPE};

/// Names one stream may subscribe to; a name beyond is answered as removed
/// (its handshake fails at once) and not tracked.
pub const MAX_NAMES_PER_STREAM: usize = 100_000;
/// Longest name served (a DNS name's limit).
const MAX_NAME_LEN: usize = 253;
/// Responses queued per stream before the stream waits for Envoy to read.
const STREAM_QUEUE: usize = 16;

/// A sink that hands certificates to the SDS server.
pub struct SdsSink {
    set: Arc<SecretSet>,
}

impl SdsSink {
    pub fn new(set: Arc<SecretSet>) -> Self {
        Self { set }
    }
}

#[async_trait::async_trait]
impl CertificateSink for SdsSink {
    async fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let leaf = crate::certificate::leaf(&certificate.chain_pem)?;
        let names: Vec<String> = leaf.names.into_iter().collect();
        self.set.set(
            &certificate.name,
            &names,
            &certificate.chain_pem,
            &certificate.key_pem,
        );
        Ok(())
    }

    async fn installed(&self, name: &str) -> bool {
        self.set.contains(name)
    }

    /// Every stream subscribed to its names is told they are removed.
    async fn remove(&self, name: &str) -> Result<(), Error> {
        self.set.remove(name);
        Ok(())
    }

    /// A name not served yet is answered as removed: Envoy needs no file.
    fn wants_placeholder(&self) -> bool {
        false
    }
}

/// What the server last told one stream about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Told {
    Nothing,
    Version(Arc<str>),
    Removed,
    /// Held for an on-demand certificate until then.
    Pending(Instant),
}

/// One delta stream's subscriptions and what it was told.
#[derive(Default)]
struct Stream {
    names: HashMap<String, Told>,
    nonce: u64,
}

impl Stream {
    /// Applies a request; the names it refused (over the cap, malformed) to be
    /// answered as removed without tracking them.
    fn request(&mut self, request: &DeltaDiscoveryRequest) -> Vec<String> {
        let mut refused = Vec::new();
        for (name, version) in &request.initial_resource_versions {
            if self.names.len() < MAX_NAMES_PER_STREAM && name.len() <= MAX_NAME_LEN {
                self.names
                    .insert(name.clone(), Told::Version(version.as_str().into()));
            }
        }
        for name in &request.resource_names_subscribe {
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                refused.push(name.clone());
            } else if !self.names.contains_key(name) {
                if self.names.len() >= MAX_NAMES_PER_STREAM {
                    refused.push(name.clone());
                } else {
                    self.names.insert(name.clone(), Told::Nothing);
                }
            }
        }
        for name in &request.resource_names_unsubscribe {
            self.names.remove(name);
        }
        refused
    }

    /// What to send now: every subscribed name whose served state differs
    /// from what the stream was told, plus `refused`. A name with no
    /// certificate is held while the gate says one is coming.
    fn diff(
        &mut self,
        set: &SecretSet,
        refused: Vec<String>,
        gate: Option<&dyn Gate>,
        now: Instant,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        let mut removed = refused;
        for (name, told) in &mut self.names {
            match set.version(name) {
                Some(version) => {
                    // A new subscription (not a reconnect, which names its
                    // versions), or a held one now served: a handshake
                    // asked for it.
                    if let (Told::Nothing | Told::Pending(_), Some(gate)) = (&*told, gate) {
                        gate.seen(&normalized(name));
                    }
                    if matches!(told, Told::Version(v) if *v == version) {
                        continue;
                    }
                    // Encoded only for what is sent.
                    if let Some((version, resource)) = set.get(name) {
                        resources.push(Resource {
                            name: name.clone(),
                            version: version.to_string(),
                            resource: Some(resource),
                            ..Resource::default()
                        });
                        *told = Told::Version(version);
                    }
                }
                None => {
                    let hold = match (&*told, gate) {
                        (Told::Removed, _) => continue,
                        (Told::Pending(until), Some(gate)) => {
                            (now < *until && !gate.refused(&normalized(name))).then_some(*until)
                        }
                        (Told::Nothing, Some(gate)) => {
                            gate.requested(&normalized(name)).map(|wait| now + wait)
                        }
                        _ => None,
                    };
                    match hold {
                        Some(until) => *told = Told::Pending(until),
                        None => {
                            removed.push(name.clone());
                            *told = Told::Removed;
                        }
                    }
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        self.nonce += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: SECRET_TYPE.to_owned(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
            ..DeltaDiscoveryResponse::default()
        })
    }

    /// The earliest end of a hold, if any name is held.
    fn next_deadline(&self) -> Option<Instant> {
        self.names
            .values()
            .filter_map(|t| match t {
                Told::Pending(until) => Some(*until),
                _ => None,
            })
            .min()
    }
}

/// Serves one delta stream until Envoy closes it.
async fn serve_stream(
    set: Arc<SecretSet>,
    gate: Option<Arc<dyn Gate>>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut stream = Stream::default();
    let mut changes = set.changes();
    let mut refusals = gate.as_ref().map(|g| g.subscribe());
    let mut counted = 0usize;
    loop {
        let deadline = stream.next_deadline();
        let refused = tokio::select! {
            // Shutdown ends the stream (Envoy reconnects to the next agent).
            _ = stopping.wait_for(|stop| *stop) => break,
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => Vec::new(),
            _ = async {
                match refusals.as_mut() {
                    Some(r) => r.changed().await,
                    None => std::future::pending().await,
                }
            } => Vec::new(),
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if !request.type_url.is_empty() && request.type_url != SECRET_TYPE {
                        debug!(type_url = request.type_url, "ignoring a request for another type");
                        continue;
                    }
                    if let Some(error) = &request.error_detail {
                        warn!(nonce = request.response_nonce, "Envoy rejected a secret: {}", error.message);
                    }
                    stream.request(&request)
                }
                Ok(None) => break,
                Err(status) => {
                    debug!("SDS stream ended: {status}");
                    break;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                Vec::new()
            }
        };
        let tracked = stream.names.len();
        recount(set.subscribed_counter(), &mut counted, tracked);
        if let Some(response) = stream.diff(&set, refused, gate.as_deref(), Instant::now())
            && out.send(Ok(response)).await.is_err()
        {
            break;
        }
    }
    recount(set.subscribed_counter(), &mut counted, 0);
}

/// Moves this stream's share of `total` from `*counted` to `now`.
fn recount(total: &std::sync::atomic::AtomicUsize, counted: &mut usize, now: usize) {
    use std::sync::atomic::Ordering;
    if now > *counted {
        total.fetch_add(now - *counted, Ordering::Relaxed);
    } else {
        total.fetch_sub(*counted - now, Ordering::Relaxed);
    }
    *counted = now;
}

/// The gRPC services: delta ADS and delta SDS over the same secrets.
#[derive(Clone)]
pub struct SdsServer {
    set: Arc<SecretSet>,
    /// tls-alpn-01 challenge certificates, asked for on streams that carry
    /// [`SECRETS_HEADER`]: [`ALPN_SECRETS`].
    alpn: Arc<SecretSet>,
    gate: Option<Arc<dyn Gate>>,
    stopping: watch::Receiver<bool>,
}

/// gRPC metadata (Envoy's `initial_metadata` on the `grpc_services` entry)
/// that selects which secrets a stream gets: the tls-alpn-01 filter chain's
/// selector asks for the same names (the SNI) as the ordinary one, and gets
/// the challenge certificates by this header.
pub const SECRETS_HEADER: &str = "x-acme-secrets";
pub const ALPN_SECRETS: &str = "tls-alpn-01";

type DeltaStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
type SotwStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

impl SdsServer {
    pub fn new(
        set: Arc<SecretSet>,
        alpn: Arc<SecretSet>,
        gate: Option<Arc<dyn Gate>>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            set,
            alpn,
            gate,
            stopping,
        }
    }

    fn delta(&self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Response<DeltaStream> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let alpn = request
            .metadata()
            .get(SECRETS_HEADER)
            .is_some_and(|v| v.as_bytes() == ALPN_SECRETS.as_bytes());
        // Challenge certificates exist only while an order runs: no gate.
        let (set, gate) = if alpn {
            (Arc::clone(&self.alpn), None)
        } else {
            (Arc::clone(&self.set), self.gate.clone())
        };
        tokio::spawn(serve_stream(
            set,
            gate,
            request.into_inner(),
            tx,
            self.stopping.clone(),
        ));
        Response::new(ReceiverStream::new(rx))
    }
}

const SOTW_REFUSED: &str = "only the delta protocol is served (api_type: DELTA_GRPC): state-of-the-world cannot refuse a name";

#[tonic::async_trait]
impl AggregatedDiscoveryService for SdsServer {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(SOTW_REFUSED))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(self.delta(request))
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsServer {
    type DeltaSecretsStream = DeltaStream;
    type StreamSecretsStream = SotwStream;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(self.delta(request))
    }

    async fn stream_secrets(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(SOTW_REFUSED))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(SOTW_REFUSED))
    }
}

/// Streams per connection (Envoy uses one over ADS).
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// A bound SDS listener and who may use it.
pub enum Listener {
    /// Mutual TLS: only a client with a certificate from the configured CA.
    Tcp(tokio::net::TcpListener, tonic::transport::ServerTlsConfig),
    /// Peer credentials: only the allowed uids and gids.
    Unix(tokio::net::UnixListener, crate::net::PeerPolicy),
}

impl Listener {
    /// Binds `sds.listen`. Config validation guarantees a TCP listen has
    /// `[sds.tls]`; it is checked again here, since it guards private keys.
    pub fn bind(sds: &crate::config::Sds) -> Result<Self, Error> {
        use crate::config::Listen;
        match &sds.listen {
            Listen::Tcp(addr) => {
                let tls = sds.tls.as_ref().ok_or_else(|| Error::Io {
                    context: format!("SDS on {addr}"),
                    source: std::io::Error::other("a TCP SDS listener needs [sds.tls]"),
                })?;
                let tls = server_tls(tls)?;
                let listener = crate::net::bind_tcp(*addr).map_err(|source| Error::Io {
                    context: format!("binding the SDS server to {addr}"),
                    source,
                })?;
                Ok(Self::Tcp(listener, tls))
            }
            Listen::Unix(path) => {
                let bound = crate::net::bind_unix(path, socket_mode(sds))?;
                let policy = crate::net::PeerPolicy::resolve(
                    sds.allowed_uids.as_deref(),
                    sds.allowed_gids.as_deref(),
                    bound.gid,
                );
                info!(path = %path.display(), uids = ?policy.uids, gids = ?policy.gids, "SDS socket: peers allowed");
                Ok(Self::Unix(bound.listener, policy))
            }
        }
    }
}

/// 0660: the socket's group may connect (and is then checked); 0666 when
/// uids outside it are allowed too (peer credentials decide alone).
pub fn socket_mode(sds: &crate::config::Sds) -> u32 {
    let own = crate::net::own_ids().0;
    match &sds.allowed_uids {
        Some(uids) if uids.iter().any(|u| *u != own) => 0o666,
        _ => 0o660,
    }
}

fn server_tls(tls: &crate::config::ServerTls) -> Result<tonic::transport::ServerTlsConfig, Error> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })
    };
    let identity = tonic::transport::Identity::from_pem(read(&tls.certificate)?, read(&tls.key)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(read(
            &tls.client_ca,
        )?)))
}

static REFUSALS: crate::net::RefusalLog = crate::net::RefusalLog::new("sds");

/// Connections from allowed peers only: anyone else is closed before a byte
/// is read or sent.
fn allowed_peers(
    listener: tokio::net::UnixListener,
    policy: crate::net::PeerPolicy,
    refused: Arc<dyn Fn() + Send + Sync>,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    futures_util::stream::unfold(
        (listener, policy, refused),
        |(listener, policy, refused)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if crate::net::peer_allowed(&stream, &policy, &REFUSALS) {
                            return Some((Ok(stream), (listener, policy, refused)));
                        }
                        refused();
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        warn!("accepting an SDS connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        },
    )
}

/// Serves SDS on `listener` until `shutdown` resolves. `refused` is called
/// for each connection turned away.
pub async fn serve(
    listener: Listener,
    set: Arc<SecretSet>,
    alpn: Arc<SecretSet>,
    gate: Option<Arc<dyn Gate>>,
    refused: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (stop, stopping) = watch::channel(false);
    let server = SdsServer::new(set, alpn, gate, stopping);
    let shutdown = async move {
        shutdown.await;
        stop.send_replace(true);
    };
    let mut builder = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)));
    let failed = |e: tonic::transport::Error| Error::Io {
        context: "serving SDS".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let served = match listener {
        Listener::Tcp(listener, tls) => {
            let addr: Option<SocketAddr> = listener.local_addr().ok();
            info!(address = ?addr, "SDS server listening (mutual TLS)");
            // Small gRPC frames each way: Nagle against delayed ACKs would add
            // ~40 ms to a first handshake now and then.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |stream| {
                    if let Ok(stream) = &stream {
                        let _ = stream.set_nodelay(true);
                    }
                    stream
                },
            );
            builder
                .tls_config(tls)
                .map_err(failed)?
                .add_service(AggregatedDiscoveryServiceServer::new(server.clone()))
                .add_service(SecretDiscoveryServiceServer::new(server))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Listener::Unix(listener, policy) => {
            info!(path = ?listener.local_addr().ok(), "SDS server listening");
            builder
                .add_service(AggregatedDiscoveryServiceServer::new(server.clone()))
                .add_service(SecretDiscoveryServiceServer::new(server))
                .serve_with_incoming_shutdown(allowed_peers(listener, policy, refused), shutdown)
                .await
        }
    };
    served.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::secrets::version_of;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use prost::Message as _;

    fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> (Vec<String>, Vec<String>) {
        let mut sent: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
        let mut removed = response.removed_resources.clone();
        sent.sort();
        removed.sort();
        (sent, removed)
    }

    #[test]
    fn served_under_the_name_and_every_dns_name_and_unknown_names_are_removed() {
        let set = SecretSet::new();
        set.set(
            "www",
            &["www.example.com".into(), "example.com".into()],
            "chain",
            "key",
        );
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["www.example.com", "nope.example.com", "www"]));
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["www".into(), "www.example.com".into()],
                vec!["nope.example.com".into()]
            )
        );
        let secret = Secret::decode(
            response.resources[0]
                .resource
                .as_ref()
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        assert!(matches!(
            secret.r#type,
            Some(secret::Type::TlsCertificate(_))
        ));
        // Nothing changed: nothing to send.
        assert!(
            stream
                .diff(&set, Vec::new(), None, Instant::now())
                .is_none()
        );
    }

    #[test]
    fn a_wildcard_answers_one_label_below_it_under_the_name_asked() {
        let set = SecretSet::new();
        set.set(
            "wild",
            &["*.apps.example.com".into(), "apps.example.com".into()],
            "chain",
            "key",
        );
        let mut stream = Stream::default();
        let asked = [
            "shop.apps.example.com",
            "a.b.apps.example.com",
            ".apps.example.com",
            "apps.example.com",
        ];
        let refused = stream.request(&subscribe(&asked));
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["apps.example.com".into(), "shop.apps.example.com".into()],
                vec![".apps.example.com".into(), "a.b.apps.example.com".into()]
            )
        );
        // Envoy checks that the secret carries the name it asked for.
        let shop = response
            .resources
            .iter()
            .find(|r| r.name == "shop.apps.example.com")
            .unwrap();
        let secret = Secret::decode(shop.resource.as_ref().unwrap().value.as_slice()).unwrap();
        assert_eq!(secret.name, "shop.apps.example.com");
        // A renewal of the wildcard reaches the names it answered.
        set.set("wild", &["*.apps.example.com".into()], "chain2", "key2");
        let response = stream.diff(&set, Vec::new(), None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["shop.apps.example.com".into()],
                vec!["apps.example.com".into()]
            )
        );
    }

    #[test]
    fn a_renewal_is_pushed_and_a_dropped_name_removed() {
        let set = SecretSet::new();
        set.set(
            "www",
            &["www.example.com".into(), "old.example.com".into()],
            "chain1",
            "key",
        );
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["www.example.com", "old.example.com"]));
        stream.diff(&set, refused, None, Instant::now()).unwrap();
        set.set("www", &["www.example.com".into()], "chain2", "key");
        let response = stream.diff(&set, Vec::new(), None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["www.example.com".into()],
                vec!["old.example.com".into()]
            )
        );
        assert_eq!(response.resources[0].version, version_of("chain2"));
    }

    #[test]
    fn a_reconnect_with_current_versions_gets_nothing_resent() {
        let set = SecretSet::new();
        set.set("www", &["www.example.com".into()], "chain", "key");
        let mut stream = Stream::default();
        let mut request = subscribe(&["www.example.com"]);
        request
            .initial_resource_versions
            .insert("www.example.com".into(), version_of("chain"));
        let refused = stream.request(&request);
        assert!(stream.diff(&set, refused, None, Instant::now()).is_none());
        // An older version held by Envoy is replaced.
        let mut stream = Stream::default();
        let mut request = subscribe(&["www.example.com"]);
        request
            .initial_resource_versions
            .insert("www.example.com".into(), "old".into());
        let refused = stream.request(&request);
        assert_eq!(
            stream
                .diff(&set, refused, None, Instant::now())
                .unwrap()
                .resources
                .len(),
            1
        );
    }

    #[test]
    fn names_are_bounded() {
        let set = SecretSet::new();
        let mut stream = Stream::default();
        let long = "a".repeat(300);
        let refused = stream.request(&subscribe(&["", &long]));
        assert_eq!(refused.len(), 2);
        assert!(stream.names.is_empty());
        let many: Vec<String> = (0..MAX_NAMES_PER_STREAM + 10)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let request = DeltaDiscoveryRequest {
            resource_names_subscribe: many,
            ..DeltaDiscoveryRequest::default()
        };
        let refused = stream.request(&request);
        assert_eq!(refused.len(), 10);
        assert_eq!(stream.names.len(), MAX_NAMES_PER_STREAM);
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert_eq!(response.removed_resources.len(), MAX_NAMES_PER_STREAM + 10);
    }

    #[test]
    fn names_match_case_insensitively_without_a_trailing_dot_and_keep_the_asked_name() {
        let set = SecretSet::new();
        set.set("www", &["www.example.com".into()], "chain", "key");
        let mut stream = Stream::default();
        let asked = ["WWW.Example.COM", "www.example.com.", "WWW.EXAMPLE.COM."];
        let refused = stream.request(&subscribe(&asked));
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert!(response.removed_resources.is_empty(), "{response:?}");
        for resource in &response.resources {
            let secret =
                Secret::decode(resource.resource.as_ref().unwrap().value.as_slice()).unwrap();
            assert_eq!(secret.name, resource.name, "Envoy checks the name it asked");
        }
        assert_eq!(response.resources.len(), 3);
    }

    #[test]
    fn a_key_is_held_once_whatever_the_number_of_names() {
        let set = SecretSet::new();
        let names: Vec<String> = (0..50).map(|i| format!("n{i}.example.com")).collect();
        set.set("many", &names, "chain", "key");
        let material = set.material("n0.example.com").unwrap();
        // The set's 51 entries and this one share a single copy.
        assert_eq!(Arc::strong_count(&material), 52);
        set.remove("many");
        assert_eq!(Arc::strong_count(&material), 1);
    }

    #[test]
    fn unsubscribed_names_are_forgotten() {
        let set = SecretSet::new();
        let mut stream = Stream::default();
        stream.request(&subscribe(&["a.example.com"]));
        stream.request(&DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["a.example.com".into()],
            ..DeltaDiscoveryRequest::default()
        });
        assert!(stream.names.is_empty());
        assert!(
            stream
                .diff(&set, Vec::new(), None, Instant::now())
                .is_none()
        );
    }
}

#[cfg(test)]
mod gate_tests {
    //! A delta stream with the on-demand gate: a name with no certificate is
    //! held while the gate says one is coming, and answered (served or
    //! removed) when it comes, when the gate refuses it, or when the hold
    //! ends. The stream is driven with explicit instants, so the edges are
    //! exact.

    use super::*;
    use std::sync::Mutex;

    /// A gate that holds every name for `hold` (or refuses them all), and
    /// notes what it was asked.
    struct FakeGate {
        hold: Option<Duration>,
        requested: Mutex<Vec<String>>,
        refused: Mutex<Vec<String>>,
        seen: Mutex<Vec<String>>,
        refusals: watch::Sender<u64>,
    }

    impl FakeGate {
        fn new(hold: Option<Duration>) -> Self {
            Self {
                hold,
                requested: Mutex::default(),
                refused: Mutex::default(),
                seen: Mutex::default(),
                refusals: watch::Sender::new(0),
            }
        }

        fn refuse(&self, name: &str) {
            self.refused.lock().expect("refused").push(name.to_owned());
        }

        fn requested(&self) -> Vec<String> {
            self.requested.lock().expect("requested").clone()
        }

        fn seen(&self) -> Vec<String> {
            self.seen.lock().expect("seen").clone()
        }
    }

    impl Gate for FakeGate {
        fn requested(&self, name: &str) -> Option<Duration> {
            self.requested
                .lock()
                .expect("requested")
                .push(name.to_owned());
            self.hold
        }

        fn refused(&self, name: &str) -> bool {
            self.refused
                .lock()
                .expect("refused")
                .iter()
                .any(|n| n == name)
        }

        fn subscribe(&self) -> watch::Receiver<u64> {
            self.refusals.subscribe()
        }

        fn seen(&self, name: &str) {
            self.seen.lock().expect("seen").push(name.to_owned());
        }
    }

    const HOLD: Duration = Duration::from_secs(10);

    fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// A stream subscribed to `name` with the gate consulted at `at`.
    fn held(set: &SecretSet, gate: &FakeGate, name: &str, at: Instant) -> Stream {
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&[name]));
        assert!(
            stream.diff(set, refused, Some(gate), at).is_none(),
            "a held name is answered nothing yet"
        );
        stream
    }

    #[test]
    fn a_held_name_is_removed_exactly_when_its_hold_ends() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = held(&set, &gate, "A.Shop.example.com.", start);
        assert_eq!(gate.requested(), ["a.shop.example.com"], "asked normalized");
        assert_eq!(stream.next_deadline(), Some(start + HOLD));
        let just_before = start + HOLD - Duration::from_millis(1);
        assert!(
            stream
                .diff(&set, Vec::new(), Some(&gate), just_before)
                .is_none()
        );
        assert_eq!(gate.requested().len(), 1, "the gate is asked once per hold");
        let response = stream
            .diff(&set, Vec::new(), Some(&gate), start + HOLD)
            .expect("the hold ended");
        assert_eq!(response.removed_resources, ["A.Shop.example.com."]);
        assert!(response.resources.is_empty());
        assert_eq!(stream.next_deadline(), None);
        // Removed stays removed: nothing more to say, nothing asked.
        let later = start + 2 * HOLD;
        assert!(stream.diff(&set, Vec::new(), Some(&gate), later).is_none());
        assert_eq!(gate.requested().len(), 1);
    }

    #[test]
    fn a_refusal_during_the_hold_removes_the_name_at_once() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = held(&set, &gate, "a.shop.example.com", start);
        gate.refuse("a.shop.example.com");
        let response = stream
            .diff(
                &set,
                Vec::new(),
                Some(&gate),
                start + Duration::from_millis(1),
            )
            .expect("refused");
        assert_eq!(response.removed_resources, ["a.shop.example.com"]);
        assert_eq!(stream.next_deadline(), None);
    }

    #[test]
    fn a_certificate_served_during_the_hold_is_sent_and_seen() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = held(&set, &gate, "a.shop.example.com", start);
        assert!(gate.seen().is_empty());
        set.set("od-a", &["a.shop.example.com".into()], "chain", "key");
        let response = stream
            .diff(
                &set,
                Vec::new(),
                Some(&gate),
                start + Duration::from_secs(1),
            )
            .expect("served");
        assert_eq!(response.resources.len(), 1);
        assert!(response.removed_resources.is_empty());
        assert_eq!(gate.seen(), ["a.shop.example.com"]);
        assert_eq!(stream.next_deadline(), None, "no longer held");
        // Past where the hold would have ended: still served, nothing new.
        assert!(
            stream
                .diff(&set, Vec::new(), Some(&gate), start + 2 * HOLD)
                .is_none()
        );
    }

    #[test]
    fn a_gate_that_refuses_answers_removed_at_once() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(None));
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["evil.example.org"]));
        let response = stream
            .diff(&set, refused, Some(&gate), Instant::now())
            .expect("refused at once");
        assert_eq!(response.removed_resources, ["evil.example.org"]);
        assert_eq!(gate.requested(), ["evil.example.org"]);
        assert_eq!(stream.next_deadline(), None);
    }

    #[test]
    fn the_earliest_hold_is_the_next_deadline_and_a_resubscription_asks_again() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = Stream::default();
        stream.request(&subscribe(&["a.shop.example.com"]));
        assert!(stream.diff(&set, Vec::new(), Some(&gate), start).is_none());
        let later = start + Duration::from_secs(3);
        stream.request(&subscribe(&["b.shop.example.com"]));
        assert!(stream.diff(&set, Vec::new(), Some(&gate), later).is_none());
        assert_eq!(stream.next_deadline(), Some(start + HOLD));
        let response = stream
            .diff(&set, Vec::new(), Some(&gate), start + HOLD)
            .expect("a's hold ended");
        assert_eq!(response.removed_resources, ["a.shop.example.com"]);
        assert_eq!(stream.next_deadline(), Some(later + HOLD));
        // Envoy asks again (unsubscribe, subscribe): a new hold.
        stream.request(&DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["a.shop.example.com".into()],
            ..DeltaDiscoveryRequest::default()
        });
        stream.request(&subscribe(&["a.shop.example.com"]));
        assert!(
            stream
                .diff(&set, Vec::new(), Some(&gate), start + HOLD)
                .is_none()
        );
        assert_eq!(gate.requested().len(), 3);
        assert_eq!(stream.next_deadline(), Some(later + HOLD));
    }

    #[test]
    fn a_served_name_is_seen_at_a_new_subscription_but_not_at_a_reconnect() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        set.set("www", &["www.example.com".into()], "chain", "key");
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["WWW.example.com"]));
        assert!(
            stream
                .diff(&set, refused, Some(&gate), Instant::now())
                .is_some()
        );
        assert_eq!(gate.seen(), ["www.example.com"]);
        assert!(gate.requested().is_empty(), "a served name is no request");
        // A reconnect naming the version it holds is no handshake.
        let mut again = Stream::default();
        let mut request = subscribe(&["www.example.com"]);
        request.initial_resource_versions.insert(
            "www.example.com".into(),
            crate::ports::secrets::version_of("chain"),
        );
        let refused = again.request(&request);
        assert!(
            again
                .diff(&set, refused, Some(&gate), Instant::now())
                .is_none()
        );
        assert_eq!(gate.seen().len(), 1);
    }
}
