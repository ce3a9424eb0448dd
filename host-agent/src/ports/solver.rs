//! The solver seam (go-acme/lego's `challenge.Provider`): one solver per kind
//! of challenge makes its challenges answerable where the CA looks, checks
//! them as the CA will, and withdraws them. The order knows only this trait;
//! the solvers know nothing of orders.

use std::sync::Arc;

use crate::Error;
use crate::challenges::Challenge;
use crate::config::Config;
use crate::domain::spec::{Certificate, ChallengeKind};

/// Makes one kind of challenge answerable.
#[async_trait::async_trait]
pub trait Solver: Send + Sync {
    /// Takes the running config (at start and on every reload).
    fn configure(&self, _config: &Config) {}

    /// Whether `spec`'s challenges of this kind can be presented at all,
    /// checked before an order is placed (an order that cannot be solved
    /// would cost failed authorizations).
    async fn preflight(&self, _spec: &Certificate) -> Result<(), Error> {
        Ok(())
    }

    /// Publishes `challenges` (all of `spec`'s of this kind); the guard
    /// withdraws them when dropped.
    async fn present(
        &self,
        spec: &Certificate,
        challenges: &[Challenge],
    ) -> Result<Box<dyn Presented>, Error>;
}

/// Challenges while they are published.
#[async_trait::async_trait]
pub trait Presented: Send + Sync {
    /// Checks each challenge the way the CA will, waiting until it is
    /// visible there; an error means the CA must not be told.
    async fn check(&self) -> Result<(), Error>;

    /// Withdraws them now, awaiting what needs the network (DNS records).
    /// Dropping the guard withdraws too, leaving what needs the network to
    /// a background task.
    async fn clean_up(self: Box<Self>);
}

/// The solver of each kind of challenge; a kind may have none (tls-alpn-01
/// without `[sds]`).
#[derive(Clone, Default)]
pub struct Solvers {
    pub http01: Option<Arc<dyn Solver>>,
    pub tls_alpn01: Option<Arc<dyn Solver>>,
    pub dns01: Option<Arc<dyn Solver>>,
}

impl Solvers {
    /// The solver for `kind`, or why there is none.
    pub fn get(&self, kind: ChallengeKind) -> Result<&Arc<dyn Solver>, Error> {
        let (solver, missing) = match kind {
            ChallengeKind::Http01 => (&self.http01, "http-01 has no solver"),
            ChallengeKind::TlsAlpn01 => (
                &self.tls_alpn01,
                "tls-alpn-01 needs the agent's SDS server ([sds])",
            ),
            ChallengeKind::Dns01 => (&self.dns01, "dns-01 has no solver"),
        };
        solver
            .as_ref()
            .ok_or_else(|| Error::Validation(missing.into()))
    }

    fn all(&self) -> impl Iterator<Item = &Arc<dyn Solver>> {
        [&self.http01, &self.tls_alpn01, &self.dns01]
            .into_iter()
            .flatten()
    }

    /// Hands every solver the running config.
    pub fn configure(&self, config: &Config) {
        for solver in self.all() {
            solver.configure(config);
        }
    }

    /// The preflight of every kind `spec` uses.
    pub async fn preflight(&self, spec: &Certificate) -> Result<(), Error> {
        for kind in kinds_of(spec) {
            self.get(kind)?.preflight(spec).await?;
        }
        Ok(())
    }
}

/// The kinds of challenge `spec`'s names are validated with.
pub fn kinds_of(spec: &Certificate) -> Vec<ChallengeKind> {
    let mut kinds: Vec<ChallengeKind> = spec
        .domains
        .iter()
        .map(|d| spec.challenge_for(d.starts_with("*.")))
        .collect();
    kinds.sort_by_key(|k| k.as_str());
    kinds.dedup();
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(domains: &[&str], challenge: ChallengeKind) -> Certificate {
        Certificate {
            name: "c".into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            key_type: Default::default(),
            challenge,
            dns: Some("main".into()),
            profile: None,
            adopt: false,
        }
    }

    #[test]
    fn a_certificate_uses_the_kinds_of_its_names_and_a_wildcard_dns_01() {
        let mixed = spec(&["*.example.com", "example.com"], ChallengeKind::Http01);
        assert_eq!(
            kinds_of(&mixed),
            vec![ChallengeKind::Dns01, ChallengeKind::Http01]
        );
        let alpn = spec(
            &["a.example.com", "b.example.com"],
            ChallengeKind::TlsAlpn01,
        );
        assert_eq!(kinds_of(&alpn), vec![ChallengeKind::TlsAlpn01]);
    }

    #[test]
    fn a_kind_without_a_solver_says_what_it_needs() {
        let none = Solvers::default();
        let e = none.get(ChallengeKind::TlsAlpn01).err().unwrap();
        assert!(e.to_string().contains("[sds]"), "{e}");
    }

    #[tokio::test]
    async fn http_01_challenges_are_withdrawn_when_the_guard_drops() {
        use crate::challenges::ChallengeSet;
        use crate::solvers::http01::Http01;
        let set = Arc::new(ChallengeSet::new());
        let solvers = Solvers {
            http01: Some(Arc::new(Http01::new(Arc::clone(&set)))),
            ..Solvers::default()
        };
        let challenge = Challenge {
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
            identifier: "www.example.com".into(),
        };
        let s = spec(&["www.example.com"], ChallengeKind::Http01);
        let guard = solvers
            .get(ChallengeKind::Http01)
            .unwrap()
            .present(&s, std::slice::from_ref(&challenge))
            .await
            .unwrap();
        // No [self_check] configured: nothing to check against.
        guard.check().await.unwrap();
        assert_eq!(set.snapshot().challenges, vec![challenge]);
        drop(guard);
        assert!(set.is_empty());
    }
}
