//! One partition's delivery loop, in small steps: read the next batch, wait until the head is
//! due, take a delivery slot, attempt it under the lease, record the outcome. Each step that
//! can block checks shutdown and, on a shared store, the lease first.

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::SemaphorePermit;
use tokio::time::Instant;

use crate::delivery::lease::{Lease, LeaseEnded};
use crate::delivery::worker::{Inner, Signal};
use crate::delivery::{retry, webhook};
use crate::model::{FailureOutcome, PartitionKey, PendingDelivery, Subscription, now_millis};
use crate::store::{PartitionLeases, StoreError};

/// Deliveries read from the store per partition at a time.
const BATCH_SIZE: usize = 16;
/// First pause before retrying a store call that failed; doubles up to [`STORE_RETRY_MAX`].
const STORE_RETRY_DELAY: Duration = Duration::from_millis(200);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);
/// The pause after the `failures`-th failed store call in a row (0-based).
fn store_retry_delay(failures: u32) -> Duration {
    STORE_RETRY_DELAY
        .saturating_mul(1 << failures.min(8))
        .min(STORE_RETRY_MAX)
}

/// How long a partition task with nothing to deliver waits for new work before it exits. A
/// steady trickle of events then costs no task start and no subscription read per event.
const LINGER: Duration = Duration::from_secs(2);

/// How often a paused partition looks whether it was resumed on another instance (a resume
/// through this instance wakes it at once).
const PAUSED_CHECK: Duration = Duration::from_secs(1);

/// Why a partition worker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Nothing left to deliver; the task already left the partition map.
    Idle,
    /// The server is shutting down.
    Shutdown,
    /// The subscription is gone.
    SubscriptionGone,
    /// The subscription no longer receives the partition's topic (an update removed it): what
    /// is left of its backlog is being removed, not sent.
    TopicRemoved,
    /// The lease was lost or could not be kept.
    Lease(LeaseEnded),
}

impl Stop {
    /// True if the worker may have stopped with work left, so its lease must stay findable.
    pub fn hands_over(&self) -> bool {
        matches!(
            self,
            Stop::Shutdown | Stop::Lease(LeaseEnded::Unrenewable(_))
        )
    }
}

/// A turn of the subscription's pace: holds its place in flight, if it limits them, until
/// the attempt ends.
struct Paced {
    _in_flight: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What [`PartitionWorker::may_send`] found.
enum Go {
    /// Send the delivery in hand.
    Send,
    /// Paused, disabled, or the subscription cannot be read: wait.
    Hold,
    /// The subscription's topics or filter changed: read the head again.
    Reread,
}

/// What to write after attempts.
enum Outcome {
    /// These deliveries succeeded (in order).
    Completed(Vec<u64>),
    /// This one failed: its sequence, the attempt's number, the error and what follows.
    Failed(u64, u32, String, FailureOutcome),
}

/// The state of one partition's delivery loop.
pub(crate) struct PartitionWorker<'a> {
    inner: &'a Arc<Inner>,
    partition: &'a PartitionKey,
    signal: &'a Signal,
    lease: Option<Lease>,
    subscription: Subscription,
    key: Vec<u8>,
    rng: StdRng,
    /// The engine's change count when the subscription was last read.
    changes_seen: u64,
    /// Deliveries that succeeded and are not recorded yet: written together, at the latest
    /// before the partition is read again, before a failure is recorded, and before the
    /// worker waits or stops (see [`PartitionWorker::flush`]). Only without a lease (the
    /// embedded store, one process): with one, each success is written before the next send.
    /// A crash loses them either way (completions are not synced), and the partition is then
    /// sent again from its head, in order.
    completed: Vec<u64>,
}

impl<'a> PartitionWorker<'a> {
    /// A worker for `partition` of `subscription` (read when the engine's change count was
    /// `changes_seen`), holding `lease` on a shared store.
    pub fn new(
        inner: &'a Arc<Inner>,
        partition: &'a PartitionKey,
        signal: &'a Signal,
        lease: Option<Lease>,
        (subscription, key): (Subscription, Vec<u8>),
        changes_seen: u64,
    ) -> Self {
        PartitionWorker {
            inner,
            partition,
            signal,
            lease,
            subscription,
            key,
            rng: StdRng::from_os_rng(),
            changes_seen,
            completed: Vec::with_capacity(BATCH_SIZE),
        }
    }

    /// Delivers until nothing is left or the worker must stop; returns why, with the lease.
    pub async fn run(mut self) -> (Stop, Option<Lease>) {
        let mut stop = self.deliver().await.unwrap_err();
        // Successes not yet written are recorded on the way out (shutdown included); with
        // the lease lost they are the new holder's to send again.
        if !self.completed.is_empty()
            && !matches!(stop, Stop::Lease(LeaseEnded::Lost))
            && let Err(error) = self.flush().await
        {
            stop = error;
        }
        (stop, self.lease)
    }

    /// Records the successes not written yet, in one call.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.completed.is_empty() {
            return Ok(());
        }
        let completed = std::mem::take(&mut self.completed);
        let result = self.record(Outcome::Completed(completed)).await;
        self.completed.clear();
        result
    }

    async fn deliver(&mut self) -> Result<(), Stop> {
        'batch: loop {
            self.check_shutdown()?;
            self.hold_lease().await?;
            // Before the read: the partition's head must be past what was delivered.
            self.flush().await?;
            let batch = self.next_batch().await?;
            if batch.is_empty() {
                self.linger().await?;
                continue;
            }
            // A short batch was the whole backlog: once it is delivered, the next read waits
            // for a wake-up (a publish while delivering leaves one) instead of reading an empty
            // partition at once.
            let caught_up = batch.len() < BATCH_SIZE;
            for delivery in batch {
                if !self.wait_until_due(&delivery).await? {
                    continue 'batch;
                }
                // The subscription's pace first (its turn and a place in flight), by its
                // current limits, then a delivery slot: a paced partition does not hold a slot
                // while it waits. A wake-up while waiting (an operator's change, a skip)
                // reads the head again.
                match self.may_send().await? {
                    Go::Send => {}
                    Go::Hold => {
                        self.wait_while_paused().await?;
                        continue 'batch;
                    }
                    Go::Reread => continue 'batch,
                }
                let Some(paced) = self.pace().await? else {
                    continue 'batch;
                };
                if self.inner.permits.available_permits() == 0 {
                    // Every slot is taken and the wait may be long: write what this
                    // partition delivered first.
                    self.flush().await?;
                }
                let permit = self.slot().await?;
                // Waiting for a slot may have taken a while: check the lease again.
                self.hold_lease().await?;
                match self.may_send().await? {
                    Go::Send => {}
                    Go::Hold => {
                        drop(permit);
                        drop(paced);
                        self.wait_while_paused().await?;
                        continue 'batch;
                    }
                    Go::Reread => continue 'batch,
                }
                // Every wait above may have ended at the moment shutdown began: no attempt
                // starts after it.
                self.check_shutdown()?;
                let started = Instant::now();
                let attempt = self.attempt(&delivery).await?;
                drop(permit);
                drop(paced);
                let metrics = &self.inner.config.metrics;
                metrics.attempt(&attempt, started.elapsed());
                let sequence = delivery.event.sequence;
                match attempt {
                    webhook::Attempt::Delivered => {
                        let since_publish =
                            now_millis().saturating_sub(delivery.event.published_at);
                        metrics.delivered(Duration::from_millis(since_publish));
                        self.completed.push(sequence);
                        if self.lease.is_some() {
                            // On a shared store another instance may take the partition over
                            // at any moment: a success is recorded before the next send, so
                            // the new holder repeats at most the attempt in flight.
                            self.flush().await?;
                        }
                        self.inner.endpoint_outcome(
                            &self.partition.subscription_id,
                            true,
                            now_millis(),
                        );
                    }
                    webhook::Attempt::Failed {
                        error, retry_after, ..
                    } => {
                        let failures = delivery.state.attempts + 1;
                        let outcome = retry::after_failure(
                            &self.subscription.retry_policy,
                            self.subscription.on_exhausted,
                            failures,
                            retry_after,
                            now_millis(),
                            &mut self.rng,
                        );
                        tracing::debug!(partition = %self.partition, sequence, failures, %error, ?outcome, "delivery failed");
                        if let Some((since, count)) = self.inner.endpoint_outcome(
                            &self.partition.subscription_id,
                            false,
                            now_millis(),
                        ) {
                            self.inner.disable(
                                &self.partition.subscription_id,
                                since,
                                count,
                                &error,
                            );
                        }
                        // After the successes before it, in order.
                        self.flush().await?;
                        self.record(Outcome::Failed(sequence, failures, error, outcome))
                            .await?;
                        if outcome == FailureOutcome::DeadLetter {
                            self.inner.config.metrics.dead_lettered();
                        }
                        // Re-read the head: the same event with its new schedule, or the next
                        // one if this one was dead-lettered.
                        continue 'batch;
                    }
                }
            }
            if caught_up {
                self.flush().await?;
                self.linger().await?;
            }
        }
    }

    fn leases(&self) -> Option<&'a dyn PartitionLeases> {
        let inner: &'a Arc<Inner> = self.inner;
        inner.leases.as_deref()
    }

    fn check_shutdown(&self) -> Result<(), Stop> {
        if self.inner.shutdown.is_fired() {
            return Err(Stop::Shutdown);
        }
        Ok(())
    }

    /// On a shared store: renews the lease if due and makes sure enough of it is left.
    async fn hold_lease(&mut self) -> Result<(), Stop> {
        let leases = self.leases();
        if let (Some(lease), Some(leases)) = (self.lease.as_mut(), leases) {
            lease.hold(leases).await.map_err(|ended| {
                tracing::warn!(partition = %self.partition, ?ended, "stopping: partition lease ended");
                Stop::Lease(ended)
            })?;
        }
        Ok(())
    }

    /// When the lease next needs attention (far in the future without one).
    fn renewal_due(&self) -> Instant {
        self.lease.as_ref().map_or_else(
            || Instant::now() + Duration::from_secs(3600),
            Lease::renewal_due,
        )
    }

    /// Sleeps until `until`, or until the lease needs renewing, or shutdown.
    async fn sleep_until(&mut self, until: Instant) -> Result<(), Stop> {
        let mut shutdown = self.inner.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(until.min(self.renewal_due())) => {}
            _ = shutdown.fired() => return Err(Stop::Shutdown),
        }
        self.hold_lease().await
    }

    /// Waits a growing pause after the `failures`-th failed store call.
    async fn store_pause(&mut self, failures: u32) -> Result<(), Stop> {
        self.sleep_until(Instant::now() + store_retry_delay(failures))
            .await
    }

    async fn next_batch(&mut self) -> Result<Vec<PendingDelivery>, Stop> {
        let mut failures = 0;
        loop {
            match self
                .inner
                .log
                .next_deliveries(self.partition, BATCH_SIZE)
                .await
            {
                Ok(batch) => return Ok(batch),
                Err(error) => {
                    tracing::warn!(partition = %self.partition, %error, "cannot read deliveries; retrying");
                    self.store_pause(failures).await?;
                    failures += 1;
                }
            }
        }
    }

    /// Waits for new work a moment; retires the partition if none comes. On a shared store the
    /// store is read once more first, since other instances' publishes wake only their own
    /// workers. `Err(Stop::Idle)` once retired.
    async fn linger(&mut self) -> Result<(), Stop> {
        let end = Instant::now() + LINGER;
        while Instant::now() < end {
            let mut shutdown = self.inner.shutdown.clone();
            tokio::select! {
                _ = self.signal.wake.notified() => return Ok(()),
                _ = tokio::time::sleep_until(end.min(self.renewal_due())) => {}
                _ = shutdown.fired() => return Err(Stop::Shutdown),
            }
            self.hold_lease().await?;
        }
        if self.lease.is_some() && !self.next_batch().await?.is_empty() {
            return Ok(());
        }
        if self.inner.retire(self.partition, self.signal) {
            return Err(Stop::Idle);
        }
        Ok(())
    }

    /// Waits until the delivery is due. Returns false if it woke early, to renew the lease or
    /// because it was woken (a publish, or an operator's retry-now, skip or change): the head
    /// is read again, since an operator may have changed it.
    async fn wait_until_due(&mut self, delivery: &PendingDelivery) -> Result<bool, Stop> {
        let now = now_millis();
        if delivery.state.next_attempt_at <= now {
            return Ok(true);
        }
        self.flush().await?;
        let now = now_millis();
        if delivery.state.next_attempt_at <= now {
            // Due while the successes were written.
            return Ok(true);
        }
        let due = Instant::now() + Duration::from_millis(delivery.state.next_attempt_at - now);
        let woke_early = self.renewal_due() < due;
        let mut shutdown = self.inner.shutdown.clone();
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(due.min(self.renewal_due())) => false,
            _ = self.signal.wake.notified() => true,
            _ = shutdown.fired() => return Err(Stop::Shutdown),
        };
        self.hold_lease().await?;
        Ok(!woke_early && !woken)
    }

    /// Whether the partition may send now: neither it nor its subscription is paused or
    /// disabled; stops the worker if the subscription is gone or no longer receives the topic.
    /// The subscription is read again first if it was changed through this instance, and on a
    /// shared store always (from the store's short-lived copy), so a pause through another
    /// instance holds before the next attempt. A change through this instance, or of its
    /// topics or filter, has the head read again: the deliveries in hand may be ones the change
    /// removed (the topic dropped, then added back before they were sent).
    async fn may_send(&mut self) -> Result<Go, Stop> {
        let changes = self.inner.changes.load(std::sync::atomic::Ordering::SeqCst);
        if self.inner.leases.is_some() || changes != self.changes_seen {
            match self
                .inner
                .subscriptions
                .get_subscription(&self.partition.subscription_id)
                .await
            {
                Ok(subscription) => {
                    if subscription.secret != self.subscription.secret {
                        match crate::signing::decode_secret(&subscription.secret) {
                            Ok(key) => self.key = key,
                            Err(error) => {
                                tracing::error!(partition = %self.partition, %error, "subscription has an unusable secret");
                                return Err(Stop::SubscriptionGone);
                            }
                        }
                    }
                    // A change through this instance, or one of topics or filter seen in the
                    // copy: a topic dropped and added back between two reads leaves the topics
                    // as they were, but the deliveries in hand may be gone.
                    let changed = changes != self.changes_seen
                        || subscription.topics != self.subscription.topics
                        || subscription.filter != self.subscription.filter;
                    self.subscription = subscription;
                    // Seen only once read: a failed read is tried again.
                    self.changes_seen = changes;
                    if changed && self.subscription.matches(&self.partition.topic) {
                        return Ok(Go::Reread);
                    }
                }
                Err(StoreError::NotFound(_)) => return Err(Stop::SubscriptionGone),
                Err(error) => {
                    // The copy in hand may predate a pause: send nothing until it can be read
                    // (the caller waits and asks again).
                    tracing::warn!(partition = %self.partition, %error, "cannot read the subscription again; holding");
                    return Ok(Go::Hold);
                }
            }
        }
        if !self.subscription.matches(&self.partition.topic) {
            tracing::info!(partition = %self.partition, "stopping: the subscription no longer receives the topic");
            return Err(Stop::TopicRemoved);
        }
        Ok(if self.subscription.control.sends(&self.partition.topic) {
            Go::Send
        } else {
            Go::Hold
        })
    }

    /// Waits until the partition may send again (resumed), keeping the lease.
    async fn wait_while_paused(&mut self) -> Result<(), Stop> {
        tracing::debug!(partition = %self.partition, "paused");
        self.flush().await?;
        loop {
            let mut shutdown = self.inner.shutdown.clone();
            tokio::select! {
                _ = self.signal.wake.notified() => {}
                _ = tokio::time::sleep_until((Instant::now() + PAUSED_CHECK).min(self.renewal_due())) => {}
                _ = shutdown.fired() => return Err(Stop::Shutdown),
            }
            self.hold_lease().await?;
            if !matches!(self.may_send().await?, Go::Hold) {
                return Ok(());
            }
        }
    }

    /// Waits for the subscription's pace (see [`crate::delivery::pacing`]), renewing the
    /// lease meanwhile; the permit returned holds a place in flight, if the subscription
    /// limits them.
    /// `Ok(None)` if it was woken meanwhile: the caller reads the head again.
    async fn pace(&mut self) -> Result<Option<Paced>, Stop> {
        let Some(pacer) = self.inner.pacers.get(&self.subscription) else {
            return Ok(Some(Paced { _in_flight: None }));
        };
        // A paced endpoint may keep the worker waiting: what it delivered is written first.
        self.flush().await?;
        let turn = pacer.turn();
        tokio::pin!(turn);
        loop {
            let mut shutdown = self.inner.shutdown.clone();
            // Shutdown first: a turn that comes due as shutdown begins is not taken.
            tokio::select! {
                biased;
                _ = shutdown.fired() => return Err(Stop::Shutdown),
                permit = &mut turn => return Ok(Some(Paced { _in_flight: permit })),
                _ = self.signal.wake.notified() => return Ok(None),
                _ = tokio::time::sleep_until(self.renewal_due()) => self.hold_lease().await?,
            }
        }
    }

    async fn slot(&self) -> Result<SemaphorePermit<'a>, Stop> {
        let mut shutdown = self.inner.shutdown.clone();
        // Shutdown first: a slot freed as shutdown begins is not taken.
        tokio::select! {
            biased;
            _ = shutdown.fired() => Err(Stop::Shutdown),
            permit = self.inner.permits.acquire() => Ok(permit.expect("semaphore never closes")),
        }
    }

    /// One HTTP attempt. An attempt in flight is not cancelled by shutdown: it completes
    /// (bounded by the request timeout) and its outcome is recorded. On a shared store the
    /// lease is renewed while it runs (the renewal runs beside the request, so a store that
    /// hangs cannot hold the lease check up), so a request slower than the lease keeps the
    /// partition; if the lease cannot be kept the request is abandoned (its connection
    /// dropped) half a margin before the lease runs out, and the worker stops without
    /// recording anything. The lease check is polled first, so a worker resuming from a pause
    /// past its lease does not write another byte of the request.
    async fn attempt(&mut self, delivery: &PendingDelivery) -> Result<webhook::Attempt, Stop> {
        // One span per attempt, a child of the publisher's span when Publish carried one.
        let span = tracing::debug_span!(
            "deliver",
            partition = %self.partition,
            sequence = delivery.event.sequence,
            attempt = delivery.state.attempts + 1,
        );
        if let Some(trace) = &delivery.event.trace {
            trace.parent(&span);
        }
        let send = tracing::Instrument::instrument(
            self.inner
                .transport
                .send(&self.subscription, &self.key, delivery),
            span,
        );
        tokio::pin!(send);
        let leases = self.leases();
        let (Some(lease), Some(leases)) = (self.lease.as_mut(), leases) else {
            return Ok(send.await);
        };
        let mut next_renewal = lease.renewal_due();
        let mut renewal = std::pin::pin!(None);
        loop {
            let abandon_at = lease.abandon_at();
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(abandon_at) => {
                    tracing::warn!(partition = %self.partition, "partition lease running out during a delivery; abandoning it");
                    return Err(Stop::Lease(LeaseEnded::Unrenewable(
                        "the lease ran out during a delivery".into(),
                    )));
                }
                answer = async {
                    match renewal.as_mut().as_pin_mut() {
                        Some(request) => request.await,
                        None => std::future::pending().await,
                    }
                }, if renewal.is_some() => {
                    renewal.set(None);
                    match lease.apply(answer) {
                        Ok(()) => next_renewal = lease.renewal_due(),
                        Err(LeaseEnded::Lost) => {
                            // Someone else delivers the partition now: drop the request.
                            tracing::warn!(partition = %self.partition, "partition lease lost during a delivery; abandoning it");
                            return Err(Stop::Lease(LeaseEnded::Lost));
                        }
                        Err(LeaseEnded::Unrenewable(error)) => {
                            tracing::warn!(partition = %self.partition, %error, "cannot renew partition lease; retrying");
                            next_renewal = Instant::now() + Duration::from_millis(250);
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_renewal), if renewal.is_none() => {
                    renewal.set(Some(lease.renewal(leases)));
                }
                attempt = &mut send => {
                    // A renewal still in flight is awaited, not dropped: once the outcome's
                    // fenced write has extended the lease, a late renewal must not land after
                    // it and move the lease back.
                    if let Some(request) = renewal.as_mut().as_pin_mut() {
                        let answer = request.await;
                        if let Err(LeaseEnded::Lost) = lease.apply(answer) {
                            tracing::warn!(partition = %self.partition, "partition lease lost during a delivery");
                            return Err(Stop::Lease(LeaseEnded::Lost));
                        }
                    }
                    return Ok(attempt);
                }
            }
        }
    }

    /// Writes attempts' outcomes, retrying the same write until it succeeds: a failure keeps
    /// its computed schedule (no early re-send); successes are written before the partition
    /// is read again. Stops if the lease is lost (the new holder sends the events again).
    async fn record(&mut self, outcome: Outcome) -> Result<(), Stop> {
        let mut failures = 0;
        loop {
            let fence = self.lease.as_ref().map(Lease::token);
            let log = &self.inner.log;
            let (sequence, result) = match &outcome {
                Outcome::Completed(sequences) => (
                    sequences.first().copied().unwrap_or_default(),
                    log.complete_deliveries(self.partition, sequences, fence)
                        .await,
                ),
                Outcome::Failed(sequence, attempt, error, failure) => (
                    *sequence,
                    log.record_failure(self.partition, *sequence, *attempt, error, *failure, fence)
                        .await,
                ),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(StoreError::LeaseLost(reason)) => {
                    tracing::warn!(partition = %self.partition, sequence, %reason, "outcome refused: lease lost");
                    return Err(Stop::Lease(LeaseEnded::Lost));
                }
                Err(error) => {
                    tracing::warn!(partition = %self.partition, sequence, %error, "cannot record the outcome of a delivery; retrying");
                    // Not cut short by shutdown: the outcome is worth recording within the
                    // shutdown grace.
                    let delay = store_retry_delay(failures);
                    tokio::time::sleep_until((Instant::now() + delay).min(self.renewal_due()))
                        .await;
                    self.hold_lease().await?;
                    failures += 1;
                }
            }
        }
    }
}
