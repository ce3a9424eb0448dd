//! Why a certificate must be ordered: the one place that says so.
//!
//! Reasons that come from the config and the served certificate are decided
//! here without a clock, so they hold until an order succeeds: a certificate
//! whose names or key type no longer match stays due after every failure, and
//! so does a forced renewal (persisted until done). Time (the renewal window,
//! the two-thirds rule) is the job's to check, because it may ask the CA.

use crate::certificate::Leaf;
use crate::domain::spec::{Certificate, KeyType};

/// The certificate being served, as the trigger needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub leaf: Leaf,
    pub key_type: KeyType,
}

/// Why an order is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoCertificate,
    NamesChanged,
    KeyTypeChanged,
    Forced,
    /// The renewal time (two thirds of the lifetime, or the CA's ARI window)
    /// has come.
    RenewalDue,
}

impl Reason {
    pub fn text(self) -> &'static str {
        match self {
            Self::NoCertificate => "no certificate yet",
            Self::NamesChanged => "names changed",
            Self::KeyTypeChanged => "key type changed",
            Self::Forced => "forced renewal",
            Self::RenewalDue => "renewal due",
        }
    }

    /// Whether the order renews the served certificate for the same names, so
    /// it may tell an ARI CA which certificate it replaces.
    pub fn replaces_served(self) -> bool {
        matches!(self, Self::Forced | Self::RenewalDue | Self::KeyTypeChanged)
    }
}

/// The reason that needs no clock, if any: in this order of precedence, no
/// certificate, other names, another key type, a forced renewal.
pub fn reason(spec: &Certificate, served: Option<&Served>, forced: bool) -> Option<Reason> {
    let Some(served) = served else {
        return Some(Reason::NoCertificate);
    };
    let wanted: std::collections::BTreeSet<&str> =
        spec.domains.iter().map(String::as_str).collect();
    let have: std::collections::BTreeSet<&str> =
        served.leaf.names.iter().map(String::as_str).collect();
    if wanted != have {
        return Some(Reason::NamesChanged);
    }
    if served.key_type != spec.key_type {
        return Some(Reason::KeyTypeChanged);
    }
    forced.then_some(Reason::Forced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn spec(domains: &[&str], key_type: KeyType) -> Certificate {
        Certificate {
            name: "www".into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            key_type,
            challenge: Default::default(),
            dns: None,
            profile: None,
            adopt: false,
        }
    }

    fn served(domains: &[&str], key_type: KeyType) -> Served {
        Served {
            leaf: Leaf {
                not_before: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(90 * 86_400),
                names: domains.iter().map(|d| d.to_string()).collect(),
                ari_id: None,
            },
            key_type,
        }
    }

    #[test]
    fn reasons_in_order_of_precedence() {
        use KeyType::{EcdsaP256 as P256, EcdsaP384 as P384};
        let www = ["www.example.com", "example.com"];
        let cases: [(Certificate, Option<Served>, bool, Option<Reason>); 8] = [
            (spec(&www, P256), None, false, Some(Reason::NoCertificate)),
            (spec(&www, P256), None, true, Some(Reason::NoCertificate)),
            (spec(&www, P256), Some(served(&www, P256)), false, None),
            (
                spec(&www, P256),
                Some(served(&["example.com", "www.example.com"], P256)),
                false,
                None,
            ),
            (
                spec(&["www.example.com", "example.com", "bad.example.com"], P256),
                Some(served(&www, P256)),
                true,
                Some(Reason::NamesChanged),
            ),
            (
                spec(&["www.example.com"], P256),
                Some(served(&www, P256)),
                false,
                Some(Reason::NamesChanged),
            ),
            (
                spec(&www, P384),
                Some(served(&www, P256)),
                true,
                Some(Reason::KeyTypeChanged),
            ),
            (
                spec(&www, P256),
                Some(served(&www, P256)),
                true,
                Some(Reason::Forced),
            ),
        ];
        for (spec, served, forced, want) in cases {
            assert_eq!(
                reason(&spec, served.as_ref(), forced),
                want,
                "{:?} served {:?} forced {forced}",
                spec.domains,
                served.map(|s| s.leaf.names)
            );
        }
    }

    #[test]
    fn only_renewals_of_the_same_names_say_what_they_replace() {
        assert!(Reason::Forced.replaces_served());
        assert!(Reason::RenewalDue.replaces_served());
        assert!(Reason::KeyTypeChanged.replaces_served());
        assert!(!Reason::NamesChanged.replaces_served());
        assert!(!Reason::NoCertificate.replaces_served());
    }
}
