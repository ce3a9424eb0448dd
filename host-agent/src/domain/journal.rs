//! The CA-limit ledger's journal: each change (`Change`) is appended as one
//! line after the last snapshot instead of the whole ledger being written
//! again, so what a change costs does not grow with the number of
//! certificates (at 10,000 a snapshot is hundreds of kilobytes, written
//! two or three times per order before). A snapshot is written again when
//! the journal has grown past it, and carries the generation of the
//! journal that continues it.
//!
//! A line is `{"generation":G,"changes":[...]}` and a newline. Loading
//! replays, over the snapshot, the lines of its own generation in order; a
//! line of another generation (the snapshot already holds it: the store
//! stopped between writing a snapshot and clearing the journal) is
//! skipped, and a last line without its newline (a write cut short) is
//! ignored: its change was never acted on, since the agent acts only after
//! the line is written. Any other line that does not parse is an error, so
//! nothing is decided on a guess. Pruning is not journaled: it only drops
//! events no bucket needs, and loading prunes again.

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::domain::budget::{Ledger, give_back};

/// One change to a [`Ledger`], as the journal records it (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Order { at: u64 },
    Certificate { set: String, at: u64 },
    RegisteredDomain { domain: String, at: u64 },
    FailedAuthorization { name: String, at: u64 },
    CertificateGivenBack { set: String, at: u64 },
    RegisteredDomainGivenBack { domain: String, at: u64 },
    InFlight { name: String, at: u64 },
    Landed { name: String },
    Triggered { name: String, names: Vec<String> },
    Untriggered { name: String },
    ReplacesNotReflected,
    OnDemandAdmitted { at: u64 },
    Refused { domain: String, until: u64 },
    Unrefused { domain: String },
}

#[derive(Serialize, Deserialize)]
struct Line {
    generation: u64,
    changes: Vec<Change>,
}

/// A ledger that could not be read or written, as an I/O error naming what.
fn corrupt(context: String, e: &serde_json::Error) -> Error {
    Error::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

impl Ledger {
    /// Makes one change (recorded or replayed).
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Order { at } => self.orders.push(*at),
            Change::Certificate { set, at } => push(&mut self.certificates, set, *at),
            Change::RegisteredDomain { domain, at } => {
                push(&mut self.registered_domains, domain, *at);
            }
            Change::FailedAuthorization { name, at } => {
                push(&mut self.failed_authorizations, name, *at);
            }
            Change::CertificateGivenBack { set, at } => give_back(&mut self.certificates, set, *at),
            Change::RegisteredDomainGivenBack { domain, at } => {
                give_back(&mut self.registered_domains, domain, *at);
            }
            Change::InFlight { name, at } => {
                self.in_flight.insert(name.clone(), *at);
            }
            Change::Landed { name } => {
                self.in_flight.remove(name);
            }
            Change::Triggered { name, names } => self
                .triggered
                .entry(name.clone())
                .or_default()
                .extend(names.iter().cloned()),
            Change::Untriggered { name } => {
                self.triggered.remove(name);
            }
            Change::ReplacesNotReflected => self.replaces_not_reflected = true,
            Change::OnDemandAdmitted { at } => self.on_demand_admitted.push(*at),
            Change::Refused { domain, until } => {
                self.refused.insert(domain.clone(), *until);
            }
            Change::Unrefused { domain } => {
                self.refused.remove(domain);
            }
        }
    }

    /// The ledger a store holds: `snapshot` (none: a new ledger) with the
    /// lines of `journal` that continue it replayed, and how many bytes of
    /// the journal those were.
    pub fn load(snapshot: Option<&[u8]>, journal: &[u8]) -> Result<(Self, usize), Error> {
        let mut ledger = match snapshot {
            Some(bytes) => Self::from_json(bytes)
                .map_err(|e| corrupt("reading the CA-limit ledger".into(), &e))?,
            None => Self::default(),
        };
        let mut replayed = 0;
        // A last piece without its newline is a write cut short: not a line.
        let complete = journal
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(&journal[..0], |end| &journal[..=end]);
        for (i, text) in complete.split(|b| *b == b'\n').enumerate() {
            if text.is_empty() {
                continue;
            }
            let line: Line = serde_json::from_slice(text).map_err(|e| {
                corrupt(
                    format!("line {} of the CA-limit ledger's journal", i + 1),
                    &e,
                )
            })?;
            if line.generation == ledger.generation {
                line.changes.iter().for_each(|c| ledger.apply(c));
                replayed += text.len() + 1;
            }
        }
        Ok((ledger, replayed))
    }
}

/// The journal line for `changes` made after the snapshot of `generation`.
pub fn line(generation: u64, changes: Vec<Change>) -> Result<Vec<u8>, Error> {
    let mut bytes = serde_json::to_vec(&Line {
        generation,
        changes,
    })
    .map_err(|e| corrupt("serializing a CA-limit ledger journal line".into(), &e))?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn push(map: &mut std::collections::BTreeMap<String, Vec<u64>>, key: &str, at: u64) {
    map.entry(key.to_owned()).or_default().push(at);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::budget::{Bucket, Finished, Limits, Spend};
    use crate::time::from_unix;
    use std::time::Duration;

    fn t(secs: u64) -> std::time::SystemTime {
        from_unix(1_000_000_000 + secs)
    }

    /// Every kind of change, through the ledger's own methods.
    fn busy_ledger() -> Ledger {
        let limits = Limits::default();
        let mut ledger = Ledger::default();
        let www = vec!["www.example.com".to_owned(), "example.com".to_owned()];
        let spend = Spend {
            domains: &www,
            exempt: false,
            on_demand: false,
        };
        ledger.reserve(&limits, "www", spend, t(0)).unwrap();
        ledger.trigger("www", &www);
        let valid = vec!["example.com".to_owned()];
        let how = Finished::NotFinalized { valid_names: valid };
        ledger.finish("www", &www, &how, t(5));
        ledger.reserve(&limits, "www", spend, t(10)).unwrap();
        ledger.count_order(false, t(11));
        ledger.replaces_are_not_reflected();
        ledger.trigger("www", &www);
        assert_eq!(ledger.interrupted("www", t(20)), Some(1_000_000_010));
        let hourly = Bucket::new(20, Duration::from_secs(3600), None);
        ledger.admit_on_demand(hourly, t(30)).unwrap();
        ledger.refuse("bad.example.com", t(3600), t(30));
        ledger
    }

    #[test]
    fn replaying_the_changes_makes_the_same_ledger() {
        let mut ledger = busy_ledger();
        let changes = ledger.take_changes();
        let journal = line(0, changes).unwrap();
        let (replayed, bytes) = Ledger::load(None, &journal).unwrap();
        assert_eq!(bytes, journal.len());
        assert_eq!(replayed, ledger);
        assert_eq!(replayed.failed_authorizations.len(), 2);
        assert!(replayed.certificates["example.com,www.example.com"].len() == 1);
    }

    #[test]
    fn a_line_cut_short_or_of_another_generation_is_not_replayed() {
        let mut ledger = busy_ledger();
        let snapshot = Ledger {
            generation: 3,
            ..Ledger::default()
        };
        let json = serde_json::to_vec(&snapshot).unwrap();
        let older = line(2, ledger.take_changes()).unwrap();
        let own = line(3, vec![Change::Order { at: 7 }]).unwrap();
        let cut = &line(3, vec![Change::Order { at: 8 }]).unwrap()[..20];
        let journal = [older.as_slice(), &own, cut].concat();
        let (loaded, bytes) = Ledger::load(Some(&json), &journal).unwrap();
        assert_eq!(loaded.orders, [7]);
        assert_eq!(bytes, own.len());
    }

    #[test]
    fn a_broken_line_before_the_last_is_an_error() {
        let own = line(0, vec![Change::Order { at: 7 }]).unwrap();
        let journal = [b"{not json\n".as_slice(), &own].concat();
        let error = Ledger::load(None, &journal).unwrap_err().to_string();
        assert!(
            error.contains("line 1 of the CA-limit ledger's journal"),
            "{error}"
        );
    }
}
