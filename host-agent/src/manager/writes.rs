//! Status records written off the manager's loop: the loop hands each new
//! record to one writer task and goes on. Each write is fsync'd, and the
//! loop used to await it: 10,000 certificates whose first look failed at
//! start (the CA unreachable) meant 10,000 fsyncs in a row before the
//! restores behind them were taken in. The writer keeps only the newest
//! operation per certificate while it is busy (a record, or the removal of
//! an on-demand certificate's files: through the same queue, so a record
//! queued before a removal never lands after it), and a caller that must
//! know a record is kept (a `renew` answered) waits for the queue to pass.
//! A write that fails is tried again after a backoff (1 s doubling to a
//! minute) until it lands or a newer operation for the same certificate
//! replaces it: the manager counts a record as written once it is queued,
//! so a failed one would otherwise wait for the certificate's next change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::ports::store::{StateStore, Status};

enum Op {
    Save(Box<Status>),
    /// The certificate's files and record (`StateStore::remove_certificate`).
    Remove(String),
    /// Answered once everything queued before it is written.
    Barrier(oneshot::Sender<()>),
}

pub struct StatusWrites {
    queue: Option<mpsc::UnboundedSender<Op>>,
    writer: Option<JoinHandle<()>>,
}

impl StatusWrites {
    /// None running yet: [`StatusWrites::start`] it where the manager runs.
    pub fn none() -> Self {
        Self {
            queue: None,
            writer: None,
        }
    }

    /// Starts the writer on the current runtime; without one, records are
    /// dropped with a warning (the manager only runs on a runtime).
    pub fn start(store: Arc<dyn StateStore>) -> Self {
        let (queue, records) = mpsc::unbounded_channel();
        let writer = tokio::runtime::Handle::try_current()
            .ok()
            .map(|runtime| runtime.spawn(write_all(store, records)));
        Self {
            queue: Some(queue),
            writer,
        }
    }

    fn send(&self, op: Op) -> bool {
        let sent = self.queue.as_ref().map(|q| q.send(op));
        let ok = matches!(sent, Some(Ok(())));
        if !ok {
            warn!("a status record was not written: the writer has stopped");
        }
        ok
    }

    /// Queues `status` to be written.
    pub fn save(&self, status: Status) {
        self.send(Op::Save(Box::new(status)));
    }

    /// Queues the removal of certificate `name` from the store.
    pub fn remove(&self, name: &str) {
        self.send(Op::Remove(name.to_owned()));
    }

    /// Waits until everything queued so far is written.
    pub async fn written(&self) {
        let (done, wait) = oneshot::channel();
        if self.send(Op::Barrier(done)) {
            let _ = wait.await;
        }
    }

    /// Writes what is queued, then stops the writer.
    pub async fn flush(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.take()
            && let Err(e) = writer.await
        {
            warn!("the status writer ended badly: {e}");
        }
    }
}

/// First wait before a failed write is tried again, and the longest.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Runs every operation received, newest per certificate, until the queue
/// closes and is empty; failed ones again after a backoff (once more at
/// the close, so a stop is never held up by a store that does not answer).
async fn write_all(store: Arc<dyn StateStore>, mut ops: mpsc::UnboundedReceiver<Op>) {
    let mut failed: HashMap<String, Op> = HashMap::new();
    // The wait before the next retry, and the retries in a row so far.
    let (mut backoff, mut retries) = (RETRY_INITIAL, 0u32);
    let mut open = true;
    while open || !failed.is_empty() {
        let first = match (open, failed.is_empty()) {
            (false, _) => None,
            (true, true) => ops.recv().await,
            // Err: the retry time came first.
            (true, false) => tokio::time::timeout(backoff, ops.recv())
                .await
                .unwrap_or(None),
        };
        open &= first.is_some() || !ops.is_closed() || !ops.is_empty();
        let mut batch = std::mem::take(&mut failed);
        let mut barriers = Vec::new();
        let mut next = first;
        while let Some(op) = next {
            match op {
                Op::Save(status) => {
                    batch.insert(status.name.clone(), Op::Save(status));
                }
                Op::Remove(name) => {
                    batch.insert(name.clone(), Op::Remove(name));
                }
                Op::Barrier(done) => barriers.push(done),
            }
            next = ops.try_recv().ok();
        }
        for (name, op) in batch {
            if let Err(e) = run(store.as_ref(), &op).await {
                warn!(
                    certificate = name,
                    "writing the state store (tried again later): {e}"
                );
                failed.insert(name, op);
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
        if failed.is_empty() {
            retries = 0;
        } else {
            backoff = RETRY_INITIAL
                .saturating_mul(1 << retries.min(16))
                .min(RETRY_MAX);
            retries += 1;
        }
        if !open && !failed.is_empty() {
            warn!("{} state writes not done at the stop", failed.len());
            break;
        }
    }
}

async fn run(store: &dyn StateStore, op: &Op) -> Result<(), crate::Error> {
    match op {
        Op::Save(status) => store.save_status(status).await,
        Op::Remove(name) => store.remove_certificate(name).await,
        Op::Barrier(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::store::FileStore;

    fn status(name: &str, failures: u32) -> Status {
        Status {
            name: name.to_owned(),
            failures,
            ..Status::default()
        }
    }

    #[tokio::test]
    async fn the_newest_record_of_each_is_written_and_flush_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(dir.path()).unwrap());
        let mut writes = StatusWrites::start(Arc::clone(&store));
        for failures in 1..=50 {
            writes.save(status("a", failures));
            writes.save(status("b", failures * 2));
        }
        writes.remove("b");
        writes.written().await;
        let read = |name| {
            let store = Arc::clone(&store);
            async move { store.load_status(name).await.unwrap().unwrap().failures }
        };
        assert_eq!(read("a").await, 50);
        assert!(store.load_status("b").await.unwrap().is_none(), "removed");
        writes.save(status("b", 7));
        writes.flush().await;
        assert_eq!(read("b").await, 7, "a record after the removal is kept");
    }

    /// A fake, for fault injection only: its first `failures` status
    /// writes fail, which a real store cannot be made to do on cue; the
    /// rest goes to a real `FileStore`.
    struct Flaky {
        real: FileStore,
        failures: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl StateStore for Flaky {
        async fn save_status(&self, s: &Status) -> Result<(), crate::Error> {
            use std::sync::atomic::Ordering::SeqCst;
            let take = |n: u32| n.checked_sub(1);
            if self.failures.fetch_update(SeqCst, SeqCst, take).is_ok() {
                return Err(crate::Error::Kubernetes("injected".into()));
            }
            self.real.save_status(s).await
        }
        async fn load_status(&self, a: &str) -> Result<Option<Status>, crate::Error> {
            self.real.load_status(a).await
        }
        async fn read_account(&self, a: &str) -> Result<Option<Vec<u8>>, crate::Error> {
            self.real.read_account(a).await
        }
        async fn write_account(&self, a: &str, b: &[u8]) -> Result<(), crate::Error> {
            self.real.write_account(a, b).await
        }
        async fn forget_account(&self, a: &str) -> Result<(), crate::Error> {
            self.real.forget_account(a).await
        }
        async fn load_certificate(
            &self,
            a: &str,
        ) -> Result<Option<crate::ports::store::StoredCertificate>, crate::Error> {
            self.real.load_certificate(a).await
        }
        async fn save_certificate(
            &self,
            a: &str,
            b: &crate::ports::store::StoredCertificate,
        ) -> Result<(), crate::Error> {
            self.real.save_certificate(a, b).await
        }
        async fn status_names(&self) -> Result<Vec<String>, crate::Error> {
            self.real.status_names().await
        }
        async fn read_ledger(&self, a: &str) -> Result<Option<Vec<u8>>, crate::Error> {
            self.real.read_ledger(a).await
        }
        async fn write_ledger(&self, a: &str, b: &[u8]) -> Result<(), crate::Error> {
            self.real.write_ledger(a, b).await
        }
        async fn read_dns_journal(&self) -> Result<Option<Vec<u8>>, crate::Error> {
            self.real.read_dns_journal().await
        }
        async fn write_dns_journal(&self, a: &[u8]) -> Result<(), crate::Error> {
            self.real.write_dns_journal(a).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_tried_again_until_it_lands() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky {
            real: FileStore::open(dir.path()).unwrap(),
            failures: 3.into(),
        });
        let writes = StatusWrites::start(Arc::clone(&store) as Arc<dyn StateStore>);
        writes.save(status("a", 4));
        writes.written().await;
        assert!(store.load_status("a").await.unwrap().is_none(), "failed");
        // Tried again after 1 s, 2 s, 4 s: the third retry lands.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(store.load_status("a").await.unwrap().is_none());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let kept = store.load_status("a").await.unwrap().unwrap();
        assert_eq!(kept.failures, 4);
        assert_eq!(store.failures.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
