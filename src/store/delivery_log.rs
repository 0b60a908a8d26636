//! The delivery log: events, their fan-out into per-partition deliveries, and each delivery's
//! progress.
//!
//! # Lifecycle of a delivery
//! A publish stores the event and one delivery per matching subscription, in partition
//! `{topic}#{subscription_id}` under the event's sequence. A delivery is then
//!
//! - **pending**: returned by [`DeliveryLog::next_deliveries`] once it is the partition's
//!   head (every delivery with a smaller sequence is completed or dead-lettered) and listed by
//!   [`DeliveryLog::list_pending`];
//! - **retrying**: still pending, with `attempts` and `next_attempt_at` advanced by
//!   [`DeliveryLog::record_failure`] with [`FailureOutcome::RetryAt`];
//! - **completed**: removed by [`DeliveryLog::complete_delivery`]; once no delivery of an event
//!   is left, the event itself is removed;
//! - **dead-lettered**: kept (listed by `list_pending`, never returned by `next_deliveries`)
//!   after [`DeliveryLog::record_failure`] with [`FailureOutcome::DeadLetter`]; the partition's
//!   `dead_through` mark moves past it, so the next delivery becomes the head.
//!
//! Deleting the subscription removes all of its deliveries, dead-lettered ones included.
//!
//! # Atomicity
//! Each call applies all of its effects or none, except a DynamoDB fan-out larger than one
//! transaction: it is written in chunks behind an "open fan-out" mark on the event, and every
//! reader of the topic's partitions finishes (repairs) an open fan-out before reading past it,
//! so no partition sees a later sequence before an earlier one.

use std::time::Duration;

use async_trait::async_trait;

use crate::model::{
    FailureOutcome, NewEvent, Page, PartitionKey, PartitionStatus, PendingDelivery, Published,
    ReplayRange, Replayed,
};
use crate::store::{LeaseToken, StoreError};

/// Events and per-partition delivery progress.
///
/// Writes that a delivery worker makes for its partition (`complete_delivery`,
/// `record_failure`) take the worker's lease token on a shared store and are refused with
/// [`StoreError::LeaseLost`] if the lease is no longer that token's.
#[async_trait]
pub trait DeliveryLog: Send + Sync {
    /// Assigns the event its sequence and stores it together with one pending delivery per
    /// matching subscription, durably.
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

    /// Completes several deliveries of one partition, in order, as
    /// [`DeliveryLog::complete_delivery`] does each (a store may write them together). On an
    /// error, a prefix of them may be recorded; repeating the call is harmless.
    async fn complete_deliveries(
        &self,
        partition: &PartitionKey,
        sequences: &[u64],
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        for &sequence in sequences {
            self.complete_delivery(partition, sequence, fence).await?;
        }
        Ok(())
    }

    /// Records that attempt number `attempt` (1 for the first) at the delivery of `sequence`
    /// failed: sets its attempt count to `attempt`, stores `error`, and either schedules the
    /// next attempt or dead-letters it (which moves the partition's head past it). A no-op if
    /// the delivery is not pending or its count is not `attempt - 1`: a call repeated after an
    /// ambiguous error counts the attempt once, and an attempt that began before a redrive or
    /// replay reset the count does not override it. `LeaseLost` if `fence` is given and is no
    /// longer the partition's lease.
    async fn record_failure(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        attempt: u32,
        error: &str,
        outcome: FailureOutcome,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError>;

    /// Lists the pending deliveries of a subscription (dead-lettered included; only those
    /// with `dead_only`), ordered by topic then sequence, optionally only those of `topic`.
    /// At most `page_size` entries starting after `page_token`; the cost of a page does not
    /// depend on the backlog size. `NotFound` if the subscription does not exist.
    async fn list_pending(
        &self,
        subscription_id: &str,
        topic: Option<&str>,
        dead_only: bool,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PendingDelivery>, StoreError>;

    /// The partitions of a subscription that have ever received a delivery (and, on
    /// DynamoDB, those of every published topic it matches), ordered by topic, paged: at
    /// most `page_size` starting after `page_token`. The cost of a page does not depend on
    /// the backlog. `NotFound` if the subscription does not exist.
    async fn partition_status(
        &self,
        subscription_id: &str,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PartitionStatus>, StoreError>;

    /// Makes the partition's head due now (its backoff is cut short) and returns its
    /// sequence; `None` if nothing is pending. Not fenced: an operator's call.
    async fn retry_now(&self, partition: &PartitionKey) -> Result<Option<u64>, StoreError>;

    /// Dead-letters the partition's head, provided it is the delivery of `sequence`, so that
    /// the partition moves on; `FailedPrecondition` (nothing written) if the head is another
    /// delivery or there is none. Not fenced: an attempt at it already in flight finishes,
    /// and a success then completes the dead letter.
    async fn skip_head(&self, partition: &PartitionKey, sequence: u64) -> Result<(), StoreError>;

    /// Puts dead letters of the partition back in front of its pending deliveries, marked as
    /// redriven, with fresh attempts: those of `sequences`, or all if `None`. Returns how many.
    /// `NotFound` (nothing changed, on the embedded store) if a named sequence is not a dead
    /// letter of the partition.
    async fn redrive(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError>;

    /// Deletes dead letters of the partition for good: those of `sequences`, or all if
    /// `None`. Returns how many. `NotFound` as for [`DeliveryLog::redrive`].
    async fn purge(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError>;

    /// Queues the partition's delivered events of `range` (those the store still keeps,
    /// within its retention window) to be sent again, in sequence order, in front of its
    /// pending deliveries, each marked as a replay with its original previous sequence. Events
    /// of the range still pending or dead-lettered are left alone (counted as skipped).
    /// Events published before the subscription existed are not the partition's: the caller
    /// bounds `range.from_time` by its creation time.
    async fn replay(
        &self,
        partition: &PartitionKey,
        range: &ReplayRange,
    ) -> Result<Replayed, StoreError>;

    /// At least every partition that has a delivery that is neither completed nor
    /// dead-lettered (it may list others), so the worker can resume after a restart and pick up
    /// partitions that another instance left.
    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError>;
}

/// The last error recorded on a delivery an operator skipped.
pub const SKIPPED: &str = "skipped by an operator";

/// Why a skip was refused: the head is not the delivery the operator named.
pub fn head_moved(partition: &PartitionKey, expected: u64, head: Option<u64>) -> StoreError {
    match head {
        Some(head) => StoreError::FailedPrecondition(format!(
            "the head of partition {partition} is sequence {head}, not {expected}; look again \
             (herald status) and skip the current head if it is the one"
        )),
        None => StoreError::FailedPrecondition(format!(
            "partition {partition} has no pending delivery, so sequence {expected} is not its \
             head"
        )),
    }
}

/// How far past its publish time an event's sequence can be: it is taken when the publish
/// commits (a microsecond clock reading, bumped past the topic's last), not when it starts.
const SEQUENCE_LAG_MICROS: u64 = 60_000_000;

/// The sequences a replay range can hold: its sequence bounds, narrowed by its time bounds
/// (a sequence is a publish time in microseconds, or a little later).
pub fn replay_sequences(range: &ReplayRange) -> (u64, u64) {
    let low = range
        .from_sequence
        .max(range.from_time.saturating_mul(1000));
    let high = range.to_sequence.min(
        range
            .to_time
            .saturating_mul(1000)
            .saturating_add(999 + SEQUENCE_LAG_MICROS),
    );
    (low, high)
}
