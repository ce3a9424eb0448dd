//! What Envoy is served, as the rest of the agent sees it: the secret set
//! (each certificate's chain and key under every name it covers) and the
//! gate asked about names that have none (on-demand TLS). The SDS
//! server speaks xDS over them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, TlsCertificate, secret,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use tokio::sync::watch;

use crate::ports::sink::SECRET_TYPE;

/// One certificate's material, held once however many names it is served
/// under; the key is zeroed when the last reference goes.
pub(crate) struct Material {
    /// Shared: every stream compares it on every change.
    version: Arc<str>,
    chain_pem: String,
    key_pem: zeroize::Zeroizing<String>,
}

/// What a name is served: its certificate and that certificate's material.
#[derive(Clone)]
struct Served {
    /// The certificate it belongs to (a name may move to another one).
    certificate: String,
    material: Arc<Material>,
}

/// Names changed lately, for streams that only look at what changed: a
/// stream further behind than this looks at all its names once.
const CHANGE_LOG: usize = 8192;

/// The served names, which certificate serves which, and the names changed
/// lately with the generation of each change. One lock: a stream reads a
/// consistent view.
#[derive(Default)]
struct Inner {
    by_name: BTreeMap<String, Served>,
    /// Every name a certificate is served under: a change touches only its own.
    by_certificate: HashMap<String, Vec<String>>,
    generation: u64,
    log: VecDeque<(u64, String)>,
    /// The newest generation with a name dropped from the log.
    forgotten: u64,
}

impl Inner {
    fn log(&mut self, names: impl IntoIterator<Item = String>) {
        self.generation += 1;
        for name in names {
            if self.log.len() == CHANGE_LOG
                && let Some((generation, _)) = self.log.pop_front()
            {
                self.forgotten = generation;
            }
            self.log.push_back((self.generation, name));
        }
    }
}

/// What the SDS server serves, keyed by secret name (lower case, without a
/// trailing dot).
pub struct SecretSet {
    secrets: Mutex<Inner>,
    changed: watch::Sender<u64>,
    /// Names all open streams track (what Envoy asked for and did not drop).
    subscribed: std::sync::atomic::AtomicUsize,
}

impl Default for SecretSet {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn version_of(chain_pem: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, chain_pem.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The secret named `name` (as Envoy asked: it checks the name) carrying
/// `material`. Encoded per answer rather than kept, so a key is held once,
/// not once per name.
pub(crate) fn encode(name: &str, material: &Material) -> Any {
    let inline = |text: &str| DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.to_owned())),
        ..DataSource::default()
    };
    let secret = Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&material.chain_pem)),
            private_key: Some(inline(&material.key_pem)),
            ..TlsCertificate::default()
        })),
    };
    Any {
        type_url: SECRET_TYPE.to_owned(),
        value: secret.encode_to_vec(),
    }
}

/// A name as TLS compares it: case-insensitive, a trailing dot ignored.
pub fn normalized(name: &str) -> std::borrow::Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

impl SecretSet {
    pub fn new() -> Self {
        Self {
            secrets: Mutex::new(Inner::default()),
            changed: watch::Sender::new(0),
            subscribed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.secrets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves `certificate` under its name and each of `names`, replacing
    /// what it served before (a name it no longer covers is removed).
    pub fn set(&self, certificate: &str, names: &[String], chain_pem: &str, key_pem: &str) {
        let material = Arc::new(Material {
            version: version_of(chain_pem).into(),
            chain_pem: chain_pem.to_owned(),
            key_pem: zeroize::Zeroizing::new(key_pem.to_owned()),
        });
        let wanted: Vec<String> = std::iter::once(certificate)
            .chain(names.iter().map(String::as_str))
            .map(|n| normalized(n).into_owned())
            .collect();
        let mut inner = self.lock();
        let before = inner
            .by_certificate
            .insert(certificate.to_owned(), wanted.clone())
            .unwrap_or_default();
        for name in &before {
            if !wanted.contains(name)
                && inner
                    .by_name
                    .get(name)
                    .is_some_and(|s| s.certificate == certificate)
            {
                inner.by_name.remove(name);
            }
        }
        for name in &wanted {
            inner.by_name.insert(
                name.clone(),
                Served {
                    certificate: certificate.to_owned(),
                    material: Arc::clone(&material),
                },
            );
        }
        let generation = inner.generation + 1;
        inner.log(before.into_iter().chain(wanted));
        drop(inner);
        self.changed.send_replace(generation);
    }

    /// Stops serving everything of `certificate`.
    pub fn remove(&self, certificate: &str) {
        let mut inner = self.lock();
        let Some(names) = inner.by_certificate.remove(certificate) else {
            return;
        };
        for name in &names {
            if inner
                .by_name
                .get(name)
                .is_some_and(|s| s.certificate == certificate)
            {
                inner.by_name.remove(name);
            }
        }
        let generation = inner.generation + 1;
        inner.log(names);
        drop(inner);
        self.changed.send_replace(generation);
    }

    /// The generation of the last change, and the names changed after
    /// `generation`; `None` when the log no longer reaches back that far
    /// (look at every name).
    pub(crate) fn changed_since(&self, generation: u64) -> (u64, Option<Vec<String>>) {
        let inner = self.lock();
        let names = (inner.forgotten <= generation).then(|| {
            inner
                .log
                .iter()
                .filter(|(g, _)| *g > generation)
                .map(|(_, n)| n.clone())
                .collect()
        });
        (inner.generation, names)
    }

    /// The material served for `name`: its own certificate's, else a
    /// wildcard's for its parent (one label only, as TLS matches wildcards).
    pub(crate) fn material(&self, name: &str) -> Option<Arc<Material>> {
        let name = normalized(name);
        let inner = self.lock();
        if let Some(s) = inner.by_name.get(name.as_ref()) {
            return Some(Arc::clone(&s.material));
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() || label == "*" {
            return None;
        }
        let wildcard = inner.by_name.get(&format!("*.{parent}"))?;
        Some(Arc::clone(&wildcard.material))
    }

    /// The version and resource served under `name`, named as asked.
    pub(crate) fn get(&self, name: &str) -> Option<(Arc<str>, Any)> {
        let material = self.material(name)?;
        Some((Arc::clone(&material.version), encode(name, &material)))
    }

    /// The version served under `name`, without encoding anything.
    pub(crate) fn version(&self, name: &str) -> Option<Arc<str>> {
        self.material(name).map(|m| Arc::clone(&m.version))
    }

    /// Names the open streams track in all: bounded by what Envoy keeps
    /// subscribed (it drops a name answered "removed").
    /// Changes whenever what is served changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The count of names the open streams track, kept by the SDS server.
    pub fn subscribed_counter(&self) -> &std::sync::atomic::AtomicUsize {
        &self.subscribed
    }

    pub fn subscribed_names(&self) -> usize {
        self.subscribed.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().by_name.contains_key(normalized(name).as_ref())
    }

    pub fn len(&self) -> usize {
        self.lock().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the SDS server asks about a name it has no certificate for (on-demand
/// TLS).
pub trait Gate: Send + Sync {
    /// A handshake asked for `name`: `Some(wait)` holds the answer that long
    /// while a certificate is being got; `None` refuses it at once.
    fn requested(&self, name: &str) -> Option<Duration>;
    /// Whether `name`, held, has been refused since (answer it at once).
    fn refused(&self, name: &str) -> bool;
    /// Changes when a held name is refused, to wake the streams holding it.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// A handshake asked for `name`, which is served (Envoy asks only at its
    /// first handshake for a name, and again after a removal), or a held
    /// name is served now.
    fn seen(&self, _name: &str) {}
}
