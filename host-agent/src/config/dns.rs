//! `[dns.<name>]`: a DNS-01 solver that writes `_acme-challenge` TXT records
//! into a zone by RFC 2136 dynamic update, signed with a TSIG key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::invalid;
use crate::Error;
use crate::domain::names::is_valid_domain;

/// The HMAC a TSIG key uses (`tsig-keygen -a <algorithm>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum TsigAlgorithm {
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DnsSolver {
    /// The zone's primary server, which accepts updates: `address:port`, or
    /// an address (port 53).
    #[serde(deserialize_with = "server_address")]
    pub server: SocketAddr,
    /// The zone the records are written in (its apex, e.g. `example.com`).
    pub zone: String,
    /// The TSIG key's name, as the server knows it.
    pub tsig_key: String,
    #[serde(default)]
    pub tsig_algorithm: TsigAlgorithm,
    /// A file holding the key's base64 secret, alone or as the `key` clause
    /// `tsig-keygen` prints. Read at start; never logged.
    pub tsig_secret_file: PathBuf,
    /// TTL of the TXT records written.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// How long every authoritative nameserver of the zone may take to serve
    /// a record before the order fails (the CA is not told before).
    #[serde(default = "default_propagation_timeout")]
    pub propagation_timeout_seconds: u64,
    /// A recursive resolver to follow `_acme-challenge` CNAMEs and find the
    /// zone's nameservers with: `address:port` or an address (port 53).
    /// Default: the first `nameserver` of /etc/resolv.conf.
    #[serde(default, deserialize_with = "optional_server_address")]
    pub resolver: Option<SocketAddr>,
    /// The key's secret, read from `tsig_secret_file` when the config loads.
    #[serde(skip)]
    pub secret: TsigSecret,
}

/// A TSIG secret: compared, never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TsigSecret(pub Vec<u8>);

impl std::fmt::Debug for TsigSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn default_ttl() -> u32 {
    60
}

fn default_propagation_timeout() -> u64 {
    120
}

/// `address:port`, or an address alone for port 53.
pub fn parse_server(text: &str) -> Option<SocketAddr> {
    text.parse().ok().or_else(|| {
        text.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

fn server_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_server(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{text:?} is neither address:port nor an IP address"
        ))
    })
}

fn optional_server_address<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    server_address(d).map(Some)
}

/// The secret of a TSIG key file: the base64 text alone, or the `secret
/// "..."` line of a `key` clause as `tsig-keygen` prints it.
pub fn parse_tsig_secret(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let secret = match text.split_once("secret") {
        Some((_, rest)) => rest.split('"').nth(1)?,
        None => text.trim(),
    };
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim())
        .ok()
        .filter(|k| !k.is_empty())
}

/// Reads the secret of `solver`'s key; the error names the field.
pub fn read_tsig_secret(path: &Path, name: &str, solver: &DnsSolver) -> Result<Vec<u8>, Error> {
    let field = format!("dns.{name}.tsig_secret_file");
    super::secrets::check_private(path, &field, &solver.tsig_secret_file)?;
    let text = std::fs::read_to_string(&solver.tsig_secret_file).map_err(|e| {
        invalid(
            path,
            &field,
            format!("{}: {e}", solver.tsig_secret_file.display()),
        )
    })?;
    parse_tsig_secret(&text).ok_or_else(|| {
        invalid(
            path,
            &field,
            format!(
                "{} holds no base64 secret (neither alone nor as `secret \"...\";` of a tsig-keygen key clause)",
                solver.tsig_secret_file.display()
            ),
        )
    })
}

impl DnsSolver {
    pub(super) fn validate(&self, path: &Path, name: &str) -> Result<(), Error> {
        let at = |f: &str| format!("dns.{name}.{f}");
        let label_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !label_ok {
            return Err(invalid(
                path,
                format!("dns.{name}"),
                "a solver's name must be 1-64 characters of [A-Za-z0-9_-]",
            ));
        }
        if !is_valid_domain(&self.zone) {
            return Err(invalid(
                path,
                at("zone"),
                format!("{:?} is not a lower-case DNS name", self.zone),
            ));
        }
        if !is_valid_domain(self.tsig_key.trim_end_matches('.')) && !is_dns_label(&self.tsig_key) {
            return Err(invalid(
                path,
                at("tsig_key"),
                format!("{:?} is not a key name (a DNS name)", self.tsig_key),
            ));
        }
        if self.ttl == 0 || self.ttl > 86_400 {
            return Err(invalid(path, at("ttl"), "must be between 1 and 86400"));
        }
        if self.propagation_timeout_seconds == 0 || self.propagation_timeout_seconds > 3600 {
            return Err(invalid(
                path,
                at("propagation_timeout_seconds"),
                "must be between 1 and 3600",
            ));
        }
        Ok(())
    }
}

/// One DNS label (`tsig-keygen` names keys like `acme-agent`).
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsig_secret_alone_or_in_a_key_clause() {
        assert_eq!(parse_tsig_secret("aGVsbG8=\n"), Some(b"hello".to_vec()));
        let clause = "key \"acme\" {\n\talgorithm hmac-sha256;\n\tsecret \"aGVsbG8=\";\n};\n";
        assert_eq!(parse_tsig_secret(clause), Some(b"hello".to_vec()));
        assert_eq!(parse_tsig_secret("not base64!"), None);
        assert_eq!(parse_tsig_secret(""), None);
    }

    #[test]
    fn server_with_or_without_port() {
        assert_eq!(
            parse_server("192.0.2.1"),
            Some("192.0.2.1:53".parse().unwrap())
        );
        assert_eq!(
            parse_server("192.0.2.1:5353"),
            Some("192.0.2.1:5353".parse().unwrap())
        );
        assert_eq!(parse_server("[::1]:53"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_server("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_server("ns1.example.com"), None);
    }

    use crate::config::Config;
    use crate::config::tests::{GOOD, field_of};
    use crate::domain::spec::ChallengeKind;

    #[test]
    fn wildcards_need_a_dns_solver_whose_secret_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("tsig.key");
        std::fs::write(
            &secret,
            "key \"acme\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0LWtleS1ieXRlcw==\";\n};\n",
        )
        .unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let solver = format!(
            "\n[dns.main]\nserver = \"192.0.2.53\"\nzone = \"example.com\"\ntsig_key = \"acme\"\ntsig_secret_file = {:?}\n",
            secret.display().to_string()
        );
        let wildcard = GOOD.replace("\"api.example.com\"]", "\"*.example.com\"]");
        // No solver: refused, saying what to add.
        match Config::parse(&wildcard, Path::new("agent.toml")) {
            Err(Error::Config { field, reason, .. }) => {
                assert_eq!(field, "certificate[1].domains");
                assert!(reason.contains("[dns.<name>]"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A solver named by the certificate: accepted, secret loaded, mixed
        // challenges (the apex keeps http-01).
        let text = format!(
            "{}{solver}",
            wildcard.replace(
                "key_type = \"ecdsa-p384\"",
                "key_type = \"ecdsa-p384\"\ndns = \"main\""
            )
        );
        let c = Config::parse(&text, Path::new("agent.toml")).unwrap();
        let solver_config = &c.dns["main"];
        assert_eq!(solver_config.server, "192.0.2.53:53".parse().unwrap());
        assert_eq!(solver_config.secret.0, b"secret-key-bytes");
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
        let cert = &c.certificates[1];
        assert!(cert.uses_dns());
        assert_eq!(cert.challenge_for(true), ChallengeKind::Dns01);
        assert_eq!(cert.challenge_for(false), ChallengeKind::Http01);
        // Unknown solver, dns-01 without a solver, a missing secret file.
        for (bad, field) in [
            (
                text.replace("dns = \"main\"", "dns = \"other\""),
                "certificate[1].dns",
            ),
            (
                format!(
                    "{}{solver}",
                    GOOD.replace("key_type = \"ecdsa-p384\"", "challenge = \"dns-01\"")
                ),
                "certificate[1].dns",
            ),
            (
                text.replace("tsig.key", "missing.key"),
                "dns.main.tsig_secret_file",
            ),
            (
                text.replace("zone = \"example.com\"", "zone = \"Example\""),
                "dns.main.zone",
            ),
            (
                text.replace("\"192.0.2.53\"", "\"ns1.example.com\""),
                "dns.main.server",
            ),
            (
                text.replace("zone =", "tsig_algorithm = \"hmac-md5\"\nzone ="),
                "dns.main.tsig_algorithm",
            ),
        ] {
            assert_eq!(field_of(&bad), field, "{bad}");
        }
    }
}
