//! Kubernetes Events about certificates, where `kubectl describe` and
//! `kubectl get events` show them (what cert-manager users look at first):
//! issued, renewed, failed (the error kind and message), waiting for a
//! CA-limit budget. Recorded on the certificate's Secret. Aggregated by
//! kube-runtime's `Recorder`: the same reason on the same object within its
//! window patches the Event's series count instead of creating another, so a
//! retry loop does not flood the namespace.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tracing::warn;

use crate::store::rfc3339;

/// Events waiting to be sent; more are dropped (and logged) rather than
/// holding the manager up.
const QUEUE: usize = 256;
/// The Events API refuses a note over 1 kB.
const MAX_NOTE: usize = 1000;

/// Something that happened to a certificate worth an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    Issued { not_after: SystemTime },
    Renewed { not_after: SystemTime },
    Failed { kind: String, message: String },
    WaitingForBudget { limit: String, until: SystemTime },
}

impl Happened {
    fn event(&self) -> Event {
        let at = |t: &SystemTime| rfc3339(*t).unwrap_or_default();
        let (type_, reason, action, note) = match self {
            Self::Issued { not_after } => (
                EventType::Normal,
                "Issued",
                "Order",
                format!("certificate issued, valid until {}", at(not_after)),
            ),
            Self::Renewed { not_after } => (
                EventType::Normal,
                "Renewed",
                "Order",
                format!("certificate renewed, valid until {}", at(not_after)),
            ),
            Self::Failed { kind, message } => (
                EventType::Warning,
                "Failed",
                "Order",
                format!("{kind}: {message}"),
            ),
            Self::WaitingForBudget { limit, until } => (
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

/// Where the manager reports what happened.
pub trait Events: Send + Sync {
    fn publish(&self, certificate: &str, happened: Happened);
}

/// Outside Kubernetes: the log and the metrics say it all.
pub struct NoEvents;

impl Events for NoEvents {
    fn publish(&self, _: &str, _: Happened) {}
}

/// Events on each certificate's Secret in `namespace`, sent in order by one
/// task (an aggregated Event is created, then patched).
pub struct KubeEvents {
    queue: mpsc::Sender<(String, Happened)>,
}

impl KubeEvents {
    /// Spawns the sender on the current runtime.
    pub fn start(client: Client, namespace: &str) -> Self {
        let reporter = Reporter {
            controller: "acme-agent".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = Recorder::new(client, reporter);
        let (queue, mut rx) = mpsc::channel::<(String, Happened)>(QUEUE);
        let namespace = namespace.to_owned();
        tokio::spawn(async move {
            while let Some((certificate, happened)) = rx.recv().await {
                let regarding = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Secret".into()),
                    name: Some(certificate.clone()),
                    namespace: Some(namespace.clone()),
                    ..ObjectReference::default()
                };
                if let Err(e) = recorder.publish(&happened.event(), &regarding).await {
                    warn!(certificate, "recording a Kubernetes Event failed: {e}");
                }
            }
        });
        Self { queue }
    }
}

impl Events for KubeEvents {
    fn publish(&self, certificate: &str, happened: Happened) {
        if self
            .queue
            .try_send((certificate.to_owned(), happened))
            .is_err()
        {
            warn!(certificate, "Kubernetes Event dropped: the queue is full");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_bounded_and_reasons_fixed() {
        let failed = Happened::Failed {
            kind: "rateLimited".into(),
            message: "é".repeat(800),
        }
        .event();
        assert_eq!(failed.reason, "Failed");
        assert_eq!(failed.type_, EventType::Warning);
        let note = failed.note.unwrap();
        assert!(note.len() <= MAX_NOTE && note.starts_with("rateLimited: "));
        let issued = Happened::Issued {
            not_after: SystemTime::UNIX_EPOCH,
        }
        .event();
        assert_eq!(issued.type_, EventType::Normal);
        assert!(issued.note.unwrap().contains("1970-01-01T00:00:00Z"));
    }
}
