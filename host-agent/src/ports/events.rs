//! What happened to a certificate, and where the manager reports it (Events
//! on Kubernetes, nothing elsewhere: the log and metrics say it all); which
//! Gateway a report is about.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// Something that happened to a certificate worth an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    Issued {
        not_after: SystemTime,
    },
    Renewed {
        not_after: SystemTime,
    },
    Failed {
        kind: String,
        message: String,
    },
    WaitingForBudget {
        limit: String,
        until: SystemTime,
    },
    /// A Gateway asks for something the agent refuses (no order placed).
    Conflict {
        message: String,
    },
}

/// Where the manager reports what happened.
pub trait Events: Send + Sync {
    fn publish(&self, certificate: &str, happened: Happened);
    /// A Gateway's request the agent refuses.
    fn conflict(&self, _gateway: &GatewayRef, _message: &str) {}
    /// Which Gateways each derived certificate comes from (their Events go
    /// there instead of to the Secret).
    fn set_gateways(&self, _users: BTreeMap<String, Vec<GatewayRef>>) {}
}

/// Outside Kubernetes: the log and the metrics say it all.
pub struct NoEvents;

impl Events for NoEvents {
    fn publish(&self, _: &str, _: Happened) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Istio,
    GatewayApi,
}

impl Kind {
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Istio => "networking.istio.io/v1",
            Self::GatewayApi => "gateway.networking.k8s.io/v1",
        }
    }
}

/// Which Gateway, for messages and Events.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GatewayRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

impl std::fmt::Display for GatewayRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Istio => "Istio Gateway",
            Kind::GatewayApi => "Gateway",
        };
        write!(f, "{kind} {}/{}", self.namespace, self.name)
    }
}
