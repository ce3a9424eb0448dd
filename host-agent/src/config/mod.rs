//! The agent's one declarative config file (TOML).
//!
//! Every error names the dotted path of the field at fault, and the binary
//! exits 64 (EX_USAGE) on one: a typo must stop the start, not fall back to a
//! default.

pub mod dns;
pub mod secrets;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;
use crate::domain::budget::Limits;
use crate::domain::names::MAX_TOKEN_LEN;
use crate::domain::spec::{Certificate, KeyType};
pub use dns::{DnsSolver, TsigAlgorithm};

/// Let's Encrypt's production directory, selected by `directory = "letsencrypt"`.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory, selected by `directory = "letsencrypt-staging"`.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// External Account Binding credentials (ZeroSSL, Google Trust Services, ...).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Eab {
    pub key_id: String,
    /// base64url HMAC key as the CA hands it out. Never logged. After load,
    /// set from `hmac_key_file` when that is given.
    #[serde(default)]
    pub hmac_key: String,
    /// A file holding the HMAC key (mode 0600 or 0400): read at load.
    pub hmac_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for Eab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eab")
            .field("key_id", &self.key_id)
            .field("hmac_key", &"<redacted>")
            .field("hmac_key_file", &self.hmac_key_file)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// `letsencrypt`, `letsencrypt-staging`, or an `https://` directory URL.
    pub directory: String,
    /// Contact email for the account (optional, recommended).
    pub email: Option<String>,
    /// Extra PEM root to trust for the CA's TLS (private CAs such as Pebble).
    pub ca_root: Option<PathBuf>,
    pub eab: Option<Eab>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChallengeApi {
    /// `unix:/path` (the default, checked by peer credentials) or
    /// `host:port` (needs a token unless on loopback).
    #[serde(default = "default_listen")]
    pub listen: Listen,
    /// The shared secret the filters and the agent prove to each other
    /// (HMAC, `docs/challenge-sync.md`); set the filters' `agent_token` (or
    /// `agent_token_env`) to the same. Prefer `token_file`.
    pub token: Option<String>,
    /// A file holding the token (mode 0600 or 0400): read at load.
    pub token_file: Option<PathBuf>,
    /// Unix socket: uids allowed to connect (default: the agent's own).
    pub allowed_uids: Option<Vec<u32>>,
    /// Unix socket: primary gids allowed (default: the socket's group).
    pub allowed_gids: Option<Vec<u32>>,
    /// Connections served at once; more wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections not (yet) authenticated that one peer address may hold:
    /// the oldest is closed when it opens one more.
    #[serde(default = "default_max_unauthenticated_per_peer")]
    pub max_unauthenticated_per_peer: usize,
    /// Long-polls held at once; one more is answered 503 at once.
    #[serde(default = "default_max_held_polls")]
    pub max_held_polls: usize,
    /// The filters' `max_sync_bytes`: a config whose challenge snapshot
    /// could be larger is refused at load.
    #[serde(default = "default_filter_max_sync_bytes")]
    pub filter_max_sync_bytes: usize,
}

impl std::fmt::Debug for ChallengeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChallengeApi")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("allowed_uids", &self.allowed_uids)
            .field("allowed_gids", &self.allowed_gids)
            .field("max_connections", &self.max_connections)
            .field(
                "max_unauthenticated_per_peer",
                &self.max_unauthenticated_per_peer,
            )
            .field("max_held_polls", &self.max_held_polls)
            .field("filter_max_sync_bytes", &self.filter_max_sync_bytes)
            .finish()
    }
}

/// Default challenge API socket (`RuntimeDirectory=acme-agent` in systemd).
pub const DEFAULT_API_SOCKET: &str = "/run/acme-agent/api.sock";
/// Default SDS socket, beside it.
pub const DEFAULT_SDS_SOCKET: &str = "/run/acme-agent/sds.sock";

fn default_listen() -> Listen {
    Listen::Unix(PathBuf::from(DEFAULT_API_SOCKET))
}

fn default_max_unauthenticated_per_peer() -> usize {
    64
}

fn default_max_connections() -> usize {
    256
}

fn default_max_held_polls() -> usize {
    128
}

/// The filter's own default `max_sync_bytes`.
fn default_filter_max_sync_bytes() -> usize {
    1_048_576
}

impl Default for ChallengeApi {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
            token_file: None,
            allowed_uids: None,
            allowed_gids: None,
            max_connections: default_max_connections(),
            max_unauthenticated_per_peer: default_max_unauthenticated_per_peer(),
            max_held_polls: default_max_held_polls(),
            filter_max_sync_bytes: default_filter_max_sync_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SelfCheck {
    /// Envoy's plain-HTTP listener as `host:port` (an address, or a name such
    /// as a Kubernetes Service), where challenges are fetched with each domain
    /// as Host before the CA is told to validate.
    pub target: String,
    /// Envoy's TLS listener as `host:port`, where tls-alpn-01 challenges are
    /// checked with the CA's handshake.
    pub tls_target: Option<String>,
}

/// The SDS server's listener: it hands out private keys, so only to the
/// peers allowed here.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Sds {
    /// `unix:/path` (the default), or `host:port` with `[sds.tls]`.
    #[serde(default = "default_sds_listen")]
    pub listen: Listen,
    /// Unix socket: uids allowed to connect (default: the agent's own).
    pub allowed_uids: Option<Vec<u32>>,
    /// Unix socket: primary gids allowed (default: the socket's group).
    pub allowed_gids: Option<Vec<u32>>,
    /// TCP: mutual TLS, required there (any local process can reach a port).
    pub tls: Option<ServerTls>,
}

/// A TLS server identity and the CA its clients' certificates must chain to.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM chain the server presents.
    pub certificate: PathBuf,
    /// Its PEM private key (mode 0600 or 0400).
    pub key: PathBuf,
    /// PEM CA certificate(s) a client's certificate must chain to.
    pub client_ca: PathBuf,
}

/// The probes and metrics listener: `/healthz`, `/readyz`, `/metrics`. No
/// authentication (metrics name certificates and their errors): loopback by
/// default.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "default_health_listen")]
    pub listen: SocketAddr,
}

fn default_health_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9182))
}

impl Default for Health {
    fn default() -> Self {
        Self {
            listen: default_health_listen(),
        }
    }
}

/// On-demand TLS: who may get a certificate at their first handshake, and
/// the bounds, since whoever connects chooses the name.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OnDemand {
    /// Names allowed: exact DNS names, or `*.suffix` for one more label.
    #[serde(default)]
    pub allow: Vec<String>,
    /// An HTTP URL asked `?domain=<name>`: only a 200 allows the name (after
    /// `allow`, when both are set). Caddy's `ask`.
    pub ask: Option<String>,
    /// How long a handshake is held for its certificate.
    #[serde(default = "default_on_demand_wait")]
    pub max_wait_seconds: u64,
    /// On-demand certificates being ordered at once; more are refused.
    #[serde(default = "default_on_demand_concurrent")]
    pub max_concurrent: usize,
    /// New on-demand certificates per hour; more are refused.
    #[serde(default = "default_on_demand_per_hour")]
    pub max_per_hour: usize,
    /// A refused name is answered "no" for this long without asking again.
    #[serde(default = "default_on_demand_refused_cache")]
    pub refused_cache_seconds: u64,
    #[serde(default)]
    pub key_type: KeyType,
    /// On-demand certificates kept at most; a new name beyond is refused.
    #[serde(default = "default_on_demand_max_certificates")]
    pub max_certificates: usize,
    /// A name no handshake asked for in this long is not renewed and is
    /// removed (storage and SDS).
    #[serde(default = "default_on_demand_idle")]
    pub idle_seconds: u64,
    /// A name no handshake asked for in this long is withdrawn from SDS
    /// (Envoy drops it; kept in storage, handed back at its next
    /// handshake). Unset: half of `idle_seconds`.
    pub withdraw_seconds: Option<u64>,
    /// On-demand names served over SDS at most (what each Envoy can hold);
    /// beyond, the least recently asked for are withdrawn (kept in storage).
    #[serde(default = "default_on_demand_max_served")]
    pub max_served: usize,
    /// Orders in a row that fail on the name (the CA could not validate it,
    /// CAA, DNS, a rejected identifier) before the name is dropped and
    /// refused.
    #[serde(default = "default_on_demand_max_failures")]
    pub max_failures: u32,
    /// How long a name dropped for its failures stays refused (persisted).
    #[serde(default = "default_on_demand_failed_refusal")]
    pub failed_refusal_seconds: u64,
}

fn default_on_demand_wait() -> u64 {
    10
}

fn default_on_demand_concurrent() -> usize {
    4
}

fn default_on_demand_per_hour() -> usize {
    20
}

fn default_on_demand_refused_cache() -> u64 {
    300
}

fn default_on_demand_max_certificates() -> usize {
    100
}

fn default_on_demand_idle() -> u64 {
    30 * 86_400
}

/// ~27 MB of Envoy memory at ~27 KB per name it holds (FACTS.md).
fn default_on_demand_max_served() -> usize {
    1_000
}

impl OnDemand {
    /// How long after a handshake last asked for a name it is withdrawn.
    pub fn withdraw_after(&self) -> std::time::Duration {
        self.withdraw_seconds.map_or_else(
            || std::time::Duration::from_secs(self.idle_seconds) / 2,
            std::time::Duration::from_secs,
        )
    }
}

fn default_on_demand_max_failures() -> u32 {
    3
}

fn default_on_demand_failed_refusal() -> u64 {
    86_400
}

/// Where a server listens: `unix:<path>` for a Unix socket (Envoy reaches it
/// as a `pipe` address; `crate::net` checks its directory and every peer),
/// or `host:port`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{text:?}: a Unix socket needs an absolute path"));
            }
            if path.len() > crate::net::MAX_SOCKET_PATH {
                return Err(format!(
                    "{text:?}: a Unix socket path has at most {} bytes",
                    crate::net::MAX_SOCKET_PATH
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        text.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{text:?} is neither host:port (an IP address) nor unix:/path"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

fn default_sds_listen() -> Listen {
    Listen::Unix(PathBuf::from(DEFAULT_SDS_SOCKET))
}

/// Kubernetes mode: certificates become `kubernetes.io/tls` Secrets and the
/// agent's state (ACME account, issued certificates, status) lives in Secrets
/// too, all in `namespace`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    pub namespace: String,
    /// Certificates derived from Gateways (Istio and Gateway API) annotated
    /// `acme-agent.envoy-acme.io/issue: "true"` in these namespaces.
    pub gateways: Option<GatewayDiscovery>,
    /// Several replicas: the holder of this Lease orders and renews.
    pub leader_election: Option<LeaderElection>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LeaderElection {
    /// The Lease's name, in the agent's namespace.
    #[serde(default = "default_lease")]
    pub lease: String,
    /// How long a holder that stopped renewing keeps the Lease.
    #[serde(default = "default_lease_seconds")]
    pub duration_seconds: u64,
}

fn default_lease() -> String {
    "acme-agent".into()
}

fn default_lease_seconds() -> u64 {
    15
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayDiscovery {
    /// Namespaces whose Gateways are watched.
    pub namespaces: Vec<String>,
}

/// Waits between failed attempts for one certificate: `initial_seconds`,
/// doubled per further failure, at most `max_seconds`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    #[serde(default = "default_retry_initial")]
    pub initial_seconds: u64,
    #[serde(default = "default_retry_max")]
    pub max_seconds: u64,
}

fn default_retry_initial() -> u64 {
    60
}

fn default_retry_max() -> u64 {
    3600
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            initial_seconds: default_retry_initial(),
            max_seconds: default_retry_max(),
        }
    }
}

impl Retry {
    pub fn backoff(&self) -> crate::domain::schedule::Backoff {
        crate::domain::schedule::Backoff {
            initial: std::time::Duration::from_secs(self.initial_seconds),
            max: std::time::Duration::from_secs(self.max_seconds),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub acme: Acme,
    /// Account credentials and certificate state (created 0700). Required
    /// unless `[kubernetes]` is set.
    pub state_dir: Option<PathBuf>,
    /// Where SDS files for Envoy are written. Required unless `[kubernetes]`
    /// is set.
    pub sds_dir: Option<PathBuf>,
    pub kubernetes: Option<Kubernetes>,
    /// The agent as Envoy's SDS server (delta xDS), for Envoy's on-demand
    /// certificate selector: any number of certificates on one listener.
    pub sds: Option<Sds>,
    /// On-demand TLS: a certificate ordered at the first handshake for a name
    /// the policy allows (needs `[sds]`).
    pub on_demand: Option<OnDemand>,
    #[serde(default)]
    pub challenge_api: ChallengeApi,
    #[serde(default)]
    pub health: Health,
    pub self_check: Option<SelfCheck>,
    /// How many certificates are ordered at once.
    #[serde(default = "default_concurrency")]
    pub order_concurrency: usize,
    #[serde(default)]
    pub retry: Retry,
    /// DNS-01 solvers by name (RFC 2136 dynamic update with TSIG).
    #[serde(default)]
    pub dns: BTreeMap<String, DnsSolver>,
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<Certificate>,
}

fn default_concurrency() -> usize {
    4
}

fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config {
        path: path.display().to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("reading config {}", path.display()),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| invalid(path, "(syntax)", e.message().to_owned()))?;
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let reason = e.inner().message().to_owned();
            // serde names an unknown or missing key in the message, at the parent's path.
            let unknown = reason
                .strip_prefix("unknown field `")
                .or_else(|| reason.strip_prefix("missing field `"))
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned);
            let field = match (unknown, field.as_str()) {
                (Some(name), "." | "") => name,
                (Some(name), at) if !at.ends_with(name.as_str()) => format!("{at}.{name}"),
                _ => field,
            };
            invalid(path, field, reason)
        })?;
        let mut config = config;
        config.read_secrets(path)?;
        config.validate(path)?;
        for (name, solver) in &mut config.dns {
            solver.secret = dns::TsigSecret(dns::read_tsig_secret(path, name, solver)?);
        }
        Ok(config)
    }

    /// Fills the secrets given as `*_file` in from their files, refusing a
    /// file others can read.
    fn read_secrets(&mut self, path: &Path) -> Result<(), Error> {
        let api = &mut self.challenge_api;
        api.token = secrets::one_of(
            path,
            "challenge_api.token",
            api.token.as_deref(),
            api.token_file.as_deref(),
        )?;
        if let Some(eab) = &mut self.acme.eab {
            let inline = (!eab.hmac_key.is_empty()).then_some(eab.hmac_key.as_str());
            eab.hmac_key = secrets::one_of(
                path,
                "acme.eab.hmac_key",
                inline,
                eab.hmac_key_file.as_deref(),
            )?
            .ok_or_else(|| invalid(path, "acme.eab.hmac_key", "missing (or hmac_key_file)"))?;
        }
        if let Some(tls) = self.sds.as_ref().and_then(|s| s.tls.as_ref()) {
            secrets::check_private(path, "sds.tls.key", &tls.key)?;
        }
        Ok(())
    }
}

/// Bytes of one challenge in a snapshot beyond its identifier, at the longest
/// token: the JSON keys and quotes, the token, and the key authorization
/// (token, '.', a 43-character thumbprint).
const CHALLENGE_JSON_BYTES: usize = 60 + MAX_TOKEN_LEN + MAX_TOKEN_LEN + 1 + 43;

/// The largest challenge snapshot `concurrency` orders at once could publish:
/// every name of the largest certificates pending together.
pub fn snapshot_bound(certificates: &[Certificate], concurrency: usize) -> usize {
    let mut sizes: Vec<usize> = certificates
        .iter()
        .map(|c| {
            c.domains
                .iter()
                .map(|d| CHALLENGE_JSON_BYTES + d.len())
                .sum()
        })
        .collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    64 + sizes.iter().take(concurrency).sum::<usize>()
}

/// Decodes base64url (padded or not), as CAs hand out EAB HMAC keys.
pub fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

impl Acme {
    /// The directory URL, with the Let's Encrypt short names resolved.
    pub fn directory_url(&self) -> &str {
        match self.directory.as_str() {
            "letsencrypt" => LETSENCRYPT,
            "letsencrypt-staging" => LETSENCRYPT_STAGING,
            other => other,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid config the tests (here and in `dns`) vary.
    pub(crate) const GOOD: &str = r#"
state_dir = "/var/lib/acme-agent"
sds_dir = "/etc/envoy/sds"

[acme]
directory = "letsencrypt-staging"
email = "ops@example.com"

[self_check]
target = "127.0.0.1:8080"

[[certificate]]
name = "www"
domains = ["www.example.com", "example.com"]

[[certificate]]
name = "api"
domains = ["api.example.com"]
key_type = "ecdsa-p384"
"#;

    /// The field a config error names (panics on anything else).
    pub(crate) fn field_of(text: &str) -> String {
        match Config::parse(text, Path::new("agent.toml")) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn good_config_with_defaults() {
        let c = Config::parse(GOOD, Path::new("agent.toml")).unwrap();
        assert_eq!(c.acme.directory_url(), LETSENCRYPT_STAGING);
        assert_eq!(
            c.challenge_api.listen,
            Listen::Unix(DEFAULT_API_SOCKET.into())
        );
        assert_eq!(c.health.listen, "127.0.0.1:9182".parse().unwrap());
        assert_eq!(c.challenge_api.token, None);
        assert_eq!(c.order_concurrency, 4);
        assert_eq!(c.certificates.len(), 2);
        assert_eq!(c.certificates[0].key_type, KeyType::EcdsaP256);
        assert_eq!(c.certificates[1].key_type, KeyType::EcdsaP384);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("state_dir", "state_dri"), "state_dri"),
            (GOOD.replace("sds_dir = \"/etc/envoy/sds\"", ""), "sds_dir"),
            (
                GOOD.replace("\"letsencrypt-staging\"", "\"http://ca.test/dir\""),
                "acme.directory",
            ),
            (
                GOOD.replace("ops@example.com", "not-an-email"),
                "acme.email",
            ),
            (GOOD.replace("email =", "mail ="), "acme.mail"),
            (
                GOOD.replace("\"127.0.0.1:8080\"", "\"localhost\""),
                "self_check.target",
            ),
            (
                GOOD.replace("\"ecdsa-p384\"", "\"dsa\""),
                "certificate[1].key_type",
            ),
            (
                GOOD.replace("\"api.example.com\"", "\"*.example.com\""),
                "certificate[1].domains",
            ),
            (
                GOOD.replace("\"api.example.com\"", "\"API.example.com\""),
                "certificate[1].domains",
            ),
            (
                GOOD.replace("name = \"api\"", "name = \"www\""),
                "certificate[1].name",
            ),
            (
                GOOD.replace("name = \"api\"", "name = \"../x\""),
                "certificate[1].name",
            ),
            (
                GOOD.replace("[\"api.example.com\"]", "[]"),
                "certificate[1].domains",
            ),
            (
                format!("order_concurrency = 0\n{GOOD}"),
                "order_concurrency",
            ),
            (
                format!("{GOOD}\n[acme.eab]\nkey_id = \"k\"\nhmac_key = \"not base64!\"\n"),
                "acme.eab.hmac_key",
            ),
            ("not toml = = 1".to_owned(), "(syntax)"),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(&text), field, "{text}");
        }
    }

    #[test]
    fn challenge_api_token_is_checked() {
        let text = format!("{GOOD}\n[challenge_api]\ntoken = \"short\"\n");
        assert_eq!(field_of(&text), "challenge_api.token");
    }

    #[test]
    fn eab_hmac_key_is_never_in_debug_output() {
        let text = format!(
            "{GOOD}\n[acme.eab]\nkey_id = \"kid-1\"\nhmac_key = \"c2VjcmV0LWhtYWMta2V5\"\n"
        );
        let c = Config::parse(&text, Path::new("agent.toml")).unwrap();
        let debug = format!("{c:?}");
        assert!(debug.contains("kid-1"));
        assert!(!debug.contains("c2VjcmV0LWhtYWMta2V5"), "{debug}");
    }
}

#[cfg(test)]
mod refusals {
    use super::*;

    fn field_of(text: &str) -> (String, String) {
        match Config::parse(text, Path::new("agent.toml")) {
            Err(Error::Config { field, reason, .. }) => (field, reason),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn config(storage: &str, certificates: &str, extra: &str) -> String {
        format!("{storage}{extra}\n[acme]\ndirectory = \"letsencrypt-staging\"\n{certificates}")
    }

    const FILES: &str = "state_dir = \"/s\"\nsds_dir = \"/d\"\n";
    const KUBE: &str = "[kubernetes]\nnamespace = \"istio-system\"\n";

    fn cert(name: &str, domains: &str) -> String {
        format!("\n[[certificate]]\nname = {name:?}\ndomains = [{domains}]\n")
    }

    #[test]
    fn ip_addresses_are_identifiers_in_canonical_form_and_never_dns_01() {
        for ip in ["192.0.2.1", "2001:db8::1"] {
            let text = config(
                FILES,
                &cert("www", &format!("{ip:?}, \"www.example.com\"")),
                "",
            );
            let parsed = Config::parse(&text, Path::new("agent.toml")).unwrap();
            assert_eq!(parsed.certificates[0].domains[0], ip);
        }
        for (ip, want) in [
            ("[2001:db8::1]", "write it as \"2001:db8::1\""),
            ("2001:DB8:0::1", "write it as \"2001:db8::1\""),
            ("10.0.0.300", "not a lower-case DNS name"),
        ] {
            let (field, reason) = field_of(&config(FILES, &cert("www", &format!("{ip:?}")), ""));
            assert_eq!(field, "certificate[0].domains", "{ip}");
            assert!(reason.contains(want), "{ip}: {reason}");
        }
        let dns01 = format!("{}challenge = \"dns-01\"\n", cert("www", "\"192.0.2.1\""));
        let (field, reason) = field_of(&config(FILES, &dns01, ""));
        assert_eq!(field, "certificate[0].challenge");
        assert!(reason.contains("dns-01 cannot validate"), "{reason}");
    }

    #[test]
    fn kubernetes_names_must_be_storable_and_not_the_agents_own() {
        let long = "a".repeat(64);
        for name in [
            "www-",
            "-www",
            long.as_str(),
            "acme-agent-status",
            "acme-agent-account-x",
        ] {
            let (field, _) = field_of(&config("", &cert(name, "\"www.example.com\""), KUBE));
            assert_eq!(field, "certificate[0].name", "{name}");
        }
        // The same names are fine for files (they name no Secret or label).
        assert!(
            Config::parse(
                &config(FILES, &cert("www-", "\"www.example.com\""), ""),
                Path::new("agent.toml")
            )
            .is_ok()
        );
        let ok = "a".repeat(63);
        assert!(
            Config::parse(
                &config("", &cert(&ok, "\"www.example.com\""), KUBE),
                Path::new("agent.toml")
            )
            .is_ok()
        );
    }

    #[test]
    fn a_snapshot_that_could_exceed_the_filters_limit_is_refused() {
        let domains: Vec<String> = (0..100)
            .map(|i| format!("\"host{i}.example.com\""))
            .collect();
        let mut certs = String::new();
        for i in 0..64 {
            certs.push_str(&cert(&format!("c{i}"), &domains.join(",")));
        }
        let (field, reason) = field_of(&config(FILES, &certs, "order_concurrency = 64\n"));
        assert_eq!(field, "order_concurrency");
        assert!(reason.contains("max_sync_bytes"), "{reason}");
        // The default concurrency stays within the filter's default limit.
        let parsed = Config::parse(&config(FILES, &certs, ""), Path::new("agent.toml")).unwrap();
        assert!(snapshot_bound(&parsed.certificates, parsed.order_concurrency) <= 1_048_576);
    }

    #[test]
    fn limits_and_api_bounds_are_checked() {
        for (extra, field) in [
            (
                "[acme.limits]\norders_per_3_hours = 0\n",
                "acme.limits.orders_per_3_hours",
            ),
            (
                "[acme.limits]\ncertificates_per_registered_domain_per_week = 0\n",
                "acme.limits.certificates_per_registered_domain_per_week",
            ),
            (
                "[acme.limits]\nfailed_authorizations_refill_seconds = 0\n",
                "acme.limits.failed_authorizations_refill_seconds",
            ),
            (
                "[acme.limits]\nconfigured_reserve_percent = 100\n",
                "acme.limits.configured_reserve_percent",
            ),
            (
                "[challenge_api]\nmax_connections = 0\n",
                "challenge_api.max_connections",
            ),
            (
                "[challenge_api]\nmax_connections = 8\nmax_held_polls = 8\n",
                "challenge_api.max_held_polls",
            ),
        ] {
            let text = format!("{FILES}\n[acme]\ndirectory = \"letsencrypt\"\n{extra}");
            assert_eq!(field_of(&text).0, field, "{text}");
        }
        let c = Config::parse(
            &format!("{FILES}\n[acme]\ndirectory = \"letsencrypt\"\n"),
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(c.acme.limits, Limits::default());
        assert_eq!(c.acme.limits.certificates_per_name_set_per_week, 5);
        assert_eq!(c.challenge_api.max_connections, 256);
    }

    #[test]
    fn the_api_token_is_never_in_debug_output() {
        let api = ChallengeApi {
            token: Some("very-secret-token-123".into()),
            ..ChallengeApi::default()
        };
        assert!(!format!("{api:?}").contains("very-secret"));
    }
}

#[cfg(test)]
mod sds_section {
    use super::*;
    use crate::domain::spec::ChallengeKind;

    #[test]
    fn tls_alpn_01_needs_sds() {
        let cert = "[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\nchallenge = \"tls-alpn-01\"\n";
        let files = format!(
            "state_dir = \"/s\"\nsds_dir = \"/d\"\n[acme]\ndirectory = \"letsencrypt\"\n{cert}"
        );
        match Config::parse(&files, Path::new("agent.toml")) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "certificate[0].challenge"),
            other => panic!("{other:?}"),
        }
        let sds = format!("state_dir = \"/s\"\n[acme]\ndirectory = \"letsencrypt\"\n[sds]\n{cert}");
        let c = Config::parse(&sds, Path::new("agent.toml")).unwrap();
        assert_eq!(c.certificates[0].challenge, ChallengeKind::TlsAlpn01);
        let http = sds.replace("tls-alpn-01", "http-01");
        let c = Config::parse(&http, Path::new("agent.toml")).unwrap();
        assert_eq!(c.certificates[0].challenge, ChallengeKind::Http01);
    }

    #[test]
    fn sds_makes_sds_dir_optional_and_listens_on_a_unix_socket() {
        let base = "state_dir = \"/s\"\n[acme]\ndirectory = \"letsencrypt\"\n";
        match Config::parse(base, Path::new("agent.toml")) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "sds_dir"),
            other => panic!("{other:?}"),
        }
        let c = Config::parse(&format!("{base}[sds]\n"), Path::new("agent.toml")).unwrap();
        assert_eq!(
            c.sds.unwrap().listen,
            Listen::Unix(DEFAULT_SDS_SOCKET.into())
        );
        let c = Config::parse(
            &format!("{base}[sds]\nlisten = \"unix:/run/acme/sds.sock\"\n"),
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(
            c.sds.unwrap().listen,
            Listen::Unix("/run/acme/sds.sock".into())
        );
        let long = format!("unix:/{}", "a".repeat(120));
        for bad in [
            "unix:relative.sock",
            "localhost:9181",
            "9181",
            long.as_str(),
        ] {
            match Config::parse(
                &format!("{base}[sds]\nlisten = {bad:?}\n"),
                Path::new("agent.toml"),
            ) {
                Err(Error::Config { field, .. }) => assert_eq!(field, "sds.listen", "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod listeners {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const BASE: &str = "state_dir = \"/s\"\n[acme]\ndirectory = \"letsencrypt\"\n";

    fn field_of(text: &str) -> String {
        match Config::parse(text, Path::new("agent.toml")) {
            Err(Error::Config { field, reason, .. }) => {
                assert!(!reason.is_empty());
                field
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn sds_on_tcp_needs_mutual_tls() {
        assert_eq!(
            field_of(&format!("{BASE}[sds]\nlisten = \"127.0.0.1:9181\"\n")),
            "sds.listen"
        );
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key.pem");
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tls = format!(
            "[sds.tls]\ncertificate = \"/c.pem\"\nkey = {:?}\nclient_ca = \"/ca.pem\"\n",
            key.display().to_string()
        );
        let ok = format!("{BASE}[sds]\nlisten = \"127.0.0.1:9181\"\n{tls}");
        assert!(Config::parse(&ok, Path::new("agent.toml")).is_ok());
        assert_eq!(field_of(&format!("{BASE}[sds]\n{tls}")), "sds.tls");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(field_of(&ok), "sds.tls.key");
        assert_eq!(
            field_of(&format!(
                "{BASE}[sds]\nlisten = \"127.0.0.1:9181\"\nallowed_uids = [0]\n"
            )),
            "sds.allowed_uids"
        );
    }

    #[test]
    fn the_api_off_loopback_needs_a_token_and_the_token_can_come_from_a_file() {
        assert_eq!(
            field_of(
                &format!("{BASE}sds_dir = \"/d\"\n[challenge_api]\nlisten = \"0.0.0.0:9180\"\n")
                    .replace("sds_dir = \"/d\"\n[challenge_api]", "[challenge_api]")
                    .replace(
                        "state_dir = \"/s\"\n",
                        "state_dir = \"/s\"\nsds_dir = \"/d\"\n"
                    )
            ),
            "challenge_api.listen"
        );
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("token");
        std::fs::write(&file, "0123456789abcdef0123456789\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "state_dir = \"/s\"\nsds_dir = \"/d\"\n[acme]\ndirectory = \"letsencrypt\"\n[challenge_api]\nlisten = \"0.0.0.0:9180\"\ntoken_file = {:?}\n",
            file.display().to_string()
        );
        let c = Config::parse(&text, Path::new("agent.toml")).unwrap();
        assert_eq!(
            c.challenge_api.token.as_deref(),
            Some("0123456789abcdef0123456789")
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        // Group-readable is accepted only for the agent's own group.
        let own_group = std::fs::metadata(&file).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.gid() == crate::net::own_ids().1
        });
        if !own_group.unwrap() {
            assert_eq!(field_of(&text), "challenge_api.token_file");
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert_eq!(field_of(&text), "challenge_api.token_file");
    }

    #[test]
    fn the_eab_key_can_come_from_a_private_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("eab");
        std::fs::write(&file, "c2VjcmV0LWhtYWMta2V5\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "state_dir = \"/s\"\nsds_dir = \"/d\"\n[acme]\ndirectory = \"letsencrypt\"\n[acme.eab]\nkey_id = \"k\"\nhmac_key_file = {:?}\n",
            file.display().to_string()
        );
        let c = Config::parse(&text, Path::new("agent.toml")).unwrap();
        assert_eq!(c.acme.eab.unwrap().hmac_key, "c2VjcmV0LWhtYWMta2V5");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(field_of(&text), "acme.eab.hmac_key_file");
        let neither = "state_dir = \"/s\"\nsds_dir = \"/d\"\n[acme]\ndirectory = \"letsencrypt\"\n[acme.eab]\nkey_id = \"k\"\n";
        assert_eq!(field_of(neither), "acme.eab.hmac_key");
    }
}

#[cfg(test)]
mod on_demand_section {
    use super::*;

    const BASE: &str = "state_dir = \"/s\"\n[acme]\ndirectory = \"letsencrypt\"\n[sds]\n";

    fn field_of(text: &str) -> String {
        match Config::parse(text, Path::new("agent.toml")) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn the_policy_is_required_and_checked() {
        let ok = format!("{BASE}[on_demand]\nallow = [\"*.shop.example.com\"]\n");
        let c = Config::parse(&ok, Path::new("agent.toml")).unwrap();
        let od = c.on_demand.unwrap();
        assert_eq!(
            (od.max_wait_seconds, od.max_concurrent, od.max_per_hour),
            (10, 4, 20)
        );
        assert_eq!(
            (
                od.max_certificates,
                od.idle_seconds,
                od.max_failures,
                od.failed_refusal_seconds
            ),
            (100, 30 * 86_400, 3, 86_400)
        );
        assert_eq!(od.max_served, 1_000);
        assert_eq!(
            od.withdraw_after(),
            std::time::Duration::from_secs(15 * 86_400),
            "half of idle_seconds unless set"
        );
        assert_eq!(
            c.acme.limits.certificates_per_registered_domain_per_week,
            50
        );
        assert_eq!(c.acme.limits.configured_reserve_percent, 20);
        for (text, field) in [
            (format!("{BASE}[on_demand]\n"), "on_demand.allow"),
            (
                format!("{BASE}[on_demand]\nallow = [\"*\"]\n"),
                "on_demand.allow[0]",
            ),
            (
                format!("{BASE}[on_demand]\nallow = [\"192.0.2.1\"]\n"),
                "on_demand.allow[0]",
            ),
            (
                format!("{BASE}[on_demand]\nask = \"ftp://x\"\n"),
                "on_demand.ask",
            ),
            (
                format!("{BASE}[on_demand]\nallow = [\"a.example.com\"]\nmax_wait_seconds = 0\n"),
                "on_demand.max_wait_seconds",
            ),
            (
                format!("{BASE}[on_demand]\nallow = [\"a.example.com\"]\nmax_certificates = 0\n"),
                "on_demand.max_certificates",
            ),
            (
                format!("{BASE}[on_demand]\nallow = [\"a.example.com\"]\nidle_seconds = 0\n"),
                "on_demand.idle_seconds",
            ),
            (
                format!("{BASE}[on_demand]\nallow = [\"a.example.com\"]\nmax_failures = 101\n"),
                "on_demand.max_failures",
            ),
            (
                format!(
                    "{BASE}[on_demand]\nallow = [\"a.example.com\"]\nfailed_refusal_seconds = 0\n"
                ),
                "on_demand.failed_refusal_seconds",
            ),
            // On-demand must be left some of the orders: 1 of 1 reserved.
            (
                format!(
                    "{}[on_demand]\nallow = [\"a.example.com\"]\n",
                    BASE.replace("[sds]\n", "[acme.limits]\norders_per_3_hours = 1\n[sds]\n")
                ),
                "acme.limits.configured_reserve_percent",
            ),
            (
                ok.replace("[sds]\n", "")
                    .replace("state_dir", "sds_dir = \"/d\"\nstate_dir"),
                "on_demand",
            ),
        ] {
            assert_eq!(field_of(&text), field, "{text}");
        }
    }
}

#[cfg(test)]
mod refusal_cases;
