//! The zone a dns-01 solver writes into, whatever writes the records: where
//! `_acme-challenge` CNAMEs lead (followed into the zone), and the check
//! that every authoritative nameserver serves a record before the CA is told.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tracing::debug;

use super::exchange::{Answer, exchange};
use super::rfc2136::TxtRecord;
use crate::Error;
use crate::config::DnsSolver;

/// One DNS exchange may take this long.
pub(super) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// CNAMEs followed from `_acme-challenge.<name>` at most.
const MAX_CNAMES: usize = 8;
/// Nameservers of a zone checked at most (a zone has a handful).
const MAX_NAMESERVERS: usize = 16;
/// Between two rounds of the propagation check.
const PROPAGATION_POLL: Duration = Duration::from_millis(250);

pub(super) fn fqdn(name: &str) -> Result<Name, Error> {
    let mut parsed = Name::from_ascii(name)
        .map_err(|e| Error::Dns(format!("{name:?} is not a DNS name: {e}")))?;
    parsed.set_fqdn(true);
    Ok(parsed.to_lowercase())
}

/// The first `nameserver` of /etc/resolv.conf, port 53.
fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next())
            .flatten()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

pub struct Zone {
    label: String,
    zone: Name,
    /// Authoritative for the zone: asked without recursion. Without one
    /// (an `exec` solver may name none) the resolver is asked.
    primary: Option<SocketAddr>,
    propagation_timeout: Duration,
    resolver: Option<SocketAddr>,
}

impl Zone {
    pub fn new(label: &str, config: &DnsSolver) -> Result<Self, Error> {
        Ok(Self {
            label: label.to_owned(),
            zone: fqdn(&config.zone)?,
            primary: config.server,
            propagation_timeout: Duration::from_secs(config.propagation_timeout_seconds),
            resolver: config.resolver.or_else(system_resolver),
        })
    }

    pub fn name(&self) -> &Name {
        &self.zone
    }

    /// Asks `server` (recursion as `recurse` says) for `name`/`kind`.
    async fn query(
        &self,
        server: SocketAddr,
        name: &Name,
        kind: RecordType,
        recurse: bool,
    ) -> Result<Answer, Error> {
        let mut message = Message::query();
        message.add_query(Query::query(name.clone(), kind));
        message.metadata.recursion_desired = recurse;
        let what = format!("asking for {kind} {name}");
        exchange(server, message, None, EXCHANGE_TIMEOUT, &what).await
    }

    /// Where to ask about `name`: the primary when the zone holds it (it is
    /// authoritative), the resolver otherwise.
    fn server_for(&self, name: &Name) -> Result<(SocketAddr, bool), Error> {
        if let Some(primary) = self.primary
            && self.zone.zone_of(name)
        {
            return Ok((primary, false));
        }
        self.resolver.map(|r| (r, true)).ok_or_else(|| {
            Error::Dns(format!(
                "dns.{}: no resolver to look {name} up with (set dns.{}.resolver{})",
                self.label,
                self.label,
                if self.primary.is_none() {
                    " or dns.<name>.server"
                } else {
                    ""
                }
            ))
        })
    }

    /// The owner name of the TXT record for `domain` (the name validated,
    /// without `*.`): `_acme-challenge.<domain>`, or where its CNAME chain
    /// ends. It must lie in the solver's zone.
    pub async fn record_name(&self, domain: &str) -> Result<Name, Error> {
        let mut name = fqdn(&format!("_acme-challenge.{domain}"))?;
        for _ in 0..MAX_CNAMES {
            let (server, recurse) = self.server_for(&name)?;
            let answer = self
                .query(server, &name, RecordType::CNAME, recurse)
                .await?;
            if !matches!(
                answer.code(),
                ResponseCode::NoError | ResponseCode::NXDomain
            ) {
                return Err(Error::Dns(format!(
                    "{server} answered {} for CNAME {name}",
                    answer.code()
                )));
            }
            let target = answer.message.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(cname) if r.name.to_lowercase() == name => {
                    Some(cname.0.to_lowercase())
                }
                _ => None,
            });
            match target {
                Some(target) => {
                    debug!(from = %name, to = %target, "following the challenge CNAME");
                    name = target;
                }
                None => {
                    if !self.zone.zone_of(&name) {
                        return Err(Error::Dns(format!(
                            "dns.{}: {name} is not in zone {} (point a CNAME from _acme-challenge.{domain} into the zone, or use a solver for its own zone)",
                            self.label, self.zone
                        )));
                    }
                    return Ok(name);
                }
            }
        }
        Err(Error::Dns(format!(
            "more than {MAX_CNAMES} CNAMEs from _acme-challenge.{domain}"
        )))
    }

    /// The zone's authoritative nameservers (name, address), from its NS
    /// set on the primary (or the resolver), addresses from the glue or by
    /// asking.
    async fn nameservers(&self) -> Result<Vec<(Name, SocketAddr)>, Error> {
        let (server, recurse) = self.server_for(&self.zone)?;
        let answer = self
            .query(server, &self.zone, RecordType::NS, recurse)
            .await?;
        if answer.code() != ResponseCode::NoError {
            return Err(Error::Dns(format!(
                "{server} answered {} for NS {}",
                answer.code(),
                self.zone
            )));
        }
        let names: Vec<Name> = answer
            .message
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::NS(ns) => Some(ns.0.to_lowercase()),
                _ => None,
            })
            .take(MAX_NAMESERVERS)
            .collect();
        if names.is_empty() {
            return Err(Error::Dns(format!(
                "{server} lists no NS records for {}",
                self.zone
            )));
        }
        let mut found = Vec::new();
        for ns in names {
            let glue: Vec<IpAddr> = answer
                .message
                .additionals
                .iter()
                .filter(|r| r.name.to_lowercase() == ns)
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
            let addresses = if glue.is_empty() {
                self.addresses(&ns).await?
            } else {
                glue
            };
            if addresses.is_empty() {
                return Err(Error::Dns(format!(
                    "nameserver {ns} of {} has no address",
                    self.zone
                )));
            }
            found.extend(
                addresses
                    .into_iter()
                    .map(|ip| (ns.clone(), SocketAddr::new(ip, 53))),
            );
        }
        Ok(found)
    }

    async fn addresses(&self, name: &Name) -> Result<Vec<IpAddr>, Error> {
        let (server, recurse) = self.server_for(name)?;
        let mut found = Vec::new();
        for kind in [RecordType::A, RecordType::AAAA] {
            let answer = self.query(server, name, kind, recurse).await?;
            found.extend(answer.message.answers.iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            }));
        }
        Ok(found)
    }

    /// Whether `server` serves every one of `records` (authoritatively).
    async fn serves(&self, server: SocketAddr, records: &[&TxtRecord]) -> Result<(), String> {
        for record in records {
            let name = fqdn(&record.name).map_err(|e| e.to_string())?;
            let answer = self
                .query(server, &name, RecordType::TXT, false)
                .await
                .map_err(|e| e.to_string())?;
            let present = answer.message.answers.iter().any(|r| match &r.data {
                RData::TXT(txt) => txt
                    .txt_data
                    .iter()
                    .any(|part| part.as_ref() == record.value.as_bytes()),
                _ => false,
            });
            if !present {
                return Err(format!(
                    "no TXT {} with the challenge value yet",
                    record.name
                ));
            }
        }
        Ok(())
    }

    /// Waits until every authoritative nameserver of the zone serves every
    /// one of `records`, at most the configured propagation timeout.
    pub async fn wait_propagated(&self, records: &[&TxtRecord]) -> Result<(), Error> {
        let started = Instant::now();
        let deadline = started + self.propagation_timeout;
        let nameservers = self.nameservers().await?;
        let mut waiting: Vec<(Name, SocketAddr, String)> = nameservers
            .into_iter()
            .map(|(name, addr)| (name, addr, String::new()))
            .collect();
        loop {
            let checks = waiting
                .iter()
                .map(|(_, addr, _)| self.serves(*addr, records));
            let results = futures_util::future::join_all(checks).await;
            let mut still = Vec::new();
            for ((name, addr, _), result) in waiting.into_iter().zip(results) {
                if let Err(why) = result {
                    still.push((name, addr, why));
                }
            }
            if still.is_empty() {
                debug!(took = ?started.elapsed(), "every nameserver serves the records");
                return Ok(());
            }
            if Instant::now() + PROPAGATION_POLL > deadline {
                let lagging: Vec<String> = still
                    .iter()
                    .map(|(name, addr, why)| format!("{name} ({addr}): {why}"))
                    .collect();
                return Err(Error::Dns(format!(
                    "dns.{}: after {:?} not every nameserver of {} serves the challenge: {}",
                    self.label,
                    self.propagation_timeout,
                    self.zone,
                    lagging.join("; ")
                )));
            }
            waiting = still;
            tokio::time::sleep(PROPAGATION_POLL).await;
        }
    }
}
