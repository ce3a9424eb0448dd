//! Status records written off the manager's loop: the loop hands each new
//! record to one writer task and goes on. Each write is fsync'd, and the
//! loop used to await it: 10,000 certificates whose first look failed at
//! start (the CA unreachable) meant 10,000 fsyncs in a row before the
//! restores behind them were taken in. The writer keeps only the newest
//! operation per certificate while it is busy (a record, or the removal of
//! an on-demand certificate's files: through the same queue, so a record
//! queued before a removal never lands after it), and a caller that must
//! know a record is kept (a `renew` answered) waits for the queue to pass.

use std::collections::HashMap;
use std::sync::Arc;

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

/// Runs every operation received, newest per certificate, until the queue
/// closes and is empty.
async fn write_all(store: Arc<dyn StateStore>, mut ops: mpsc::UnboundedReceiver<Op>) {
    while let Some(first) = ops.recv().await {
        let mut batch = HashMap::new();
        let mut barriers = Vec::new();
        let mut next = Some(first);
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
            let done = match op {
                Op::Save(status) => store.save_status(&status).await,
                Op::Remove(name) => store.remove_certificate(&name).await,
                Op::Barrier(_) => Ok(()),
            };
            if let Err(e) = done {
                warn!(certificate = name, "writing the state store: {e}");
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
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
}
