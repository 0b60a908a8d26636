//! The storage contract. Every backend implements [`Store`] and passes the conformance suite in
//! `tests/it/store_conformance.rs`.
//!
//! Key shape, shared by every backend: a delivery lives under partition key
//! `{topic}#{subscription_id}` with the event's sequence as sort key, so a partition is read in
//! delivery order by a range read that starts at its head.

pub mod dynamodb;
pub mod embedded;
pub mod records;
pub mod topic_index;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::model::{
    FailureOutcome, NewEvent, Page, PartitionKey, PendingDelivery, Published, Subscription,
};

pub use dynamodb::DynamoStore;
pub use embedded::EmbeddedStore;

/// What went wrong in a store call, by meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The write conflicts with the current state (for example an id that already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// An argument the store interprets (such as a page token) is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Concurrent writers kept winning an optimistic-concurrency race; nothing was written.
    /// Retrying later can succeed.
    #[error("contention: {0}")]
    Contention(String),
    /// The disk is full: the call may or may not have taken effect (the failure can come while
    /// committing). Retry once space is freed (Publish with the same idempotency key).
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The store has more work queued than it takes; nothing was written. Retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Stored data cannot be decoded: damaged, or written by an incompatible version.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The store cannot be reached or cannot write now; nothing was written. Safe to retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store failed while making the call durable: it may or may not have taken effect.
    /// Retrying is safe for idempotent calls (Publish with an idempotency key).
    #[error("outcome unknown: {0}")]
    Uncertain(String),
    /// The call took effect in part and left a record of what is left, which a retry of the
    /// same call (or the store's own background sweep) finishes.
    #[error("partly done: {0}")]
    Partial(String),
    /// A write fenced by a partition lease was refused because the lease is no longer the
    /// caller's (another worker claimed the partition); nothing was written. Not retryable:
    /// the caller must stop working on the partition.
    #[error("partition lease lost: {0}")]
    LeaseLost(String),
    /// A bug.
    #[error("store internal error: {0}")]
    Internal(String),
}

/// Proof that a worker holds a partition's lease: the token its claim wrote into the lease.
/// A new claim writes a new token, so the writes of a worker whose lease was taken over are
/// refused (a fencing token).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub String);

impl LeaseToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        LeaseToken(format!("{:032x}", rand::random::<u128>()))
    }
}

/// Partition leases, for stores that several instances share: only the holder of a
/// partition's lease delivers it, which keeps one partition's deliveries sequential.
///
/// Lease expiry is judged by wall clock (`now + duration` is stored), so instances' clocks must
/// agree to well within the worker's safety margin (a third of the lease).
#[async_trait]
pub trait PartitionLeases: Send + Sync {
    /// Claims `partition` for `duration` if nobody holds a live lease on it. Returns the new
    /// lease's token, or `None` if another claim is live.
    async fn claim(
        &self,
        partition: &PartitionKey,
        duration: Duration,
    ) -> Result<Option<LeaseToken>, StoreError>;

    /// Extends the lease of `token` to `duration` from now. Returns false if the lease is no
    /// longer `token`'s (another worker claimed the partition since).
    async fn renew(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        duration: Duration,
    ) -> Result<bool, StoreError>;

    /// Gives the lease of `token` up (a no-op if it is no longer `token`'s). With `handover`
    /// the lease is left expired, so that every instance's rescan finds the partition (its
    /// holder stops with work left); without, it is deleted (nothing left to deliver).
    async fn release(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        handover: bool,
    ) -> Result<(), StoreError>;
}

/// Durable state of the broker: subscriptions, events and per-partition delivery progress.
///
/// Every method is atomic: it either applies all of its effects or none. A method that returns
/// `Ok` has made its effects durable unless its documentation says otherwise.
///
/// Writes that a delivery worker makes for its partition (`complete_delivery`,
/// `record_failure`) take the worker's lease token on a shared store and are refused with
/// [`StoreError::LeaseLost`] if the lease is no longer that token's.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new subscription. From the moment this returns, every publish on a matching
    /// topic fans out to it; earlier publishes never do.
    ///
    /// Returns `Conflict` if a subscription with the same id exists.
    async fn create_subscription(&self, subscription: &Subscription) -> Result<(), StoreError>;

    /// Returns the subscription with this id, or `NotFound`.
    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError>;

    /// Lists subscriptions ordered by id, starting after `page_token` (a token returned by an
    /// earlier call). At most `page_size` entries; `next_token` is `None` on the last page.
    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError>;

    /// Deletes a subscription and all of its pending deliveries (dead-lettered included) and
    /// returns how many deliveries were dropped. `NotFound` if the id is unknown.
    ///
    /// Not atomic on every backend, but all or resumable: once the subscription is deleted no
    /// publish fans out to it any more; if removing its backlog is interrupted, the call
    /// returns `Partial` and a retry (which no longer finds the subscription but finishes the
    /// removal, returning what it removed) or the store's background sweep completes it.
    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError>;

    /// Assigns the event its sequence and stores it together with one pending delivery per
    /// matching subscription, atomically and durably.
    ///
    /// The sequence is strictly greater than that of every event of the same topic whose
    /// publish returned before this call began, and every partition receives its deliveries in
    /// sequence order: once a delivery of sequence `n` is readable, no delivery with a smaller
    /// sequence can appear in that partition later.
    ///
    /// If `event.idempotency_key` matches a publish on the same topic within
    /// `idempotency_window`, nothing is written and the original outcome is returned with
    /// `duplicate = true`.
    async fn publish(
        &self,
        event: &NewEvent,
        idempotency_window: Duration,
    ) -> Result<Published, StoreError>;

    /// Returns up to `limit` deliveries of the partition that are neither completed nor
    /// dead-lettered, in sequence order, starting at the partition's head. Empty if there are
    /// none (or the partition is unknown).
    async fn next_deliveries(
        &self,
        partition: &PartitionKey,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError>;

    /// Marks the delivery of `sequence` in `partition` as done and removes it. Completing a
    /// delivery that is not pending is a no-op (`Ok`), so a retried call is harmless.
    /// `LeaseLost` if `fence` is given and is no longer the partition's lease.
    ///
    /// May be made durable lazily: after a crash a completed delivery can reappear (it is then
    /// sent again, which at-least-once allows); it is never lost.
    async fn complete_delivery(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError>;

    /// Records a failed attempt at the delivery of `sequence`: increments its attempt count,
    /// stores `error`, and either schedules the next attempt or dead-letters it (which moves the
    /// partition's head past it). A no-op if the delivery is not pending. `LeaseLost` if
    /// `fence` is given and is no longer the partition's lease.
    async fn record_failure(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        error: &str,
        outcome: FailureOutcome,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError>;

    /// Lists the pending deliveries of a subscription (dead-lettered included), ordered by
    /// topic then sequence, optionally only those of `topic`. At most `page_size` entries
    /// starting after `page_token`; the cost of a page does not depend on the backlog size.
    /// `NotFound` if the subscription does not exist.
    async fn list_pending(
        &self,
        subscription_id: &str,
        topic: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PendingDelivery>, StoreError>;

    /// At least every partition that has a delivery that is neither completed nor
    /// dead-lettered (it may list others), so the worker can resume after a restart and pick up
    /// partitions that another instance left.
    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError>;

    /// The partition leases of a store that several instances share; `None` for a store
    /// that one process owns (its worker delivers every partition without claiming).
    fn leases(&self) -> Option<&dyn PartitionLeases> {
        None
    }

    /// Whether the store can write now (true) or has failed its last write and not yet
    /// recovered, as a watch that changes with it; `None` if the store does not track it.
    fn health(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }

    /// Requests sent to a remote database so far, per operation; `None` for a local store.
    fn request_counts(&self) -> Option<BTreeMap<&'static str, u64>> {
        None
    }
}
