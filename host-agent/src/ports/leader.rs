//! Leader election, seen from the services: with several replicas only the
//! holder of the lease orders. The manager knows only this trait; the
//! Kubernetes Lease (`crate::kubernetes::lease`) is the one implementation,
//! and `main.rs` keeps it held.

/// The lease this replica must hold to place orders.
#[async_trait::async_trait]
pub trait Leader: Send + Sync {
    /// Who this replica is, as written in the lease (for logs and errors).
    fn identity(&self) -> &str;

    /// Right before an order: whether this replica still holds the lease,
    /// asked of the source of truth, not only remembered. Fails closed: an
    /// unanswered question is no hold, so a replica paused past its lease
    /// places no order after it wakes.
    async fn still_holds(&self) -> bool;
}
