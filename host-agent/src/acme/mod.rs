//! The ACME side: the HTTPS client instant-acme talks through (verified TLS,
//! an extra root only when configured, a timeout, latency metrics, the CA's
//! `Retry-After`), and the `badNonce` retry around its calls. The account is
//! in `account.rs`.

pub mod account;
pub mod issuer;
pub mod order;

use std::cell::Cell;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::warn;

use crate::Error;
use crate::metrics::Metrics;

/// Longest any single request to the CA may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts per ACME call when the CA answers `badNonce`. instant-acme already
/// retries three times inside each attempt; Pebble rejects 5 % of nonces by
/// default and tests run it at 50 %, where three tries fail one call in eight.
pub const NONCE_ATTEMPTS: u32 = 10;

tokio::task_local! {
    /// The CA's last `Retry-After` on an error answer, seen by the task that
    /// made the request (one order = one task, so orders do not mix theirs up).
    pub static RETRY_AFTER: Cell<Option<SystemTime>>;
}

/// Runs `f` with its own `Retry-After` slot; returns its output and the last
/// `Retry-After` the CA sent with an error during it.
pub async fn capturing_retry_after<T>(f: impl Future<Output = T>) -> (T, Option<Duration>) {
    let (out, slot) = RETRY_AFTER
        .scope(Cell::new(None), async {
            let out = f.await;
            (out, RETRY_AFTER.with(Cell::get))
        })
        .await;
    let wait = slot.and_then(|at| at.duration_since(SystemTime::now()).ok());
    (out, wait)
}

/// Calls an instant-acme method again while it fails with `badNonce`, up to
/// [`NONCE_ATTEMPTS`]; any other result is returned. A macro, not a function,
/// because the call borrows the order mutably and must be rebuilt on every try.
#[macro_export]
macro_rules! nonce_retry {
    ($what:expr, $call:expr) => {{
        let mut attempt = 1;
        loop {
            match $call.await {
                Ok(value) => break Ok(value),
                Err(e) => {
                    let e = $crate::Error::acme($what)(e);
                    if e.is_bad_nonce() && attempt < $crate::acme::NONCE_ATTEMPTS {
                        ::tracing::debug!(attempt, "badNonce, retrying: {}", $what);
                        attempt += 1;
                        continue;
                    }
                    break Err(e);
                }
            }
        }
    }};
}

/// The HTTPS client every ACME request goes through.
#[derive(Clone)]
pub struct Http {
    client: HyperClient<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    metrics: Arc<Metrics>,
}

impl Http {
    /// The system's roots, plus every certificate in `extra_root` (a PEM file)
    /// when given: private CAs such as Pebble. Verification is never disabled.
    pub fn new(extra_root: Option<&Path>, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_root {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| Error::Io {
                    context: format!("reading acme.ca_root {}", path.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
            if certs.is_empty() {
                return Err(Error::Io {
                    context: format!("reading acme.ca_root {}", path.display()),
                    source: std::io::Error::other("no PEM certificate in the file"),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| Error::Io {
                    context: format!("adding acme.ca_root {}", path.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
            }
        } else if added == 0 {
            warn!("no system CA roots found: the CA's TLS certificate cannot be verified");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Io {
            context: "building the TLS client".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // Nagle on an ACME exchange (small JWS writes, wait for the answer)
        // meets delayed ACKs: ~40 ms added to every request.
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(tcp);
        Ok(Self {
            client: HyperClient::builder(TokioExecutor::new()).build(connector),
            metrics,
        })
    }
}

fn parse_retry_after(headers: &http::HeaderMap) -> Option<SystemTime> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(SystemTime::now() + Duration::from_secs(secs));
    }
    httpdate::parse_http_date(value).ok()
}

impl HttpClient for Http {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let method = req.method().to_string();
        let metrics = Arc::clone(&self.metrics);
        let fut = self.client.request(req);
        Box::pin(async move {
            let start = Instant::now();
            let result = tokio::time::timeout(REQUEST_TIMEOUT, fut).await;
            metrics.observe_acme_request(&method, start.elapsed());
            match result {
                Err(_) => Err(instant_acme::Error::Other(
                    format!("no answer from the CA within {REQUEST_TIMEOUT:?}").into(),
                )),
                Ok(Err(e)) => Err(instant_acme::Error::Other(Box::new(e))),
                Ok(Ok(rsp)) => {
                    if rsp.status().is_client_error() || rsp.status().is_server_error() {
                        let at = parse_retry_after(rsp.headers());
                        if at.is_some() {
                            let _ = RETRY_AFTER.try_with(|slot| slot.set(at));
                        }
                    }
                    Ok(BytesResponse::from(rsp))
                }
            }
        })
    }
}
