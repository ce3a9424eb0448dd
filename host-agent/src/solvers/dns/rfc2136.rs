//! An RFC 2136 solver: TXT records added to and deleted from one zone on its
//! primary, TSIG-signed (RFC 8945); `_acme-challenge` CNAMEs followed into
//! the zone; every authoritative nameserver asked before the CA is told.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as HickoryAlgorithm;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType, TSigner};
use tracing::debug;

use super::exchange::{Answer, exchange};
use crate::Error;
use crate::config::{DnsSolver, TsigAlgorithm};

/// One DNS exchange may take this long.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// CNAMEs followed from `_acme-challenge.<name>` at most.
const MAX_CNAMES: usize = 8;
/// Nameservers of a zone checked at most (a zone has a handful).
const MAX_NAMESERVERS: usize = 16;
/// Between two rounds of the propagation check.
const PROPAGATION_POLL: Duration = Duration::from_millis(250);
/// TSIG fudge: the clock skew the server accepts (RFC 8945 recommends 300 s).
const FUDGE_SECONDS: u16 = 300;

/// The TXT record one challenge needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TxtRecord {
    /// The `[dns.<solver>]` that wrote it.
    pub solver: String,
    /// Fully qualified owner name (after following CNAMEs).
    pub name: String,
    /// The challenge digest (43 base64url characters).
    pub value: String,
}

pub struct Rfc2136 {
    label: String,
    server: SocketAddr,
    zone: Name,
    signer: TSigner,
    ttl: u32,
    propagation_timeout: Duration,
    resolver: Option<SocketAddr>,
}

fn fqdn(name: &str) -> Result<Name, Error> {
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

impl Rfc2136 {
    /// The solver `[dns.<label>]` (its secret was read with the config).
    pub fn new(label: &str, config: &DnsSolver) -> Result<Self, Error> {
        let secret = config.secret.0.clone();
        let algorithm = match config.tsig_algorithm {
            TsigAlgorithm::HmacSha256 => HickoryAlgorithm::HmacSha256,
            TsigAlgorithm::HmacSha512 => HickoryAlgorithm::HmacSha512,
        };
        let signer = TSigner::new(secret, algorithm, fqdn(&config.tsig_key)?, FUDGE_SECONDS)
            .map_err(|e| Error::Dns(format!("dns.{label}: the TSIG key is unusable: {e}")))?;
        Ok(Self {
            label: label.to_owned(),
            server: config.server,
            zone: fqdn(&config.zone)?,
            signer,
            ttl: config.ttl,
            propagation_timeout: Duration::from_secs(config.propagation_timeout_seconds),
            resolver: config.resolver.or_else(system_resolver),
        })
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
        if self.zone.zone_of(name) {
            return Ok((self.server, false));
        }
        self.resolver.map(|r| (r, true)).ok_or_else(|| {
            Error::Dns(format!(
                "dns.{}: {name} is outside zone {} and there is no resolver to follow its CNAME with (set dns.{}.resolver)",
                self.label, self.zone, self.label
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

    fn rrset(&self, record: &TxtRecord) -> Result<RecordSet, Error> {
        let name = fqdn(&record.name)?;
        if !self.zone.zone_of(&name) {
            return Err(Error::Dns(format!(
                "dns.{}: {name} is not in zone {}",
                self.label, self.zone
            )));
        }
        let mut txt = Record::from_rdata(
            name,
            self.ttl,
            RData::TXT(TXT::new(vec![record.value.clone()])),
        );
        txt.dns_class = DNSClass::IN;
        Ok(RecordSet::from(txt))
    }

    async fn update(&self, message: Message, what: &str) -> Result<(), Error> {
        let answer = exchange(
            self.server,
            message,
            Some(&self.signer),
            EXCHANGE_TIMEOUT,
            what,
        )
        .await?;
        match answer.code() {
            ResponseCode::NoError => Ok(()),
            code => {
                let hint = match (code, answer.tsig_error()) {
                    (_, Some(tsig)) => format!(
                        " (TSIG {tsig}: check dns.{label}.tsig_key, tsig_algorithm and the secret)",
                        label = self.label
                    ),
                    (ResponseCode::Refused | ResponseCode::NotAuth, None) => format!(
                        " (the server does not let key {} update {}: check its update-policy)",
                        self.signer.signer_name(),
                        self.zone
                    ),
                    (ResponseCode::NotZone, _) => {
                        format!(" (the server is not primary for zone {})", self.zone)
                    }
                    _ => String::new(),
                };
                Err(Error::Dns(format!(
                    "{what} ({}): the server answered {code}{hint}",
                    self.server
                )))
            }
        }
    }

    /// An empty update, signed: proves the server is up, is primary for the
    /// zone and takes the key, before an order is placed (a broken solver
    /// must not cost CA orders).
    pub async fn preflight(&self) -> Result<(), Error> {
        use hickory_proto::op::{OpCode, UpdateMessage as _};
        let mut message = Message::query();
        message.metadata.op_code = OpCode::Update;
        message.metadata.recursion_desired = false;
        let mut zone = Query::new();
        zone.set_name(self.zone.clone())
            .set_query_class(DNSClass::IN)
            .set_query_type(RecordType::SOA);
        message.add_zone(zone);
        self.update(message, &format!("checking the key on zone {}", self.zone))
            .await
    }

    /// Adds the record beside any others of its name (another order's, or
    /// the operator's): nothing is replaced.
    pub async fn add(&self, record: &TxtRecord) -> Result<(), Error> {
        let message = update_message::append(self.rrset(record)?, self.zone.clone(), false, false);
        self.update(message, &format!("adding TXT {}", record.name))
            .await
    }

    /// Deletes exactly this record (name, type and value): a record the
    /// agent did not write is never touched.
    pub async fn delete(&self, record: &TxtRecord) -> Result<(), Error> {
        let message =
            update_message::delete_by_rdata(self.rrset(record)?, self.zone.clone(), false);
        self.update(message, &format!("deleting TXT {}", record.name))
            .await
    }

    /// The zone's authoritative nameservers (name, address), from its NS
    /// set on the primary, addresses from the glue or by asking.
    async fn nameservers(&self) -> Result<Vec<(Name, SocketAddr)>, Error> {
        let answer = self
            .query(self.server, &self.zone, RecordType::NS, false)
            .await?;
        if answer.code() != ResponseCode::NoError {
            return Err(Error::Dns(format!(
                "{} answered {} for NS {}",
                self.server,
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
                "{} lists no NS records for {}",
                self.server, self.zone
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
