//! The agent's Prometheus metrics, served at `/metrics`. Names start with
//! `acme_agent_`.

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::time::unix;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrderLabels {
    certificate: String,
    /// `success` or `failure`.
    result: &'static str,
    /// The ACME problem kind (`badNonce`, `rateLimited`, ...), an agent-side
    /// category (`self_check`, `transport`, ...), or `none` on success.
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    certificate: String,
    /// `crate::domain::budget::Limit::label`.
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    /// `api`, `sds` or `health`.
    listener: &'static str,
    /// `peer` (credentials not allowed), `unauthenticated` (no or a wrong
    /// token), `evicted` (an unauthenticated connection closed to make
    /// room), `full` (every slot held by authenticated connections).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    expiry: Family<CertificateLabel, Gauge>,
    next_renewal: Family<CertificateLabel, Gauge>,
    orders: Family<OrderLabels, Counter>,
    acme_requests: Family<MethodLabel, Histogram, fn() -> Histogram>,
    registrations: Counter,
    challenges_pending: Gauge,
    polls_held: Gauge,
    next_attempt: Family<CertificateLabel, Gauge>,
    failures: Family<CertificateLabel, Gauge>,
    blocked: Family<LimitLabels, Gauge>,
    orders_remaining: Gauge,
    api_connections: Gauge,
    refused: Family<RefusedLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("acme_agent");
        let expiry = Family::<CertificateLabel, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Not-after of the certificate being served, Unix seconds",
            expiry.clone(),
        );
        let next_renewal = Family::<CertificateLabel, Gauge>::default();
        registry.register(
            "certificate_next_renewal_timestamp_seconds",
            "When the agent will next try to renew the certificate, Unix seconds",
            next_renewal.clone(),
        );
        let orders = Family::<OrderLabels, Counter>::default();
        registry.register(
            "orders",
            "ACME orders placed, by certificate, result (success: issued and installed) and error kind",
            orders.clone(),
        );
        let acme_requests =
            Family::<MethodLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "acme_request_duration_seconds",
            "Latency of HTTP requests to the ACME CA",
            acme_requests.clone(),
        );
        let registrations = Counter::default();
        registry.register(
            "account_registrations",
            "ACME accounts registered (1 on first start, 0 on every later start)",
            registrations.clone(),
        );
        let challenges_pending = Gauge::default();
        registry.register(
            "challenges_pending",
            "HTTP-01 challenges currently published to the filters",
            challenges_pending.clone(),
        );
        let polls_held = Gauge::default();
        registry.register(
            "challenge_polls_held",
            "Long-polls of the challenge API held now: one per connected Envoy process (its filter's poller) and any other poller",
            polls_held.clone(),
        );
        let next_attempt = Family::<CertificateLabel, Gauge>::default();
        registry.register(
            "certificate_next_attempt_timestamp_seconds",
            "When the agent next acts on the certificate (a retry, the end of a CA-limit wait, a renewal-info check), Unix seconds",
            next_attempt.clone(),
        );
        let failures = Family::<CertificateLabel, Gauge>::default();
        registry.register(
            "certificate_failures",
            "Consecutive failed attempts for the certificate; 0 once one succeeds or nothing is due",
            failures.clone(),
        );
        let blocked = Family::<LimitLabels, Gauge>::default();
        registry.register(
            "certificate_ca_limit_wait_until_timestamp_seconds",
            "Set while an order for the certificate waits for the CA-limit budget: until when, Unix seconds",
            blocked.clone(),
        );
        let orders_remaining = Gauge::default();
        registry.register(
            "ca_limit_orders_remaining",
            "New orders the account may place now: the tokens left in its bucket (acme.limits.orders_per_3_hours)",
            orders_remaining.clone(),
        );
        let api_connections = Gauge::default();
        registry.register(
            "api_connections",
            "Connections open to the challenge API (at most challenge_api.max_connections)",
            api_connections.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections or requests turned away, by listener and reason",
            refused.clone(),
        );
        Self {
            registry,
            api_connections,
            refused,
            next_attempt,
            failures,
            blocked,
            orders_remaining,
            expiry,
            next_renewal,
            orders,
            acme_requests,
            registrations,
            challenges_pending,
            polls_held,
        }
    }

    fn label(certificate: &str) -> CertificateLabel {
        CertificateLabel {
            certificate: certificate.to_owned(),
        }
    }

    pub fn set_expiry(&self, certificate: &str, not_after: SystemTime) {
        self.expiry
            .get_or_create(&Self::label(certificate))
            .set(i64::try_from(unix(not_after)).unwrap_or(i64::MAX));
    }

    pub fn set_next_renewal(&self, certificate: &str, at: SystemTime) {
        self.next_renewal
            .get_or_create(&Self::label(certificate))
            .set(i64::try_from(unix(at)).unwrap_or(i64::MAX));
    }

    pub fn set_next_attempt(&self, certificate: &str, at: SystemTime) {
        self.next_attempt
            .get_or_create(&Self::label(certificate))
            .set(i64::try_from(unix(at)).unwrap_or(i64::MAX));
    }

    pub fn set_failures(&self, certificate: &str, failures: u32) {
        self.failures
            .get_or_create(&Self::label(certificate))
            .set(i64::from(failures));
    }

    /// The CA-limit wait of `certificate`, or none (the series is removed).
    pub fn set_blocked(&self, certificate: &str, blocked: Option<crate::domain::budget::Blocked>) {
        for limit in crate::domain::budget::Limit::ALL {
            let labels = LimitLabels {
                certificate: certificate.to_owned(),
                limit: limit.label(),
            };
            match blocked {
                Some(b) if b.limit == limit => {
                    self.blocked
                        .get_or_create(&labels)
                        .set(i64::try_from(unix(b.until)).unwrap_or(i64::MAX));
                }
                _ => {
                    self.blocked.remove(&labels);
                }
            }
        }
    }

    pub fn api_connection_opened(&self) {
        self.api_connections.inc();
    }

    pub fn api_connection_closed(&self) {
        self.api_connections.dec();
    }

    /// Counts a connection or request turned away (see [`RefusedLabels`]).
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    pub fn set_orders_remaining(&self, remaining: u32) {
        self.orders_remaining.set(i64::from(remaining));
    }

    /// Drops the per-certificate gauges of a certificate no longer configured.
    pub fn forget(&self, certificate: &str) {
        self.expiry.remove(&Self::label(certificate));
        self.next_renewal.remove(&Self::label(certificate));
        self.next_attempt.remove(&Self::label(certificate));
        self.failures.remove(&Self::label(certificate));
        self.set_blocked(certificate, None);
    }

    pub fn order_succeeded(&self, certificate: &str) {
        self.orders
            .get_or_create(&OrderLabels {
                certificate: certificate.to_owned(),
                result: "success",
                error: "none",
            })
            .inc();
    }

    pub fn order_failed(&self, certificate: &str, kind: &'static str) {
        self.orders
            .get_or_create(&OrderLabels {
                certificate: certificate.to_owned(),
                result: "failure",
                error: kind,
            })
            .inc();
    }

    pub fn observe_acme_request(&self, method: &str, took: Duration) {
        self.acme_requests
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn account_registered(&self) {
        self.registrations.inc();
    }

    pub fn set_challenges_pending(&self, n: usize) {
        self.challenges_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_polls_held(&self, n: usize) {
        self.polls_held.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::new();
        m.set_expiry("www", SystemTime::UNIX_EPOCH + Duration::from_secs(1234));
        m.order_failed("www", "badNonce");
        m.order_succeeded("www");
        m.observe_acme_request("POST", Duration::from_millis(3));
        let text = m.encode();
        for line in [
            "acme_agent_certificate_expiry_timestamp_seconds{certificate=\"www\"} 1234",
            "acme_agent_orders_total{certificate=\"www\",result=\"failure\",error=\"badNonce\"} 1",
            "acme_agent_orders_total{certificate=\"www\",result=\"success\",error=\"none\"} 1",
            "acme_agent_acme_request_duration_seconds_count{method=\"POST\"} 1",
            "acme_agent_account_registrations_total 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        m.forget("www");
        assert!(!m.encode().contains("expiry_timestamp_seconds{"));
    }
}
