//! RFC 2136 updates: TXT records added to and deleted from one zone on its
//! primary, TSIG-signed (RFC 8945).

use std::net::SocketAddr;

use hickory_proto::op::{Message, Query, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as HickoryAlgorithm;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType, TSigner};

use super::exchange::exchange;
use super::zone::{EXCHANGE_TIMEOUT, fqdn};
use crate::Error;
use crate::config::{DnsSolver, TsigAlgorithm};

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
}

impl Rfc2136 {
    /// The updates of solver `[dns.<label>]` (its secret was read with the
    /// config, which also made sure the server and key are there).
    pub fn new(label: &str, config: &DnsSolver) -> Result<Self, Error> {
        let missing = |f: &str| Error::Dns(format!("dns.{label}.{f} is not set"));
        let server = config.server.ok_or_else(|| missing("server"))?;
        let key = config
            .tsig_key
            .as_deref()
            .ok_or_else(|| missing("tsig_key"))?;
        let secret = config.secret.0.clone();
        let algorithm = match config.tsig_algorithm {
            TsigAlgorithm::HmacSha256 => HickoryAlgorithm::HmacSha256,
            TsigAlgorithm::HmacSha512 => HickoryAlgorithm::HmacSha512,
        };
        let signer = TSigner::new(secret, algorithm, fqdn(key)?, FUDGE_SECONDS)
            .map_err(|e| Error::Dns(format!("dns.{label}: the TSIG key is unusable: {e}")))?;
        Ok(Self {
            label: label.to_owned(),
            server,
            zone: fqdn(&config.zone)?,
            signer,
            ttl: config.ttl,
        })
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
}
