//! Validation of a parsed config, one function per section.
//!
//! The sections are checked in a fixed order and the first error stops the
//! check, so a file with several mistakes always names the same field first.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use super::{Config, Kubernetes, Listen, OnDemand, decode_base64url, invalid, snapshot_bound};
use crate::Error;
use crate::domain::names::{
    NAME_PREFIX, RESERVED_PREFIX, ip_identifier, is_ip_literal, is_kubernetes_label_value,
    is_valid_domain,
};
use crate::domain::spec::{Certificate, ChallengeKind};

impl Config {
    /// Checks every section; the order is part of the behaviour (see the
    /// module's doc).
    pub(super) fn validate(&self, path: &Path) -> Result<(), Error> {
        self.validate_storage(path)?;
        self.validate_self_check(path)?;
        self.validate_acme(path)?;
        self.validate_api_token(path)?;
        self.validate_concurrency_and_retry(path)?;
        for (name, solver) in &self.dns {
            solver.validate(path, name)?;
        }
        self.validate_certificates(path)?;
        if let Some(od) = &self.on_demand {
            self.validate_on_demand(path, od)?;
        }
        self.validate_limits(path)?;
        self.validate_refills(path)?;
        self.validate_api_bounds(path)?;
        self.validate_listeners(path)?;
        self.validate_snapshot_bound(path)
    }

    /// Where state and certificates go: files (`state_dir`, and `sds_dir`
    /// unless the SDS server serves them) or Kubernetes.
    fn validate_storage(&self, path: &Path) -> Result<(), Error> {
        let Some(k) = &self.kubernetes else {
            if self.state_dir.is_none() {
                return Err(invalid(
                    path,
                    "state_dir",
                    "missing (required unless [kubernetes] is set)",
                ));
            }
            if self.sds_dir.is_none() && self.sds.is_none() {
                return Err(invalid(
                    path,
                    "sds_dir",
                    "missing (required unless [kubernetes] or [sds] is set)",
                ));
            }
            return Ok(());
        };
        validate_kubernetes(path, k)
    }

    /// The self-check targets are `host:port`, as they are dialled.
    fn validate_self_check(&self, path: &Path) -> Result<(), Error> {
        let Some(check) = &self.self_check else {
            return Ok(());
        };
        let host_port = |target: &str| {
            target.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            })
        };
        for (field, target) in [
            ("self_check.target", Some(&check.target)),
            ("self_check.tls_target", check.tls_target.as_ref()),
        ] {
            if let Some(target) = target
                && !host_port(target)
            {
                return Err(invalid(
                    path,
                    field,
                    "must be host:port (an address or a DNS name, and a port)",
                ));
            }
        }
        Ok(())
    }

    /// The CA's directory, the account's contact and its EAB credentials.
    fn validate_acme(&self, path: &Path) -> Result<(), Error> {
        let directory = self.acme.directory_url();
        if !directory.starts_with("https://") {
            return Err(invalid(
                path,
                "acme.directory",
                "must be letsencrypt, letsencrypt-staging or an https:// URL",
            ));
        }
        if let Some(email) = &self.acme.email
            && (!email.contains('@') || email.contains(char::is_whitespace))
        {
            return Err(invalid(path, "acme.email", "is not an email address"));
        }
        if let Some(eab) = &self.acme.eab {
            if eab.key_id.is_empty() {
                return Err(invalid(path, "acme.eab.key_id", "must not be empty"));
            }
            if decode_base64url(&eab.hmac_key).is_none_or(|k| k.is_empty()) {
                return Err(invalid(path, "acme.eab.hmac_key", "must be base64url"));
            }
        }
        Ok(())
    }

    /// The challenge API's token, when set: not short, and only printable
    /// characters without spaces.
    fn validate_api_token(&self, path: &Path) -> Result<(), Error> {
        if let Some(token) = &self.challenge_api.token
            && (token.len() < 16 || token.bytes().any(|b| !b.is_ascii_graphic()))
        {
            return Err(invalid(
                path,
                "challenge_api.token",
                "must be at least 16 printable characters without spaces",
            ));
        }
        Ok(())
    }

    /// How many orders run at once, and the retry backoff's bounds.
    fn validate_concurrency_and_retry(&self, path: &Path) -> Result<(), Error> {
        if self.order_concurrency == 0 || self.order_concurrency > 64 {
            return Err(invalid(
                path,
                "order_concurrency",
                "must be between 1 and 64",
            ));
        }
        let retry = self.retry;
        if retry.initial_seconds == 0 || retry.initial_seconds > 86_400 {
            return Err(invalid(
                path,
                "retry.initial_seconds",
                "must be between 1 and 86400",
            ));
        }
        if retry.max_seconds < retry.initial_seconds || retry.max_seconds > 86_400 {
            return Err(invalid(
                path,
                "retry.max_seconds",
                "must be between retry.initial_seconds and 86400",
            ));
        }
        Ok(())
    }

    /// Every `[[certificate]]`: a unique, storable name, a challenge the
    /// agent can answer, and identifiers the CA can validate.
    fn validate_certificates(&self, path: &Path) -> Result<(), Error> {
        let mut names = BTreeSet::new();
        for (i, cert) in self.certificates.iter().enumerate() {
            let at = move |f: &str| format!("certificate[{i}].{f}");
            self.validate_certificate_name(path, at, &cert.name)?;
            if !names.insert(cert.name.as_str()) {
                return Err(invalid(
                    path,
                    at("name"),
                    format!("{:?} is used twice", cert.name),
                ));
            }
            self.validate_certificate_challenge(path, at, cert)?;
            validate_domains(path, at, cert)?;
            if cert.challenge == ChallengeKind::Dns01 && cert.dns.is_none() {
                return Err(invalid(
                    path,
                    at("dns"),
                    "challenge = \"dns-01\" needs a solver: add a [dns.<name>] section and dns = \"<name>\" here",
                ));
            }
        }
        Ok(())
    }

    /// A certificate's name names files and the SDS secret, and in
    /// Kubernetes a Secret and a label value; the agent's own prefixes are
    /// reserved.
    fn validate_certificate_name(
        &self,
        path: &Path,
        at: impl Fn(&str) -> String,
        name: &str,
    ) -> Result<(), Error> {
        let safe_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !safe_name {
            return Err(invalid(
                path,
                at("name"),
                "must be 1-64 characters of [A-Za-z0-9_-] (it names files and the SDS secret)",
            ));
        }
        if self.kubernetes.is_some() {
            if !is_kubernetes_label_value(name) {
                return Err(invalid(
                    path,
                    at("name"),
                    "names a Kubernetes Secret and a label value: at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit",
                ));
            }
            if name.starts_with(RESERVED_PREFIX) {
                return Err(invalid(
                    path,
                    at("name"),
                    format!("names starting with {RESERVED_PREFIX:?} are the agent's own Secrets"),
                ));
            }
        }
        if self.on_demand.is_some() && name.starts_with(NAME_PREFIX) {
            return Err(invalid(
                path,
                at("name"),
                format!("names starting with {NAME_PREFIX:?} are the on-demand certificates'"),
            ));
        }
        Ok(())
    }

    /// What the certificate's challenge needs is configured (SDS for
    /// tls-alpn-01, the named DNS solver), and its profile is one a
    /// directory could list.
    fn validate_certificate_challenge(
        &self,
        path: &Path,
        at: impl Fn(&str) -> String,
        cert: &Certificate,
    ) -> Result<(), Error> {
        if cert.challenge == ChallengeKind::TlsAlpn01 && self.sds.is_none() {
            return Err(invalid(
                path,
                at("challenge"),
                "tls-alpn-01 needs [sds]: Envoy gets the challenge certificates from the agent's SDS server",
            ));
        }
        if let Some(solver) = &cert.dns
            && !self.dns.contains_key(solver)
        {
            return Err(invalid(
                path,
                at("dns"),
                format!("no [dns.{solver}] solver is configured"),
            ));
        }
        if let Some(profile) = &cert.profile
            && (profile.is_empty()
                || profile.len() > 64
                || !profile
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
        {
            return Err(invalid(
                path,
                at("profile"),
                "must be 1-64 characters of [A-Za-z0-9._-], as the CA's directory lists it",
            ));
        }
        Ok(())
    }

    /// On-demand TLS: where it can run, its policy, and its bounds.
    fn validate_on_demand(&self, path: &Path, od: &OnDemand) -> Result<(), Error> {
        if self.sds.is_none() {
            return Err(invalid(
                path,
                "on_demand",
                "needs [sds]: certificates ordered at a handshake reach Envoy through the agent's SDS server",
            ));
        }
        if self.kubernetes.is_some() {
            return Err(invalid(
                path,
                "on_demand",
                "is not available in Kubernetes mode (the gateway reads Secrets through credentialName)",
            ));
        }
        validate_on_demand_policy(path, od)?;
        validate_on_demand_bounds(path, od)
    }

    /// Every CA limit allows at least one event.
    fn validate_limits(&self, path: &Path) -> Result<(), Error> {
        let limits = &self.acme.limits;
        for (field, value) in [
            ("acme.limits.orders_per_3_hours", limits.orders_per_3_hours),
            (
                "acme.limits.certificates_per_name_set_per_week",
                limits.certificates_per_name_set_per_week,
            ),
            (
                "acme.limits.failed_authorizations_per_name_per_hour",
                limits.failed_authorizations_per_name_per_hour,
            ),
            (
                "acme.limits.certificates_per_registered_domain_per_week",
                limits.certificates_per_registered_domain_per_week,
            ),
        ] {
            if value == 0 {
                return Err(invalid(path, field, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The limits' refill periods, and the share on-demand certificates leave
    /// to configured ones (it must leave them some of every shared bucket,
    /// and on-demand some too).
    fn validate_refills(&self, path: &Path) -> Result<(), Error> {
        let limits = &self.acme.limits;
        for (field, value) in [
            (
                "acme.limits.orders_refill_seconds",
                limits.orders_refill_seconds,
            ),
            (
                "acme.limits.certificates_per_name_set_refill_seconds",
                limits.certificates_per_name_set_refill_seconds,
            ),
            (
                "acme.limits.failed_authorizations_refill_seconds",
                limits.failed_authorizations_refill_seconds,
            ),
            (
                "acme.limits.certificates_per_registered_domain_refill_seconds",
                limits.certificates_per_registered_domain_refill_seconds,
            ),
        ] {
            if value.is_some_and(|v| v == 0 || v > 366 * 86_400) {
                return Err(invalid(path, field, "must be between 1 and 31622400"));
            }
        }
        if limits.configured_reserve_percent > 99 {
            return Err(invalid(
                path,
                "acme.limits.configured_reserve_percent",
                "must be between 0 and 99",
            ));
        }
        if self.on_demand.is_some() {
            use crate::domain::budget::Limit;
            for limit in [
                Limit::OrdersPerAccount,
                Limit::CertificatesPerRegisteredDomain,
            ] {
                if limits.on_demand_reserve(limit) >= limits.bucket(limit).burst {
                    return Err(invalid(
                        path,
                        "acme.limits.configured_reserve_percent",
                        format!(
                            "leaves on-demand certificates nothing of the {} limit: lower it or raise that limit",
                            limit.label()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The challenge API's connection bounds: a held long-poll never takes
    /// the last connection.
    fn validate_api_bounds(&self, path: &Path) -> Result<(), Error> {
        let api = &self.challenge_api;
        if api.max_connections == 0 || api.max_connections > 65_536 {
            return Err(invalid(
                path,
                "challenge_api.max_connections",
                "must be between 1 and 65536",
            ));
        }
        if api.max_held_polls == 0 || api.max_held_polls >= api.max_connections {
            return Err(invalid(
                path,
                "challenge_api.max_held_polls",
                "must be at least 1 and less than challenge_api.max_connections",
            ));
        }
        Ok(())
    }

    /// Who can reach each listener: a Unix socket is checked by peer
    /// credentials; a TCP port is open to every local process (and more),
    /// so it needs the token (challenge API) or mutual TLS (SDS, which hands
    /// out private keys).
    fn validate_listeners(&self, path: &Path) -> Result<(), Error> {
        let api = &self.challenge_api;
        peers_only_on_unix(
            path,
            "challenge_api",
            &api.listen,
            api.allowed_uids.is_some() || api.allowed_gids.is_some(),
        )?;
        if let Listen::Tcp(addr) = api.listen
            && !addr.ip().is_loopback()
            && api.token.is_none()
        {
            return Err(invalid(
                path,
                "challenge_api.listen",
                format!(
                    "{addr} is not a loopback address: set challenge_api.token_file (the filters and the agent prove themselves to each other with it), or listen on unix:/path"
                ),
            ));
        }
        if api.max_unauthenticated_per_peer == 0 {
            return Err(invalid(
                path,
                "challenge_api.max_unauthenticated_per_peer",
                "must be at least 1",
            ));
        }
        let Some(sds) = &self.sds else {
            return Ok(());
        };
        peers_only_on_unix(
            path,
            "sds",
            &sds.listen,
            sds.allowed_uids.is_some() || sds.allowed_gids.is_some(),
        )?;
        match (&sds.listen, &sds.tls) {
            (Listen::Tcp(addr), None) => Err(invalid(
                path,
                "sds.listen",
                format!(
                    "{addr}: SDS hands out private keys, and a TCP port is open to every local process: listen on unix:/path (the default, checked by peer credentials) or set [sds.tls] for mutual TLS"
                ),
            )),
            (Listen::Unix(_), Some(_)) => Err(invalid(
                path,
                "sds.tls",
                "is for a TCP listen; a Unix socket is checked by peer credentials",
            )),
            _ => Ok(()),
        }
    }

    /// The challenge snapshot the orders running at once could publish fits
    /// in what the filters accept.
    fn validate_snapshot_bound(&self, path: &Path) -> Result<(), Error> {
        let api = &self.challenge_api;
        let bound = snapshot_bound(&self.certificates, self.order_concurrency);
        if bound > api.filter_max_sync_bytes {
            return Err(invalid(
                path,
                "order_concurrency",
                format!(
                    "{} orders of the largest certificates could publish a challenge snapshot of up to {bound} bytes, over the filters' max_sync_bytes ({}): lower order_concurrency, split the certificates, or raise max_sync_bytes on the filters and challenge_api.filter_max_sync_bytes here",
                    self.order_concurrency, api.filter_max_sync_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// `[kubernetes]`: the namespace, the Lease and the watched Gateways'
/// namespaces are names the API server accepts.
fn validate_kubernetes(path: &Path, k: &Kubernetes) -> Result<(), Error> {
    let dns_label = !k.namespace.is_empty()
        && k.namespace.len() <= 63
        && !k.namespace.starts_with('-')
        && !k.namespace.ends_with('-')
        && k.namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !dns_label {
        return Err(invalid(
            path,
            "kubernetes.namespace",
            "is not a Kubernetes namespace name",
        ));
    }
    if let Some(le) = &k.leader_election {
        if !is_kubernetes_label_value(&le.lease) {
            return Err(invalid(
                path,
                "kubernetes.leader_election.lease",
                "is not a Lease name (1-63 of [a-z0-9-])",
            ));
        }
        if !(3..=300).contains(&le.duration_seconds) {
            return Err(invalid(
                path,
                "kubernetes.leader_election.duration_seconds",
                "must be between 3 and 300",
            ));
        }
    }
    if let Some(gateways) = &k.gateways {
        if gateways.namespaces.is_empty() {
            return Err(invalid(
                path,
                "kubernetes.gateways.namespaces",
                "list the namespaces whose Gateways are watched",
            ));
        }
        if let Some(bad) = gateways
            .namespaces
            .iter()
            .find(|n| !is_kubernetes_label_value(n) || n.contains('_'))
        {
            return Err(invalid(
                path,
                "kubernetes.gateways.namespaces",
                format!("{bad:?} is not a Kubernetes namespace name"),
            ));
        }
    }
    Ok(())
}

/// A certificate's identifiers: 1 to 100, each a valid IP address or DNS
/// name (wildcards only with a DNS solver), none listed twice.
fn validate_domains(
    path: &Path,
    at: impl Fn(&str) -> String,
    cert: &Certificate,
) -> Result<(), Error> {
    if cert.domains.is_empty() || cert.domains.len() > 100 {
        return Err(invalid(path, at("domains"), "must list 1 to 100 domains"));
    }
    let mut seen = BTreeSet::new();
    for domain in &cert.domains {
        match ip_identifier(domain) {
            Some(ip) => validate_ip_identifier(path, &at, cert, domain, ip)?,
            None => validate_dns_identifier(path, &at, cert, domain)?,
        }
        if !seen.insert(domain) {
            return Err(invalid(
                path,
                at("domains"),
                format!("{domain:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

/// An IP address identifier (RFC 8738): never dns-01 (section 7), and
/// written in its canonical form, as the CA compares it.
fn validate_ip_identifier(
    path: &Path,
    at: impl Fn(&str) -> String,
    cert: &Certificate,
    domain: &str,
    ip: IpAddr,
) -> Result<(), Error> {
    if cert.challenge == ChallengeKind::Dns01 {
        return Err(invalid(
            path,
            at("challenge"),
            format!(
                "{domain:?} is an IP address, which dns-01 cannot validate: use http-01 or tls-alpn-01"
            ),
        ));
    }
    if ip.to_string() != *domain {
        return Err(invalid(
            path,
            at("domains"),
            format!(
                "{domain:?} is an IP address: write it as {:?} (no brackets, the canonical form)",
                ip.to_string()
            ),
        ));
    }
    Ok(())
}

/// A DNS name identifier: lower case, and a wildcard only with a DNS
/// solver (only dns-01 can validate one).
fn validate_dns_identifier(
    path: &Path,
    at: impl Fn(&str) -> String,
    cert: &Certificate,
    domain: &str,
) -> Result<(), Error> {
    if let Some(base) = domain.strip_prefix("*.") {
        if !is_valid_domain(base) {
            return Err(invalid(
                path,
                at("domains"),
                format!("{domain:?} is not *.<lower-case DNS name>"),
            ));
        }
        if cert.dns.is_none() {
            return Err(invalid(
                path,
                at("domains"),
                format!(
                    "{domain:?} is a wildcard, which only dns-01 can validate: add a [dns.<name>] solver (RFC 2136) and dns = \"<name>\" to this certificate"
                ),
            ));
        }
    } else if !is_valid_domain(domain) {
        return Err(invalid(
            path,
            at("domains"),
            format!("{domain:?} is not a lower-case DNS name"),
        ));
    }
    Ok(())
}

/// Who on-demand certificates are issued for: an allow list of names or
/// wildcards, or an HTTP endpoint that is asked (an open policy would let
/// anyone order certificates).
fn validate_on_demand_policy(path: &Path, od: &OnDemand) -> Result<(), Error> {
    if od.allow.is_empty() && od.ask.is_none() {
        return Err(invalid(
            path,
            "on_demand.allow",
            "list the names to issue for (or set on_demand.ask): an open policy would let anyone order certificates",
        ));
    }
    for (i, pattern) in od.allow.iter().enumerate() {
        let name = pattern.strip_prefix("*.").unwrap_or(pattern);
        if !is_valid_domain(name) || is_ip_literal(name) {
            return Err(invalid(
                path,
                format!("on_demand.allow[{i}]"),
                format!("{pattern:?} is neither a lower-case DNS name nor *.<DNS name>"),
            ));
        }
    }
    if let Some(ask) = &od.ask
        && !(ask.starts_with("http://") || ask.starts_with("https://"))
    {
        return Err(invalid(
            path,
            "on_demand.ask",
            "must be an http:// or https:// URL",
        ));
    }
    Ok(())
}

/// On-demand's waits, rates and caches are each between 1 and a ceiling
/// (a name is withdrawn from SDS no later than it is removed).
fn validate_on_demand_bounds(path: &Path, od: &OnDemand) -> Result<(), Error> {
    for (field, value, max) in [
        ("on_demand.max_wait_seconds", od.max_wait_seconds, 60),
        ("on_demand.max_concurrent", od.max_concurrent as u64, 64),
        ("on_demand.max_per_hour", od.max_per_hour as u64, 10_000),
        (
            "on_demand.refused_cache_seconds",
            od.refused_cache_seconds,
            86_400,
        ),
        (
            "on_demand.max_certificates",
            od.max_certificates as u64,
            10_000,
        ),
        ("on_demand.idle_seconds", od.idle_seconds, 366 * 86_400),
        (
            "on_demand.withdraw_seconds",
            od.withdraw_seconds.unwrap_or(1),
            od.idle_seconds,
        ),
        ("on_demand.max_served", od.max_served as u64, 10_000),
        ("on_demand.max_failures", u64::from(od.max_failures), 100),
        (
            "on_demand.failed_refusal_seconds",
            od.failed_refusal_seconds,
            366 * 86_400,
        ),
    ] {
        if value == 0 || value > max {
            return Err(invalid(path, field, format!("must be between 1 and {max}")));
        }
    }
    Ok(())
}

/// `allowed_uids`/`allowed_gids` mean something only on a Unix socket.
fn peers_only_on_unix(path: &Path, section: &str, listen: &Listen, set: bool) -> Result<(), Error> {
    if set && matches!(listen, Listen::Tcp(_)) {
        return Err(invalid(
            path,
            format!("{section}.allowed_uids"),
            "allowed_uids and allowed_gids are for a unix: listen (a TCP peer has no credentials)",
        ));
    }
    Ok(())
}
