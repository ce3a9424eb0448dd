//! Adapters on the local disk: the state directory and the SDS/PEM files.

pub mod sink;
pub mod store;

use crate::Error;

/// Runs `f` on tokio's blocking pool and waits for it. Every write of the
/// disk adapters is fsync'd (milliseconds on a busy disk), and a worker of
/// the runtime waiting on the disk holds up the tasks queued behind it (the
/// challenge API, SDS). Once started, `f` runs to its end even if the caller
/// is dropped: a write is never cut short, and each file is replaced by
/// rename, so nothing is left half-written either way. A panic in `f` goes
/// on in the caller, as it would have if `f` had run there.
async fn off_runtime<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Error::Io {
            context: what.to_owned(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}
