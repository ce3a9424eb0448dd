//! Kubernetes mode: each certificate becomes a `kubernetes.io/tls` Secret
//! named like it (Istio's gateway reads it through `credentialName` and
//! hot-reloads it through its own SDS), and the agent's state lives in
//! Secrets of the same namespace, so a rescheduled pod keeps its ACME account
//! without a volume. Every write is a server-side apply by field manager
//! `acme-agent`; a Secret without the agent's `managed-by` label is never
//! written.

pub mod discovery;
pub mod events;
pub mod gateways;
pub mod lease;

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::Error;
use crate::domain::spec::KeyType;
use crate::ports::sink::{CertificateSink, IssuedCertificate};
use crate::ports::store::{StateStore, Status, StoredCertificate, account_id};
use crate::time::{rfc3339, unix};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "acme-agent";
pub const FIELD_MANAGER: &str = "acme-agent";
const PREFIX: &str = "acme-agent.envoy-acme.io";
const STATUS_SECRET: &str = "acme-agent-status";

fn failed(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |e| Error::Kubernetes(format!("{what}: {}", describe(&e)))
}

/// What the API server said, in its own words ("secrets \"x\" is
/// forbidden: ... (403 Forbidden)"): kube's Display appends the whole Status
/// as a debug dump, which is noise in a status line or an Event. Other
/// errors with their causes (a refused connection hides in a source).
pub(crate) fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => crate::error::with_causes(other),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Secrets in one namespace, through the Kubernetes API.
pub struct KubeStore {
    api: Api<Secret>,
    namespace: String,
}

impl KubeStore {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// The Secret, if it exists; an error if it exists and is not the agent's.
    async fn get_owned(&self, name: &str) -> Result<Option<Secret>, Error> {
        let secret = self
            .api
            .get_opt(name)
            .await
            .map_err(failed(format!("reading Secret {}/{name}", self.namespace)))?;
        match secret {
            Some(s) if !owned(&s) => Err(Error::Kubernetes(format!(
                "Secret {}/{name} exists and is not managed by acme-agent (no label {MANAGED_BY_LABEL}={MANAGED_BY}); refusing to touch it",
                self.namespace
            ))),
            other => Ok(other),
        }
    }

    /// Server-side apply of `object` (a Secret as JSON) by `manager`, after
    /// checking that an existing Secret of that name is the agent's.
    async fn apply(&self, name: &str, manager: &str, object: &Value) -> Result<(), Error> {
        self.get_owned(name).await?;
        self.patch(name, manager, object).await
    }

    /// The apply itself, for a caller that has just checked ownership.
    async fn patch(&self, name: &str, manager: &str, object: &Value) -> Result<(), Error> {
        let params = PatchParams::apply(manager).force();
        self.api
            .patch(name, &params, &Patch::Apply(object))
            .await
            .map(drop)
            .map_err(failed(format!("applying Secret {}/{name}", self.namespace)))
    }

    fn secret(&self, name: &str, type_: &str, data: BTreeMap<String, String>) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": { MANAGED_BY_LABEL: MANAGED_BY },
            },
            "type": type_,
            "data": data,
        })
    }

    fn tls_secret(
        &self,
        name: &str,
        chain_pem: &str,
        key_pem: &str,
        domains: &[String],
        key_type: Option<KeyType>,
    ) -> Value {
        let mut data = BTreeMap::new();
        data.insert("tls.crt".to_owned(), b64(chain_pem.as_bytes()));
        data.insert("tls.key".to_owned(), b64(key_pem.as_bytes()));
        let mut secret = self.secret(name, "kubernetes.io/tls", data);
        secret["metadata"]["labels"][format!("{PREFIX}/certificate")] = json!(name);
        let mut annotations = serde_json::Map::new();
        annotations.insert(format!("{PREFIX}/domains"), json!(domains.join(",")));
        if let Ok(leaf) = crate::certificate::leaf(chain_pem) {
            annotations.insert(
                format!("{PREFIX}/not-after"),
                json!(rfc3339(leaf.not_after).unwrap_or_else(|| unix(leaf.not_after).to_string())),
            );
        }
        if let Some(key_type) = key_type {
            annotations.insert(
                format!("{PREFIX}/key-type"),
                serde_json::to_value(key_type).unwrap_or(Value::Null),
            );
        }
        secret["metadata"]["annotations"] = Value::Object(annotations);
        secret
    }
}

fn owned(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

/// A data key of `secret` as text (PEM).
fn text(secret: &Secret, key: &str) -> Option<String> {
    data(secret, key).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(&format!("{PREFIX}/{key}"))
        .map(String::as_str)
}

/// Every Secret the agent reads or writes for `config` (Kubernetes mode):
/// what a Role's `resourceNames` must list.
pub fn secret_names(config: &crate::config::Config) -> Vec<String> {
    let directory = config.acme.directory_url();
    let mut names = vec![
        STATUS_SECRET.to_owned(),
        account_secret(directory),
        ledger_secret(directory),
    ];
    if !config.dns.is_empty() {
        names.push(DNS_SECRET.to_owned());
    }
    names.extend(config.certificates.iter().map(|c| c.name.clone()));
    names
}

/// The dns-01 record journal (Kubernetes mode).
const DNS_SECRET: &str = "acme-agent-dns-records";

fn account_secret(directory_url: &str) -> String {
    format!("acme-agent-account-{}", account_id(directory_url))
}

fn ledger_secret(directory_url: &str) -> String {
    format!("acme-agent-ledger-{}", account_id(directory_url))
}

#[async_trait::async_trait]
impl StateStore for KubeStore {
    async fn read_account(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .get_owned(&account_secret(directory_url))
            .await?
            .and_then(|s| data_owned(&s, "account.json")))
    }

    async fn write_account(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        let name = account_secret(directory_url);
        let mut data = BTreeMap::new();
        data.insert("account.json".to_owned(), b64(bytes));
        let mut secret = self.secret(&name, "Opaque", data);
        secret["metadata"]["annotations"] = json!({ format!("{PREFIX}/directory"): directory_url });
        self.apply(&name, FIELD_MANAGER, &secret).await
    }

    async fn forget_account(&self, directory_url: &str) -> Result<(), Error> {
        let name = account_secret(directory_url);
        let Some(old) = self.get_owned(&name).await? else {
            return Ok(());
        };
        // Applying without account.json removes it (the agent owns that field);
        // the credentials stay in the Secret under another key.
        let mut data = BTreeMap::new();
        if let Some(bytes) = data_owned(&old, "account.json") {
            data.insert(
                format!("lost-{}.json", unix(SystemTime::now())),
                b64(&bytes),
            );
        }
        let mut secret = self.secret(&name, "Opaque", data);
        secret["metadata"]["annotations"] = json!({ format!("{PREFIX}/directory"): directory_url });
        self.patch(&name, FIELD_MANAGER, &secret).await
    }

    async fn load_certificate(&self, name: &str) -> Result<Option<StoredCertificate>, Error> {
        let Some(secret) = self.get_owned(name).await? else {
            return Ok(None);
        };
        let (Some(chain_pem), Some(key_pem)) = (text(&secret, "tls.crt"), text(&secret, "tls.key"))
        else {
            return Ok(None);
        };
        let domains = annotation(&secret, "domains")
            .map(|d| {
                d.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let key_type = annotation(&secret, "key-type")
            .and_then(|k| serde_json::from_value(json!(k)).ok())
            .unwrap_or_default();
        Ok(Some(StoredCertificate {
            domains,
            key_type,
            chain_pem,
            key_pem: key_pem.into(),
        }))
    }

    async fn adopt_certificate(
        &self,
        name: &str,
        domains: &[String],
    ) -> Result<Option<StoredCertificate>, Error> {
        let secret = self
            .api
            .get_opt(name)
            .await
            .map_err(failed(format!("reading Secret {}/{name}", self.namespace)))?;
        let Some(secret) = secret.filter(|s| !owned(s)) else {
            return Ok(None);
        };
        let (chain_pem, key_pem) = (
            text(&secret, "tls.crt").unwrap_or_default(),
            text(&secret, "tls.key").unwrap_or_default(),
        );
        // Labels and ownership become the agent's; the certificate stays as
        // it is (renewed at its time, or ordered at once if it does not
        // cover the names: the trigger decides).
        let object = self.tls_secret(name, &chain_pem, &key_pem, domains, None);
        self.patch(name, FIELD_MANAGER, &object).await?;
        let from = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("cert-manager.io/certificate-name"))
            .map(|c| format!("cert-manager Certificate {c}"))
            .unwrap_or_else(|| "another writer".into());
        tracing::info!(
            certificate = name,
            from,
            "adopted the existing Secret (its certificate is served until its renewal time)"
        );
        Ok(Some(StoredCertificate {
            domains: domains.to_vec(),
            key_type: KeyType::default(),
            chain_pem,
            key_pem: key_pem.into(),
        }))
    }

    async fn save_certificate(&self, name: &str, cert: &StoredCertificate) -> Result<(), Error> {
        let secret = self.tls_secret(
            name,
            &cert.chain_pem,
            &cert.key_pem,
            &cert.domains,
            Some(cert.key_type),
        );
        self.apply(name, FIELD_MANAGER, &secret).await
    }

    async fn load_status(&self, name: &str) -> Result<Option<Status>, Error> {
        let Some(secret) = self.get_owned(STATUS_SECRET).await? else {
            return Ok(None);
        };
        Ok(data(&secret, &format!("{name}.json")).and_then(|b| serde_json::from_slice(b).ok()))
    }

    async fn save_status(&self, status: &Status) -> Result<(), Error> {
        let json = serde_json::to_vec(status).map_err(|e| Error::Kubernetes(e.to_string()))?;
        let mut data = BTreeMap::new();
        data.insert(format!("{}.json", status.name), b64(&json));
        let secret = self.secret(STATUS_SECRET, "Opaque", data);
        // One field manager per certificate: each apply owns only its own key,
        // so concurrent updates of different certificates never remove each other.
        self.apply(
            STATUS_SECRET,
            &format!("{FIELD_MANAGER}-status-{}", status.name),
            &secret,
        )
        .await
    }

    async fn read_ledger(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .get_owned(&ledger_secret(directory_url))
            .await?
            .and_then(|s| data_owned(&s, "ledger.json")))
    }

    async fn write_ledger(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        let name = ledger_secret(directory_url);
        let mut data = BTreeMap::new();
        data.insert("ledger.json".to_owned(), b64(bytes));
        let mut secret = self.secret(&name, "Opaque", data);
        secret["metadata"]["annotations"] = json!({ format!("{PREFIX}/directory"): directory_url });
        self.apply(&name, FIELD_MANAGER, &secret).await
    }

    async fn read_dns_journal(&self) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .get_owned(DNS_SECRET)
            .await?
            .and_then(|s| data_owned(&s, "records.json")))
    }

    async fn write_dns_journal(&self, bytes: &[u8]) -> Result<(), Error> {
        let mut data = BTreeMap::new();
        data.insert("records.json".to_owned(), b64(bytes));
        let secret = self.secret(DNS_SECRET, "Opaque", data);
        self.apply(DNS_SECRET, FIELD_MANAGER, &secret).await
    }

    async fn status_names(&self) -> Result<Vec<String>, Error> {
        let Some(secret) = self.get_owned(STATUS_SECRET).await? else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = secret
            .data
            .unwrap_or_default()
            .into_keys()
            .filter_map(|k| k.strip_suffix(".json").map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }
}

fn data_owned(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    data(secret, key).map(<[u8]>::to_vec)
}

#[async_trait::async_trait]
impl CertificateSink for KubeStore {
    /// The Secret `save_certificate` wrote already holds this certificate in
    /// the normal flow; then nothing is sent. Otherwise it is applied with the
    /// names and key type read from the certificate itself.
    async fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let name = &certificate.name;
        // One read: the ownership check and the comparison share it.
        if let Some(existing) = self.get_owned(name).await?
            && data(&existing, "tls.crt") == Some(certificate.chain_pem.as_bytes())
            && data(&existing, "tls.key") == Some(certificate.key_pem.as_bytes())
        {
            return Ok(());
        }
        let domains: Vec<String> = crate::certificate::leaf(&certificate.chain_pem)
            .map(|l| l.names.into_iter().collect())
            .unwrap_or_default();
        let key_type = rcgen::KeyPair::from_pem(&certificate.key_pem)
            .ok()
            .map(|k| {
                if k.algorithm() == &rcgen::PKCS_ECDSA_P384_SHA384 {
                    KeyType::EcdsaP384
                } else {
                    KeyType::EcdsaP256
                }
            });
        let secret = self.tls_secret(
            name,
            &certificate.chain_pem,
            &certificate.key_pem,
            &domains,
            key_type,
        );
        self.patch(name, FIELD_MANAGER, &secret).await
    }

    async fn installed(&self, name: &str) -> bool {
        matches!(self.get_owned(name).await, Ok(Some(_)))
    }

    async fn check_writable(&self, name: &str) -> Result<(), Error> {
        self.get_owned(name).await.map(drop)
    }

    /// Istio serves nothing for a missing credentialName and starts anyway.
    fn wants_placeholder(&self) -> bool {
        false
    }
}
