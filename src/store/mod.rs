//! The storage contract, split by job, and its backends.
//!
//! - [`SubscriptionStore`]: the subscription registry.
//! - [`DeliveryLog`]: events, fan-out, per-partition delivery progress (and its lifecycle).
//! - [`PartitionLeases`]: one sender per partition across instances (shared stores only).
//! - [`Store`]: what a backend offers as a whole: the first two, its leases if it has any,
//!   and its health.
//! - [`instrumented::Instrumented`]: any store, with each call timed and counted for the
//!   metrics.
//!
//! Every backend passes the conformance suite in `tests/it/store_conformance/` (one module per
//! trait). Key shape, shared by every backend: a delivery lives under partition key
//! `{topic}#{subscription_id}` with the event's sequence as sort key, so a partition is read in
//! delivery order by a range read that starts at its head.

pub mod delivery_log;
pub mod dynamodb;
pub mod embedded;
pub mod error;
pub mod instrumented;
pub mod leases;
pub mod pages;
pub mod records;
pub mod subscriptions;
pub mod topic_index;

use std::sync::Arc;

use tokio::sync::watch;

pub use delivery_log::DeliveryLog;
pub use dynamodb::DynamoStore;
pub use embedded::EmbeddedStore;
pub use error::StoreError;
pub use leases::{LeaseToken, PartitionLeases};
pub use subscriptions::{SubscriptionLimits, SubscriptionStore, SubscriptionUpdate, Updated};

/// A storage backend as a whole. The broker and the delivery engine take from it only the
/// parts they use (trait upcasting: `Arc<dyn Store>` coerces to `Arc<dyn DeliveryLog>`).
pub trait Store: SubscriptionStore + DeliveryLog + 'static {
    /// The partition leases of a store that several instances share; `None` for a store
    /// that one process owns (its worker delivers every partition without claiming).
    fn leases(self: Arc<Self>) -> Option<Arc<dyn PartitionLeases>>;

    /// Whether the store can write now (true) or has failed its last write and not yet
    /// recovered, as a watch that changes with it; `None` if the store does not track it.
    fn health(&self) -> Option<watch::Receiver<bool>> {
        None
    }

    /// The counters of requests sent to a remote database; `None` for a local store.
    fn request_counts(&self) -> Option<Arc<dynamodb::RequestCounts>> {
        None
    }
}
