//! proxy-wasm layer of the ACME HTTP-01 filter: moves bytes between Envoy and
//! `acme-filter-core`, which makes every decision.
//!
//! Host calls go through `proxy_wasm::hostcalls` (which return `Result`) rather
//! than the context traits' helpers, which `unwrap` host statuses and would turn
//! an unexpected status or a non-UTF-8 header into a panic, killing the VM.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use acme_filter_core::challenge::{self, Decision, Outcome};
use acme_filter_core::config::FilterConfig;
use acme_filter_core::poller::{Answer, Poller, SyncOutcome};
use acme_filter_core::request::RequestHeaders;
use acme_filter_core::store::{self, SetError, SharedData};
use acme_filter_core::{auth, lease};
use log::{info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

/// Granularity of lease renewal and backoff timers.
const TICK: Duration = Duration::from_millis(100);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(AcmeRoot::new(context_id))
    });
}}

/// Envoy shared data through the host.
struct Host;

impl SharedData for Host {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|status| match status {
            Status::CasMismatch => SetError::CasMismatch,
            _ => SetError::Other,
        })
    }
}

/// Fresh, unpredictable bytes for a request's nonce: std's hasher keys come
/// from the host's random source (WASI `random_get`) and every
/// `RandomState` differs, so hashing a counter with two of them gives
/// 16 bytes no one outside the VM can guess.
fn nonce() -> [u8; 16] {
    let half = |n: u64| {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(n);
        hasher.write_u64(now_ms());
        hasher.finish().to_le_bytes()
    };
    let mut out = [0u8; 16];
    let (a, b) = out.split_at_mut(8);
    a.copy_from_slice(&half(1));
    b.copy_from_slice(&half(2));
    out
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A header as text. Runs for every request (`:path`): valid UTF-8, the common
/// case, is taken without a copy; anything else is replaced lossily, which
/// can never form a valid token.
fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|v| {
            String::from_utf8(v)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        })
}

#[allow(unsafe_code)]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    // Declared here rather than used through `hostcalls::get_map_bytes`,
    // which panics on an unexpected status, a header name that is not UTF-8
    // or a short map; the core parses the bytes without any of that.
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
}

/// Every request header in proxy-wasm's serialization, in one host call (see
/// `acme_filter_core::request` for why one); `None` if the host refused.
#[allow(unsafe_code)]
fn request_header_map() -> Option<Vec<u8>> {
    let mut data = std::ptr::null_mut();
    let mut size = 0;
    // SAFETY: the host writes into the two locals a buffer it got from this
    // module's `proxy_on_memory_allocate` (the SDK's: a boxed `[u8]` of exactly
    // `size` bytes) and hands it over, as the SDK's own `get_map` assumes.
    let status = unsafe {
        proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size)
    };
    if status != Status::Ok as u32 || data.is_null() {
        return None;
    }
    // SAFETY: see above; length and capacity are the allocation's size.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// A host status for a log line (without `Debug`, whose string escaping pulls
/// Unicode tables into the `.wasm`).
fn describe(status: Status) -> &'static str {
    match status {
        Status::BadArgument => "no such cluster, or a bad argument",
        Status::NotFound => "not found",
        Status::InternalFailure => "internal failure",
        _ => "unexpected host status",
    }
}

/// Counter and gauge ids; a metric the host refused to define is simply not kept.
#[derive(Default)]
struct Metrics {
    served: Option<u32>,
    not_found: Option<u32>,
    rejected: Option<u32>,
    sync_success: Option<u32>,
    sync_failure: Option<u32>,
    tokens_known: Option<u32>,
}

impl Metrics {
    fn define() -> Self {
        let counter = |name| hostcalls::define_metric(MetricType::Counter, name).ok();
        Self {
            served: counter("acme_filter.challenges_served"),
            not_found: counter("acme_filter.challenges_not_found"),
            rejected: counter("acme_filter.challenges_rejected"),
            sync_success: counter("acme_filter.sync_success"),
            sync_failure: counter("acme_filter.sync_failure"),
            tokens_known: hostcalls::define_metric(MetricType::Gauge, "acme_filter.tokens_known")
                .ok(),
        }
    }

    fn increment(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn set(id: Option<u32>, value: usize) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, u64::try_from(value).unwrap_or(u64::MAX));
        }
    }
}

/// One per worker thread (and one on the main thread): owns the parsed config,
/// the metrics, and, when elected, the sync loop.
struct AcmeRoot {
    /// Identifies this root context in the poller lease; random so that contexts
    /// of different workers (which may share context ids) never collide.
    owner: u64,
    config: Option<Rc<FilterConfig>>,
    metrics: Rc<Metrics>,
    poller: Option<Poller>,
    leader: bool,
}

impl AcmeRoot {
    fn new(context_id: u32) -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(context_id);
        hasher.write_u64(now_ms());
        Self {
            owner: hasher.finish(),
            config: None,
            metrics: Rc::new(Metrics::default()),
            poller: None,
            leader: false,
        }
    }

    /// Claims or renews the poller lease; whether this context holds it now.
    fn elect(&mut self, now: u64) -> bool {
        let leader = lease::elect(&Host, self.owner, now);
        if leader != self.leader {
            info!(
                "acme: {} the challenge poller of this Envoy",
                if leader { "became" } else { "is no longer" }
            );
        }
        self.leader = leader;
        leader
    }

    fn poll_if_due(&mut self, now: u64) {
        let Some(poller) = self.poller.as_mut() else {
            return;
        };
        let stored = store::stored_position(&Host);
        let Some(request) = poller.poll(now, self.leader, &stored, nonce()) else {
            return;
        };
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let dispatched = hostcalls::dispatch_http_call(
            &request.cluster,
            headers,
            None,
            Vec::new(),
            Duration::from_millis(request.timeout_ms),
        );
        if let Err(status) = dispatched {
            let delay = poller.dispatch_failed(now);
            Metrics::increment(self.metrics.sync_failure);
            warn!(
                "acme: cannot call agent cluster {} ({}); retrying in {delay} ms",
                request.cluster,
                describe(status)
            );
        }
    }
}

impl Context for AcmeRoot {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let now = now_ms();
        let Some(poller) = self.poller.as_mut() else {
            return;
        };
        let status =
            header(MapType::HttpCallResponseHeaders, ":status").and_then(|s| s.parse::<u32>().ok());
        let signature = header(MapType::HttpCallResponseHeaders, auth::SIGNATURE_HEADER);
        let outcome = poller.on_response(
            now,
            Answer {
                status,
                body_len: body_size,
                signature: signature.as_deref(),
                read_body: || {
                    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                        .ok()
                        .flatten()
                },
            },
        );
        // Whether this context still holds the lease, asked now: another may
        // have taken over while the call was out, and then only its data
        // counts and only it polls again.
        let leader = self.elect(now);
        match outcome {
            Ok(SyncOutcome::Snapshot(_)) if !leader => {
                info!("acme: dropped a sync answer that arrived after the lease moved on");
            }
            Ok(SyncOutcome::Snapshot(snapshot)) => match store::apply(&Host, &snapshot) {
                Ok(store::Applied::Stored(known)) => {
                    if let Some(poller) = self.poller.as_mut() {
                        poller.stored();
                    }
                    Metrics::increment(self.metrics.sync_success);
                    Metrics::set(self.metrics.tokens_known, known);
                    info!(
                        "acme: synced challenge set version {} ({known} tokens)",
                        snapshot.version
                    );
                }
                Ok(store::Applied::Stale { stored }) => {
                    Metrics::increment(self.metrics.sync_failure);
                    let delay = self.poller.as_mut().map_or(0, |p| p.stale(now));
                    info!(
                        "acme: kept challenge set version {stored}; the answer had version {}; asking again in {delay} ms",
                        snapshot.version
                    );
                }
                Err(e) => {
                    Metrics::increment(self.metrics.sync_failure);
                    warn!("acme: {e}");
                }
            },
            Ok(SyncOutcome::Unchanged) => Metrics::increment(self.metrics.sync_success),
            Err(e) => {
                Metrics::increment(self.metrics.sync_failure);
                warn!("acme: {e}; keeping the last good challenge set");
            }
        }
        // A success polls again at once: the long-poll is what makes a new token
        // reach Envoy within milliseconds.
        self.poll_if_due(now);
    }

    fn on_done(&mut self) -> bool {
        lease::resign(&Host, self.owner);
        true
    }
}

impl RootContext for AcmeRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut config = match FilterConfig::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log::error!("acme: {e}");
                return false;
            }
        };
        if let Some(name) = &config.agent_token_env {
            // Envoy passes it in with vm_config.environment_variables.
            match std::env::var(name) {
                Ok(token) if !token.trim().is_empty() => {
                    config.agent_token = Some(token.trim().to_owned());
                }
                _ => {
                    log::error!(
                        "acme: invalid filter configuration: agent_token_env: the environment variable {name} is not set in the Wasm VM (vm_config.environment_variables.host_env_keys, or Istio's WasmPlugin vmConfig.env)"
                    );
                    return false;
                }
            }
        }
        self.metrics = Rc::new(Metrics::define());
        self.poller = Poller::new(&config);
        self.config = Some(Rc::new(config));
        if self.poller.is_some() {
            // The first sync waits for the first tick rather than starting here:
            // Envoy configures some root contexts that never tick (observed with
            // Envoy 1.40), and one of those holding the lease would delay the
            // first sync until the lease went stale.
            if let Err(status) = hostcalls::set_tick_period(TICK) {
                log::error!("acme: cannot set the tick period ({})", describe(status));
                return false;
            }
        }
        true
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        self.elect(now);
        self.poll_if_due(now);
    }

    // Never None: the SDK panics on it, which would kill the VM. Envoy only
    // creates HTTP contexts under a configured root context, but a request
    // reaching one without config passes untouched rather than crashing.
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AcmeHttp {
            config: self.config.clone(),
            metrics: Rc::clone(&self.metrics),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One per request; lives only as long as the request.
struct AcmeHttp {
    config: Option<Rc<FilterConfig>>,
    metrics: Rc<Metrics>,
}

impl Context for AcmeHttp {}

impl HttpContext for AcmeHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.as_deref() else {
            return Action::Continue;
        };
        let map = request_header_map().unwrap_or_default();
        let request = RequestHeaders::parse(&map);
        let decision = challenge::decide(config, &request, |token| store::lookup(&Host, token));
        let Decision::Answer(answer) = decision else {
            return Action::Continue;
        };
        Metrics::increment(match answer.outcome {
            Outcome::Served => self.metrics.served,
            Outcome::NotFound => self.metrics.not_found,
            Outcome::Rejected => self.metrics.rejected,
        });
        let sent = hostcalls::send_http_response(
            answer.status,
            answer.headers,
            answer.body.as_deref().map(str::as_bytes),
        );
        if let Err(status) = sent {
            warn!("acme: cannot send the local answer ({})", describe(status));
        }
        Action::Pause
    }
}
