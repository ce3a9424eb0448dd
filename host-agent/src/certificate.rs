//! What the agent needs to know about an issued certificate, and the checks
//! it must pass before it is installed: the leaf matches the key and covers
//! every configured domain.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use instant_acme::CertificateIdentifier;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

/// The facts about a leaf certificate the schedule and the status need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// DNS names (lower-cased) and IP addresses (as text, the way the config
    /// spells them) from the subjectAltName extension.
    pub names: BTreeSet<String>,
    /// The ARI identifier (RFC 9773 section 4.1), when the leaf has an AKI.
    pub ari_id: Option<String>,
}

impl Leaf {
    /// True when every domain in `domains` is among the leaf's names.
    pub fn covers<'a>(&self, domains: impl IntoIterator<Item = &'a String>) -> bool {
        domains.into_iter().all(|d| self.names.contains(d))
    }

    /// The leaf's validity as a duration (zero when the dates are inverted).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Certificate(reason.into())
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// The certificates of a PEM chain, leaf first.
pub fn parse_chain(chain_pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("chain is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(bad("chain holds no certificate"));
    }
    Ok(chain)
}

/// Reads the leaf (first certificate) of a PEM chain.
pub fn leaf(chain_pem: &str) -> Result<Leaf, Error> {
    let chain = parse_chain(chain_pem)?;
    let (_, cert) = X509Certificate::from_der(chain[0].as_ref())
        .map_err(|e| bad(format!("leaf is not X.509: {e}")))?;
    let mut names = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    names.insert(dns.to_ascii_lowercase());
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let ari_id = CertificateIdentifier::try_from(&chain[0])
        .ok()
        .map(|id| id.to_string());
    Ok(Leaf {
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
        names,
        ari_id,
    })
}

/// Checks a chain and key before they are installed or served: the leaf's
/// public key is the key's, it covers `domains`, and it is not expired at
/// `now`. Returns the leaf's facts.
pub fn verify(
    chain_pem: &str,
    key_pem: &str,
    domains: &[String],
    now: SystemTime,
) -> Result<Leaf, Error> {
    let chain = parse_chain(chain_pem)?;
    let (_, cert) = X509Certificate::from_der(chain[0].as_ref())
        .map_err(|e| bad(format!("leaf is not X.509: {e}")))?;
    // The error of KeyPair::from_pem can quote input; say only that it failed.
    let key = KeyPair::from_pem(key_pem).map_err(|_| bad("private key is not a PKCS#8 PEM key"))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad("leaf certificate does not match the private key"));
    }
    let info = leaf(chain_pem)?;
    let missing: Vec<&String> = domains
        .iter()
        .filter(|d| !info.names.contains(*d))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!("leaf does not cover {missing:?}")));
    }
    if info.not_after <= now {
        return Err(bad("leaf has expired"));
    }
    Ok(info)
}

/// A self-signed stand-in for a certificate not issued yet: Envoy refuses to
/// start when an SDS file it is told to watch does not exist, so the agent
/// writes this first and replaces it with the CA's certificate the moment it
/// arrives. Valid for a week from an hour ago; clients will not trust it, which
/// is the point. Returns (chain PEM, key PEM).
pub fn placeholder(
    domains: &[String],
    key_type: crate::domain::spec::KeyType,
) -> Result<(String, String), Error> {
    let alg = match key_type {
        crate::domain::spec::KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        crate::domain::spec::KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let key = KeyPair::generate_for(alg).map_err(|e| bad(format!("generating a key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(domains.to_vec())
        .map_err(|e| bad(format!("placeholder names: {e}")))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, PLACEHOLDER_CN);
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(7);
    let cert = params
        .self_signed(&key)
        .map_err(|e| bad(format!("signing the placeholder: {e}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The subject CN of [`placeholder`] certificates.
pub const PLACEHOLDER_CN: &str = "acme-agent placeholder (certificate not issued yet)";

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, PKCS_ECDSA_P256_SHA256};

    fn self_signed(names: &[&str]) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn domains(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_matching_key_and_covered_domains() {
        let (chain, key) = self_signed(&["a.example.com", "b.example.com"]);
        let leaf = verify(
            &chain,
            &key,
            &domains(&["b.example.com", "a.example.com"]),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(leaf.names.len(), 2);
        assert!(leaf.not_after > leaf.not_before);
        assert!(leaf.covers(&domains(&["a.example.com"])));
        assert!(!leaf.covers(&domains(&["c.example.com"])));
    }

    #[test]
    fn ip_addresses_are_names_as_the_config_writes_them() {
        let (chain, key) = self_signed(&["192.0.2.7", "2001:db8::1", "www.example.com"]);
        let leaf = verify(
            &chain,
            &key,
            &domains(&["2001:db8::1", "192.0.2.7"]),
            SystemTime::now(),
        )
        .unwrap();
        assert!(leaf.names.contains("192.0.2.7"));
        assert!(leaf.names.contains("2001:db8::1"));
        assert!(!leaf.covers(&domains(&["192.0.2.8"])));
    }

    #[test]
    fn refuses_a_key_of_another_certificate() {
        let (chain, _) = self_signed(&["a.example.com"]);
        let (_, other_key) = self_signed(&["a.example.com"]);
        let err = verify(
            &chain,
            &other_key,
            &domains(&["a.example.com"]),
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn refuses_a_leaf_missing_a_domain() {
        let (chain, key) = self_signed(&["a.example.com"]);
        let err = verify(
            &chain,
            &key,
            &domains(&["a.example.com", "new.example.com"]),
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("new.example.com"), "{err}");
    }

    #[test]
    fn refuses_garbage_and_never_quotes_the_key() {
        let (chain, _) = self_signed(&["a.example.com"]);
        let secretish = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n";
        let err = verify(&chain, secretish, &[], SystemTime::now()).unwrap_err();
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        assert!(verify("not pem", secretish, &[], SystemTime::now()).is_err());
        assert!(leaf("").is_err());
    }

    #[test]
    fn placeholder_matches_its_key_and_names() {
        let names = domains(&["a.example.com", "b.example.com"]);
        let (chain, key) = placeholder(&names, crate::domain::spec::KeyType::EcdsaP384).unwrap();
        let leaf = verify(&chain, &key, &names, SystemTime::now()).unwrap();
        let week = leaf.lifetime().as_secs();
        assert!((7 * 86_400..=7 * 86_400 + 3600).contains(&week), "{week}");
    }

    #[test]
    fn refuses_an_expired_leaf() {
        let (chain, key) = self_signed(&["a.example.com"]);
        let far = SystemTime::now() + Duration::from_secs(5000 * 86_400 * 365);
        assert!(verify(&chain, &key, &[], far).is_err());
    }
}
