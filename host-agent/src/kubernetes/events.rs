//! Kubernetes Events about certificates, where `kubectl describe` and
//! `kubectl get events` show them (what cert-manager users look at first):
//! issued, renewed, failed (the error kind and message), waiting for a
//! CA-limit budget, a Gateway's request refused. Recorded on the Gateways a
//! derived certificate comes from, or on the Secret of a config-file
//! certificate. Aggregated by
//! kube-runtime's `Recorder`: the same reason on the same object within its
//! window patches the Event's series count instead of creating another, so a
//! retry loop does not flood the namespace.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tracing::warn;

use crate::ports::events::{Events, GatewayRef, Happened};
use crate::time::rfc3339;

/// Events waiting to be sent; more are dropped (and logged) rather than
/// holding the manager up.
const QUEUE: usize = 256;
/// The Events API refuses a note over 1 kB.
const MAX_NOTE: usize = 1000;

/// The Kubernetes Event for what happened.
fn event(happened: &Happened) -> Event {
    {
        let at = |t: &SystemTime| rfc3339(*t).unwrap_or_default();
        let (type_, reason, action, note) = match happened {
            Happened::Conflict { message } => {
                (EventType::Warning, "Conflict", "Derive", message.clone())
            }
            Happened::Issued { not_after } => (
                EventType::Normal,
                "Issued",
                "Order",
                format!("certificate issued, valid until {}", at(not_after)),
            ),
            Happened::Renewed { not_after } => (
                EventType::Normal,
                "Renewed",
                "Order",
                format!("certificate renewed, valid until {}", at(not_after)),
            ),
            Happened::Failed { kind, message } => (
                EventType::Warning,
                "Failed",
                "Order",
                // Most messages name their kind already ("kubernetes: ...").
                if message.starts_with(kind.as_str()) {
                    message.clone()
                } else {
                    format!("{kind}: {message}")
                },
            ),
            Happened::WaitingForBudget { limit, until } => (
                EventType::Warning,
                "WaitingForCALimit",
                "Order",
                format!(
                    "the CA's limit {limit} is used up; next order at {}",
                    at(until)
                ),
            ),
        };
        let mut note = note;
        if note.len() > MAX_NOTE {
            let mut end = MAX_NOTE;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        }
    }
}

/// Events in the cluster, sent in order by one task (an aggregated Event is
/// created, then patched).
pub struct KubeEvents {
    namespace: String,
    queue: mpsc::Sender<(ObjectReference, Happened)>,
    users: Mutex<BTreeMap<String, Vec<GatewayRef>>>,
}

fn gateway_reference(gateway: &GatewayRef) -> ObjectReference {
    ObjectReference {
        api_version: Some(gateway.kind.api_version().into()),
        kind: Some("Gateway".into()),
        name: Some(gateway.name.clone()),
        namespace: Some(gateway.namespace.clone()),
        uid: gateway.uid.clone(),
        ..ObjectReference::default()
    }
}

impl KubeEvents {
    /// Spawns the sender on the current runtime; certificates' Secrets are in
    /// `namespace`.
    pub fn start(client: Client, namespace: &str) -> Self {
        let reporter = Reporter {
            controller: "acme-agent".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = Recorder::new(client, reporter);
        let (queue, mut rx) = mpsc::channel::<(ObjectReference, Happened)>(QUEUE);
        tokio::spawn(async move {
            while let Some((regarding, happened)) = rx.recv().await {
                if let Err(e) = recorder.publish(&event(&happened), &regarding).await {
                    warn!(
                        object = regarding.name.as_deref().unwrap_or_default(),
                        "recording a Kubernetes Event failed: {e}"
                    );
                }
            }
        });
        Self {
            namespace: namespace.to_owned(),
            queue,
            users: Mutex::new(BTreeMap::new()),
        }
    }

    fn send(&self, regarding: ObjectReference, happened: Happened) {
        if self.queue.try_send((regarding, happened)).is_err() {
            warn!("Kubernetes Event dropped: the queue is full");
        }
    }
}

impl Events for KubeEvents {
    fn publish(&self, certificate: &str, happened: Happened) {
        let gateways = self
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(certificate)
            .cloned()
            .unwrap_or_default();
        if gateways.is_empty() {
            let secret = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                name: Some(certificate.to_owned()),
                namespace: Some(self.namespace.clone()),
                ..ObjectReference::default()
            };
            self.send(secret, happened);
            return;
        }
        for gateway in &gateways {
            self.send(gateway_reference(gateway), happened.clone());
        }
    }

    fn conflict(&self, gateway: &GatewayRef, message: &str) {
        self.send(
            gateway_reference(gateway),
            Happened::Conflict {
                message: message.to_owned(),
            },
        );
    }

    fn set_gateways(&self, users: BTreeMap<String, Vec<GatewayRef>>) {
        *self
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = users;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_bounded_and_reasons_fixed() {
        let failed = event(&Happened::Failed {
            kind: "rateLimited".into(),
            message: "é".repeat(800),
        });
        assert_eq!(failed.reason, "Failed");
        assert_eq!(failed.type_, EventType::Warning);
        let note = failed.note.unwrap();
        assert!(note.len() <= MAX_NOTE && note.starts_with("rateLimited: "));
        let issued = event(&Happened::Issued {
            not_after: SystemTime::UNIX_EPOCH,
        });
        assert_eq!(issued.type_, EventType::Normal);
        assert!(issued.note.unwrap().contains("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn a_message_that_names_its_kind_is_not_prefixed_twice() {
        let api = kube::Error::Api(
            kube::core::Status::failure("secrets \"web\" is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        );
        let error = crate::Error::Kubernetes(format!(
            "writing Secret web: {}",
            super::super::describe(&api)
        ));
        let note = event(&Happened::Failed {
            kind: error.kind().into(),
            message: error.to_string(),
        })
        .note
        .unwrap();
        assert_eq!(
            note,
            "kubernetes: writing Secret web: secrets \"web\" is forbidden (403 Forbidden)"
        );
    }
}
