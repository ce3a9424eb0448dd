//! `[dns.<name>]`: a DNS-01 solver that writes `_acme-challenge` TXT records
//! into a zone by RFC 2136 dynamic update, signed with a TSIG key, or by
//! commands of the operator's (`exec`) for any other provider.

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
    /// The zone's primary server: it takes the RFC 2136 updates (required
    /// without `exec`), and the zone's nameservers are read from it
    /// (`address:port`, or an address for port 53). With `exec`, optional:
    /// without it they are looked up through the resolver.
    #[serde(default, deserialize_with = "optional_server_address")]
    pub server: Option<SocketAddr>,
    /// The zone the records are written in (its apex, e.g. `example.com`).
    pub zone: String,
    /// The TSIG key's name, as the server knows it (RFC 2136 only).
    #[serde(default)]
    pub tsig_key: Option<String>,
    #[serde(default)]
    pub tsig_algorithm: TsigAlgorithm,
    /// A file holding the key's base64 secret, alone or as the `key` clause
    /// `tsig-keygen` prints. Read at start; never logged (RFC 2136 only).
    #[serde(default)]
    pub tsig_secret_file: Option<PathBuf>,
    /// Commands that add and remove the record instead of RFC 2136.
    #[serde(default)]
    pub exec: Option<ExecHook>,
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

/// `[dns.<name>.exec]`: a provider scripted by the operator. Each command is
/// a program (an absolute path) and its arguments, run without a shell,
/// with the record in its environment (`ACME_DNS_NAME`, `ACME_DNS_VALUE`,
/// `ACME_DNS_ZONE`, `ACME_DNS_TTL`); exit status 0 is success.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecHook {
    /// Adds the TXT record (beside any others of its name).
    pub present: Vec<String>,
    /// Removes exactly that record (same name and value).
    pub clean_up: Vec<String>,
    /// Each run may take this long; then it is killed and counts as failed.
    #[serde(default = "default_exec_timeout")]
    pub timeout_seconds: u64,
}

fn default_exec_timeout() -> u64 {
    30
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

/// Reads the secret of `solver`'s key (none for an `exec` solver); the
/// error names the field.
pub fn read_tsig_secret(path: &Path, name: &str, solver: &DnsSolver) -> Result<Vec<u8>, Error> {
    let field = format!("dns.{name}.tsig_secret_file");
    let Some(file) = &solver.tsig_secret_file else {
        return Ok(Vec::new());
    };
    super::secrets::check_private(path, &field, file)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| invalid(path, &field, format!("{}: {e}", file.display())))?;
    parse_tsig_secret(&text).ok_or_else(|| {
        invalid(
            path,
            &field,
            format!(
                "{} holds no base64 secret (neither alone nor as `secret \"...\";` of a tsig-keygen key clause)",
                file.display()
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
        match &self.exec {
            Some(exec) => self.validate_exec(path, name, exec)?,
            None => self.validate_rfc2136(path, name)?,
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

impl DnsSolver {
    /// RFC 2136: the primary and the key are required.
    fn validate_rfc2136(&self, path: &Path, name: &str) -> Result<(), Error> {
        let at = |f: &str| format!("dns.{name}.{f}");
        let need =
            "required for RFC 2136 updates (or set [dns.<name>.exec] to run commands instead)";
        if self.server.is_none() {
            return Err(invalid(path, at("server"), need));
        }
        let Some(key) = &self.tsig_key else {
            return Err(invalid(path, at("tsig_key"), need));
        };
        if !is_valid_domain(key.trim_end_matches('.')) && !is_dns_label(key) {
            return Err(invalid(
                path,
                at("tsig_key"),
                format!("{key:?} is not a key name (a DNS name)"),
            ));
        }
        if self.tsig_secret_file.is_none() {
            return Err(invalid(path, at("tsig_secret_file"), need));
        }
        Ok(())
    }

    /// `exec`: two commands, each an absolute path to an executable; no
    /// TSIG key (nothing would use it).
    fn validate_exec(&self, path: &Path, name: &str, exec: &ExecHook) -> Result<(), Error> {
        let at = |f: &str| format!("dns.{name}.{f}");
        if self.tsig_key.is_some() || self.tsig_secret_file.is_some() {
            let field = if self.tsig_key.is_some() {
                "tsig_key"
            } else {
                "tsig_secret_file"
            };
            return Err(invalid(
                path,
                at(field),
                "a solver with [exec] commands uses no TSIG key: remove it, or remove [exec] for RFC 2136",
            ));
        }
        for (field, command) in [
            ("exec.present", &exec.present),
            ("exec.clean_up", &exec.clean_up),
        ] {
            let Some(program) = command.first() else {
                return Err(invalid(
                    path,
                    at(field),
                    "a program and its arguments, e.g. [\"/usr/local/bin/dns-hook\", \"present\"]",
                ));
            };
            let program = Path::new(program);
            if !program.is_absolute() {
                return Err(invalid(
                    path,
                    at(field),
                    format!(
                        "{} is not an absolute path (no PATH lookup: say which program runs)",
                        program.display()
                    ),
                ));
            }
            if !is_executable(program) {
                return Err(invalid(
                    path,
                    at(field),
                    format!("{} is not an executable file", program.display()),
                ));
            }
        }
        if exec.timeout_seconds == 0 || exec.timeout_seconds > 600 {
            return Err(invalid(
                path,
                at("exec.timeout_seconds"),
                "must be between 1 and 600",
            ));
        }
        Ok(())
    }
}

/// A regular file with an execute bit.
fn is_executable(program: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(program).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
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
        assert_eq!(solver_config.server, Some("192.0.2.53:53".parse().unwrap()));
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

    #[test]
    fn an_exec_solver_needs_no_server_and_no_key() {
        let text = format!(
            "{}\n[dns.hook]\nzone = \"example.com\"\n[dns.hook.exec]\npresent = [\"/bin/true\", \"add\"]\nclean_up = [\"/bin/true\", \"del\"]\n",
            GOOD.replace(
                "key_type = \"ecdsa-p384\"",
                "key_type = \"ecdsa-p384\"\ndns = \"hook\""
            )
            .replace("\"api.example.com\"]", "\"*.example.com\"]")
        );
        let c = Config::parse(&text, Path::new("agent.toml")).unwrap();
        let hook = &c.dns["hook"];
        assert_eq!(hook.server, None);
        assert!(hook.secret.0.is_empty());
        let exec = hook.exec.as_ref().unwrap();
        assert_eq!(exec.present, ["/bin/true", "add"]);
        assert_eq!(exec.timeout_seconds, 30);
    }
}
