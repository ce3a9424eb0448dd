//! One ACME order (RFC 8555 section 7.4), from new-order to a checked chain:
//! present every challenge at once through the solver of its kind
//! (`crate::ports::solver`), check each as the CA will, tell the CA, poll,
//! finalize with a fresh key, verify the chain.

use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use tracing::{debug, info, warn};

use crate::Error;
use crate::certificate;
use crate::challenges::Challenge;
use crate::domain::spec::{Certificate, ChallengeKind, KeyType};
use crate::nonce_retry;
use crate::ports::issuer::{Failure, Issued, Trigger};
use crate::ports::solver::{Presented, Solvers};

/// Polling while the CA validates and issues: short first waits (Pebble and
/// Let's Encrypt usually answer within a second), `Retry-After` honoured.
fn polling() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(100))
        .backoff(1.5)
        .timeout(Duration::from_secs(120))
}

/// What the order needs from the agent.
pub struct OrderContext<'a> {
    pub account: &'a Account,
    /// The solver of each kind of challenge.
    pub solvers: &'a Solvers,
    /// Counts (persists) the names whose challenges are about to be handed
    /// to the CA, before they are: each is a failed authorization unless
    /// seen valid. An error stops the order before the CA is told.
    pub trigger: &'a dyn Trigger,
    /// What the issued certificate's validity is checked against.
    pub clock: crate::time::Clock,
}

fn key_pair(key_type: KeyType) -> Result<KeyPair, Error> {
    let alg = match key_type {
        KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    KeyPair::generate_for(alg).map_err(|e| Error::Certificate(format!("generating a key: {e}")))
}

fn csr(domains: &[String], key: &KeyPair) -> Result<Vec<u8>, Error> {
    let mut params = CertificateParams::new(domains.to_vec())
        .map_err(|e| Error::Certificate(format!("building the CSR: {e}")))?;
    // The CA takes names from the SANs; an empty subject is what RFC 8555 CAs expect.
    params.distinguished_name = DistinguishedName::new();
    let request = params
        .serialize_request(key)
        .map_err(|e| Error::Certificate(format!("signing the CSR: {e}")))?;
    Ok(request.der().to_vec())
}

fn finalized(error: Error) -> Failure {
    Failure {
        error,
        finalized: true,
        valid_names: Vec::new(),
        retry_after: None,
    }
}

/// instant-acme's refusal of an order the CA returned without the `replaces`
/// it was sent (RFC 9773 says the CA must reflect it; some do not).
fn is_replaces_mismatch(e: &Error) -> bool {
    matches!(e, Error::Acme { source: instant_acme::Error::Other(inner), .. }
        if inner.to_string().contains("replaces field mismatch"))
}

/// Refuses a profile the CA's directory does not list, naming what it offers
/// (no silent fallback to its default); checked before any order.
pub fn check_profile(account: &Account, spec: &Certificate) -> Result<(), Error> {
    let Some(profile) = spec.profile.as_deref() else {
        return Ok(());
    };
    let mut offered: Vec<&str> = account.profiles().map(|p| p.name).collect();
    offered.sort_unstable();
    if offered.contains(&profile) {
        return Ok(());
    }
    let offered = if offered.is_empty() {
        "none: its directory lists no profiles".to_owned()
    } else {
        offered.join(", ")
    };
    Err(Error::Profile(format!(
        "the CA offers no certificate profile {profile:?} (it offers {offered})"
    )))
}

/// Orders `spec`; `replaces` is the ARI identifier of the certificate being
/// renewed when the CA supports ARI.
pub async fn issue(
    cx: &OrderContext<'_>,
    spec: &Certificate,
    replaces: Option<&str>,
) -> Result<Issued, Failure> {
    let mut order = place(cx.account, spec, replaces).await?;
    info!(url = order.url(), "order placed");
    fetch_authorizations(&mut order).await?;
    let pending = pending_challenges(&mut order, spec, cx.account.key_thumbprint())?;
    validate(cx, &mut order, spec, &pending).await?;
    finalize(&mut order, spec, cx.clock.now()).await
}

/// RFC 8738: an address is an `ip` identifier (the config only lets
/// canonical addresses through).
fn identifiers(spec: &Certificate) -> Vec<Identifier> {
    spec.domains
        .iter()
        .map(|d| match d.parse::<std::net::IpAddr>() {
            Ok(ip) => Identifier::Ip(ip),
            Err(_) => Identifier::Dns(d.clone()),
        })
        .collect()
}

fn with_profile<'a>(order: NewOrder<'a>, profile: Option<&'a str>) -> NewOrder<'a> {
    match profile {
        Some(profile) => order.profile(profile),
        None => order,
    }
}

/// Places the order, as a renewal of `replaces` when given.
async fn place(
    account: &Account,
    spec: &Certificate,
    replaces: Option<&str>,
) -> Result<instant_acme::Order, Error> {
    let identifiers = identifiers(spec);
    let profile = spec.profile.as_deref();
    let plain = with_profile(NewOrder::new(&identifiers), profile);
    let Some((aki, serial)) = replaces.and_then(|r| r.split_once('.')) else {
        return nonce_retry!("placing the order", account.new_order(&plain));
    };
    let renewal =
        with_profile(NewOrder::new(&identifiers), profile).replaces(CertificateIdentifier {
            authority_key_identifier: aki.into(),
            serial: serial.into(),
        });
    match nonce_retry!("placing the order", account.new_order(&renewal)) {
        // RFC 9773 section 5: a certificate already replaced (by an order
        // that failed later, say) is renewed without `replaces`.
        Err(e)
            if e.problem_type()
                .is_some_and(|t| t.ends_with(":alreadyReplaced")) =>
        {
            warn!("the CA says the certificate was already replaced; ordering without `replaces`");
            nonce_retry!("placing the order", account.new_order(&plain))
        }
        Err(e) if is_replaces_mismatch(&e) => Err(Error::ReplacesNotReflected(e.to_string())),
        other => other,
    }
}

/// Fetches every authorization; a badNonce restarts the walk, and the ones
/// already fetched are not fetched again.
async fn fetch_authorizations(order: &mut instant_acme::Order) -> Result<(), Error> {
    let mut attempt = 1;
    loop {
        let mut failed = None;
        let mut authorizations = order.authorizations();
        while let Some(result) = authorizations.next().await {
            if let Err(e) = result {
                failed = Some(Error::acme("fetching an authorization")(e));
                break;
            }
        }
        match failed {
            None => return Ok(()),
            Some(e) if e.is_bad_nonce() && attempt < crate::acme::NONCE_ATTEMPTS => attempt += 1,
            Some(e) => return Err(e),
        }
    }
}

/// The challenge to answer for each authorization still pending, of the
/// kind `spec` uses for it; an authorization the CA already holds valid
/// needs none.
fn pending_challenges(
    order: &mut instant_acme::Order,
    spec: &Certificate,
    thumbprint: &str,
) -> Result<Vec<(ChallengeKind, Challenge)>, Error> {
    let mut pending = Vec::new();
    for authz in &order.state().authorizations {
        let Some(state) = &authz.state else {
            return Err(Error::Validation(format!(
                "authorization {} was not fetched",
                authz.url
            )));
        };
        let domain = state.identifier().to_string();
        match state.status {
            AuthorizationStatus::Valid => {
                debug!(domain, "authorization already valid");
                continue;
            }
            AuthorizationStatus::Pending => {}
            // Not handed to the CA by this order: nothing of it to count.
            other => {
                return Err(Error::Validation(format!(
                    "authorization for {domain} is {other:?}"
                )));
            }
        }
        let kind = spec.challenge_for(state.wildcard);
        let token = offered_token(state, kind, &domain)?;
        pending.push((
            kind,
            Challenge {
                key_authorization: format!("{token}.{thumbprint}"),
                token: token.to_owned(),
                identifier: domain,
            },
        ));
    }
    Ok(pending)
}

/// The token of the CA's challenge of `kind`, if the filters can answer it:
/// they answer no longer or stranger token (and must not be handed one that
/// would break their snapshot bound).
fn offered_token<'a>(
    state: &'a instant_acme::AuthorizationState,
    kind: ChallengeKind,
    domain: &str,
) -> Result<&'a str, Error> {
    let wanted = challenge_type(kind);
    let challenge = state
        .challenges
        .iter()
        .find(|c| c.r#type == wanted)
        .ok_or_else(|| {
            Error::Validation(format!(
                "the CA offers no {} challenge for {domain}",
                kind.as_str()
            ))
        })?;
    let token = challenge.token.as_str();
    let well_formed = !token.is_empty()
        && token.len() <= crate::domain::names::MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(Error::Validation(format!(
            "the CA's token for {domain} is not 1-{} base64url characters",
            crate::domain::names::MAX_TOKEN_LEN
        )));
    }
    Ok(token)
}

/// Presents and checks every pending challenge, hands them to the CA and
/// waits until the order is ready; the challenges are withdrawn either way.
async fn validate(
    cx: &OrderContext<'_>,
    order: &mut instant_acme::Order,
    spec: &Certificate,
    pending: &[(ChallengeKind, Challenge)],
) -> Result<(), Failure> {
    let presented = present(cx.solvers, spec, pending).await?;
    debug!(challenges = pending.len(), "self-check passed");

    // Every name about to be handed to the CA is counted as a failed
    // authorization first (written ahead: a lost answer, a badNonce on the
    // read-back or a kill cannot hide one), and cleared only for names seen
    // valid afterwards.
    let handed: Vec<String> = pending.iter().map(|(_, c)| c.identifier.clone()).collect();
    cx.trigger.trigger(&handed).await?;
    // Tell the CA, one challenge at a time (the nonce is per request chain),
    // and wait for its verdict.
    let status = match tell_the_ca(order, spec).await {
        Ok(()) => nonce_retry!("waiting for validation", order.poll_ready(&polling())),
        Err(e) => Err(e),
    };
    if !matches!(status, Ok(OrderStatus::Ready)) {
        let (detail, valid_names) = read_back(order).await;
        let error = match status {
            Ok(status) => Error::Validation(format!("order is {status:?}: {detail}")),
            Err(error) => error,
        };
        return Err(Failure {
            error,
            finalized: false,
            valid_names,
            retry_after: None,
        });
    }
    // Every authorization is final: the filters can forget the tokens, and
    // the zone the records (before finalizing, so a test or an operator
    // finds the zone clean once the certificate is there).
    for guard in presented {
        guard.clean_up().await;
    }
    Ok(())
}

/// Finalizes with a fresh key, downloads and verifies the chain. From here
/// on the CA may issue: every failure counts as a certificate.
async fn finalize(
    order: &mut instant_acme::Order,
    spec: &Certificate,
    now: SystemTime,
) -> Result<Issued, Failure> {
    let key = key_pair(spec.key_type)?;
    let csr = csr(&spec.domains, &key)?;
    nonce_retry!("finalizing the order", order.finalize_csr(&csr)).map_err(finalized)?;
    // Pebble and Let's Encrypt often answer the finalize with the order valid
    // already: fetch at once, poll only while it is processing.
    let chain_pem = match nonce_retry!("downloading the certificate", order.certificate())
        .map_err(finalized)?
    {
        Some(chain) => chain,
        None => nonce_retry!(
            "downloading the certificate",
            order.poll_certificate(&polling())
        )
        .map_err(finalized)?,
    };
    let key_pem = crate::domain::spec::KeyPem::new(key.serialize_pem());
    let leaf = certificate::verify(&chain_pem, &key_pem, &spec.domains, now).map_err(finalized)?;
    Ok(Issued {
        chain_pem,
        key_pem,
        leaf,
    })
}

/// Presents `pending` through the solver of each kind and checks them all as
/// the CA will; the guards withdraw them when dropped.
async fn present(
    solvers: &Solvers,
    spec: &Certificate,
    pending: &[(ChallengeKind, Challenge)],
) -> Result<Vec<Box<dyn Presented>>, Error> {
    let mut presented = Vec::new();
    for kind in [
        ChallengeKind::Http01,
        ChallengeKind::TlsAlpn01,
        ChallengeKind::Dns01,
    ] {
        let of_kind: Vec<Challenge> = pending
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, c)| c.clone())
            .collect();
        if !of_kind.is_empty() {
            presented.push(solvers.get(kind)?.present(spec, &of_kind).await?);
        }
    }
    let checks = presented.iter().map(|p| p.check());
    for result in futures_util::future::join_all(checks).await {
        result?;
    }
    Ok(presented)
}

fn challenge_type(kind: ChallengeKind) -> ChallengeType {
    match kind {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        ChallengeKind::Dns01 => ChallengeType::Dns01,
    }
}

/// Marks every pending challenge of `order` ready, of the type `spec` uses
/// for that authorization.
async fn tell_the_ca(order: &mut instant_acme::Order, spec: &Certificate) -> Result<(), Error> {
    let mut authorizations = order.authorizations();
    while let Some(result) = authorizations.next().await {
        let mut authz = result.map_err(Error::acme("reading an authorization"))?;
        if authz.status != AuthorizationStatus::Pending {
            continue;
        }
        let wanted = challenge_type(spec.challenge_for(authz.wildcard));
        let mut challenge = authz
            .challenge(wanted)
            .ok_or_else(|| Error::Validation("the challenge vanished".into()))?;
        nonce_retry!("marking the challenge ready", challenge.set_ready())?;
    }
    Ok(())
}

/// Why an order went invalid, from its authorizations' challenge errors, and
/// the names whose authorization was seen valid. A read that fails leaves
/// names out of the valid ones, never in (they then count as failed).
async fn read_back(order: &mut instant_acme::Order) -> (String, Vec<String>) {
    let mut details = Vec::new();
    let mut valid = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(next) = authorizations.next().await {
        let mut authz = match next {
            Ok(authz) => authz,
            Err(e) => {
                warn!("could not read an authorization: {e}");
                continue;
            }
        };
        if let Err(e) = nonce_retry!("reading an authorization", authz.refresh()) {
            warn!("could not refresh an authorization: {e}");
            continue;
        }
        let domain = authz.identifier().to_string();
        if authz.status == AuthorizationStatus::Valid {
            valid.push(domain.clone());
        }
        for challenge in &authz.challenges {
            if let Some(problem) = &challenge.error {
                details.push(format!("{domain}: {problem}"));
            }
        }
    }
    let detail = if details.is_empty() {
        "no reason given".into()
    } else {
        details.join("; ")
    };
    (detail, valid)
}
