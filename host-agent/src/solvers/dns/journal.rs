//! The TXT records the agent added and has not deleted yet, persisted before
//! each update (write-ahead) so that a crash or a failed delete is cleaned
//! up later: by the sweeper, or at the next start.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::rfc2136::TxtRecord;
use crate::Error;
use crate::ports::store::StateStore;

pub struct Journal {
    store: Arc<dyn StateStore>,
    /// `None` until loaded: a read error is an error, not an empty journal.
    /// An async lock, held across the store's read and write: the records
    /// are persisted in the order they change, one writer at a time.
    records: Mutex<Option<Vec<TxtRecord>>>,
}

impl Journal {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self {
            store,
            records: Mutex::new(None),
        }
    }

    /// Runs `f` on the loaded records; persists them when `f` says changed.
    async fn with<T>(&self, f: impl FnOnce(&mut Vec<TxtRecord>) -> (bool, T)) -> Result<T, Error> {
        let mut slot = self.records.lock().await;
        if slot.is_none() {
            let loaded = match self.store.read_dns_journal().await? {
                Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Io {
                    context: "reading the DNS record journal".into(),
                    source: std::io::Error::other(e.to_string()),
                })?,
                None => Vec::new(),
            };
            *slot = Some(loaded);
        }
        let records = slot.get_or_insert_with(Vec::new);
        let (changed, out) = f(records);
        if changed {
            let json = serde_json::to_vec(records).map_err(|e| Error::Io {
                context: "serializing the DNS record journal".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            self.store.write_dns_journal(&json).await?;
        }
        Ok(out)
    }

    /// Remembers `record` before it is added to the zone.
    pub async fn add(&self, record: &TxtRecord) -> Result<(), Error> {
        self.with(|records| {
            if records.contains(record) {
                (false, ())
            } else {
                records.push(record.clone());
                (true, ())
            }
        })
        .await
    }

    /// Forgets `record` once it is deleted from the zone.
    pub async fn forget(&self, record: &TxtRecord) -> Result<(), Error> {
        self.with(|records| {
            let before = records.len();
            records.retain(|r| r != record);
            (records.len() != before, ())
        })
        .await
    }

    /// Every record added and not yet deleted.
    pub async fn pending(&self) -> Result<Vec<TxtRecord>, Error> {
        self.with(|records| (false, records.clone())).await
    }
}
