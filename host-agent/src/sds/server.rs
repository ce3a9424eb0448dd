//! The gRPC services (delta ADS and delta SDS) and the server that runs
//! them on a bound listener.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use super::listener::{Listener, allowed_peers};
use super::stream::{STREAM_QUEUE, serve_stream};
use crate::Error;
use crate::ports::secrets::{Gate, SecretSet};

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
