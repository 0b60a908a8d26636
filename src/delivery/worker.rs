//! Partition scheduling. One task per partition with pending work delivers its events strictly
//! in sequence order, one at a time; a shared semaphore bounds the HTTP requests in flight over
//! all partitions. A publish wakes the tasks of the partitions it wrote to (no polling); a task
//! with nothing left to deliver waits a moment for more, then exits. On a shared store a task
//! first claims its partition, so one instance at a time delivers it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::delivery::{retry, webhook};
use crate::model::{PartitionKey, Subscription, now_millis};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};

/// Deliveries read from the store per partition at a time.
const BATCH_SIZE: usize = 16;
/// Pause before retrying a store call that failed.
const STORE_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most HTTP deliveries in flight at once.
    pub concurrency: usize,
    /// How long a partition claim lasts; it is renewed every third of that while in use.
    pub lease: Duration,
    /// How often to look in the store for partitions with pending work that this instance
    /// was not told about (left by another instance). `None` for a store only this process
    /// writes.
    pub rescan: Option<Duration>,
}

/// How long a partition task with nothing to deliver waits for new work before it exits. A
/// steady trickle of events then costs no task start and no subscription read per event.
const LINGER: Duration = Duration::from_secs(2);

/// Tells a partition task that new deliveries were stored.
#[derive(Default)]
struct Signal {
    /// Set on every notification; cleared by the task when it decides to exit.
    new_work: AtomicBool,
    /// Wakes a lingering task (keeps one permit if it is not waiting yet).
    wake: tokio::sync::Notify,
}

/// Handle to the delivery engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    config: EngineConfig,
    client: reqwest::Client,
    permits: Semaphore,
    /// Partitions with a running task, each with its wake-up signal.
    partitions: Mutex<HashMap<PartitionKey, Arc<Signal>>>,
    tasks: TaskTracker,
    shutdown: Shutdown,
}

impl Engine {
    /// Creates an engine; call [`Engine::resume`] to pick up work stored before a restart.
    pub fn new(store: Arc<dyn Store>, config: EngineConfig, shutdown: Shutdown) -> Self {
        Engine {
            inner: Arc::new(Inner {
                store,
                config,
                client: webhook::client(),
                permits: Semaphore::new(config.concurrency),
                partitions: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                shutdown,
            }),
        }
    }

    /// Starts a task for every partition that has pending deliveries in the store, and, if
    /// configured, keeps looking for such partitions periodically.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        let count = self.rescan().await?;
        if let Some(interval) = self.inner.config.rescan {
            let engine = self.clone();
            self.inner.tasks.spawn(async move {
                while engine.inner.pause(interval).await {
                    if let Err(error) = engine.rescan().await {
                        tracing::warn!(%error, "cannot look for pending partitions");
                    }
                }
            });
        }
        Ok(count)
    }

    async fn rescan(&self) -> Result<usize, StoreError> {
        let partitions = self.inner.store.pending_partitions().await?;
        let count = partitions.len();
        self.notify(&partitions);
        Ok(count)
    }

    /// Tells the engine that these partitions have new deliveries.
    pub fn notify(&self, partitions: &[PartitionKey]) {
        if self.inner.shutdown.is_fired() {
            return;
        }
        let mut running = self.inner.partitions.lock().expect("partition map lock");
        for partition in partitions {
            match running.get(partition) {
                Some(signal) => {
                    signal.new_work.store(true, Ordering::SeqCst);
                    signal.wake.notify_one();
                }
                None => {
                    let new_work = Arc::new(Signal::default());
                    running.insert(partition.clone(), new_work.clone());
                    let inner = self.inner.clone();
                    let partition = partition.clone();
                    self.inner
                        .tasks
                        .spawn(run_partition(inner, partition, new_work));
                }
            }
        }
    }

    /// Number of partitions with a running task.
    pub fn active_partitions(&self) -> usize {
        self.inner
            .partitions
            .lock()
            .expect("partition map lock")
            .len()
    }

    /// Waits until every partition task has stopped (call after firing shutdown), at most
    /// `grace`. Returns false if some were still running; their deliveries stay pending.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner.tasks.close();
        tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_ok()
    }
}

impl Inner {
    /// Removes a partition whose task found no work, unless new work arrived meanwhile.
    /// Returns true if the task should exit.
    fn retire(&self, partition: &PartitionKey, signal: &Signal) -> bool {
        let mut running = self.partitions.lock().expect("partition map lock");
        if signal.new_work.swap(false, Ordering::SeqCst) && !self.shutdown.is_fired() {
            return false;
        }
        running.remove(partition);
        true
    }

    /// Waits `delay` unless shutdown fires first; returns false on shutdown.
    async fn pause(&self, delay: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.fired() => false,
        }
    }
}

/// Claims the partition, retrying briefly while another instance holds it (it may be about to
/// let go). Returns false if the claim was not granted; the periodic rescan retries later.
async fn claim(inner: &Inner, partition: &PartitionKey) -> bool {
    let mut pause = Duration::from_millis(20);
    let mut waited = Duration::ZERO;
    while waited < inner.config.lease {
        match inner
            .store
            .claim_partition(partition, inner.config.lease)
            .await
        {
            Ok(true) => return true,
            Ok(false) => {}
            Err(error) => tracing::warn!(%partition, %error, "cannot claim partition"),
        }
        if !inner.pause(pause).await {
            return false;
        }
        waited += pause;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    false
}

/// Reads the partition's subscription and signing key; `None` if it is gone or unusable, or
/// on shutdown. Subscriptions never change, so this is done once per task.
async fn load_subscription(
    inner: &Inner,
    partition: &PartitionKey,
) -> Option<(Subscription, Vec<u8>)> {
    loop {
        match inner
            .store
            .get_subscription(&partition.subscription_id)
            .await
        {
            Ok(subscription) => {
                return match webhook::decode_secret(&subscription.secret) {
                    Ok(key) => Some((subscription, key)),
                    Err(error) => {
                        tracing::error!(%partition, %error, "subscription has an unusable secret");
                        None
                    }
                };
            }
            Err(StoreError::NotFound(_)) => return None,
            Err(error) => {
                tracing::warn!(%partition, %error, "cannot read subscription; retrying");
                if !inner.pause(STORE_RETRY_DELAY).await {
                    return None;
                }
            }
        }
    }
}

/// How a partition's delivery loop ended.
enum Ending {
    /// Nothing left: the task already left the partition map and released its claim.
    Retired,
    /// Shutdown, a lost claim, or a deleted subscription.
    Stopped,
}

async fn run_partition(inner: Arc<Inner>, partition: PartitionKey, new_work: Arc<Signal>) {
    let claimed = claim(&inner, &partition).await;
    if claimed
        && let Some((subscription, key)) = load_subscription(&inner, &partition).await
        && let Ending::Retired = deliver(&inner, &partition, &new_work, &subscription, &key).await
    {
        return;
    }
    inner
        .partitions
        .lock()
        .expect("partition map lock")
        .remove(&partition);
    // Only a claim that was granted needs giving back.
    if claimed && let Err(error) = inner.store.release_partition(&partition).await {
        tracing::warn!(%partition, %error, "cannot release partition claim");
    }
}

/// Delivers the partition's events in order until none is left (or the task must stop).
async fn deliver(
    inner: &Inner,
    partition: &PartitionKey,
    signal: &Signal,
    subscription: &Subscription,
    key: &[u8],
) -> Ending {
    let mut rng = StdRng::from_os_rng();
    let renew_every = inner.config.lease / 3;
    let mut claimed_at = tokio::time::Instant::now();
    'partition: loop {
        if inner.shutdown.is_fired() {
            return Ending::Stopped;
        }
        if claimed_at.elapsed() >= renew_every {
            match inner
                .store
                .claim_partition(partition, inner.config.lease)
                .await
            {
                Ok(true) => claimed_at = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!(%partition, "lost the partition claim to another instance");
                    return Ending::Stopped;
                }
                Err(error) => {
                    tracing::warn!(%partition, %error, "cannot renew partition claim");
                    if claimed_at.elapsed() >= inner.config.lease - renew_every {
                        return Ending::Stopped;
                    }
                }
            }
        }
        let batch = match inner.store.next_deliveries(partition, BATCH_SIZE).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%partition, %error, "cannot read deliveries; retrying");
                if inner.pause(STORE_RETRY_DELAY).await {
                    continue;
                }
                return Ending::Stopped;
            }
        };
        if batch.is_empty() {
            // Linger: most partitions that just drained get more work soon.
            let mut shutdown = inner.shutdown.clone();
            tokio::select! {
                _ = signal.wake.notified() => continue,
                _ = tokio::time::sleep(LINGER) => {}
                _ = shutdown.fired() => return Ending::Stopped,
            }
            if inner.retire(partition, signal) {
                if let Err(error) = inner.store.release_partition(partition).await {
                    tracing::warn!(%partition, %error, "cannot release partition claim");
                }
                return Ending::Retired;
            }
            continue;
        }
        for delivery in batch {
            let now = now_millis();
            if delivery.state.next_attempt_at > now {
                let wait = Duration::from_millis(delivery.state.next_attempt_at - now);
                // Wake in time to renew the claim; the head is read again after.
                let renew_in = renew_every.saturating_sub(claimed_at.elapsed());
                if !inner.pause(wait.min(renew_in)).await {
                    return Ending::Stopped;
                }
                if wait > renew_in {
                    continue 'partition;
                }
            }
            let permit = {
                let mut shutdown = inner.shutdown.clone();
                tokio::select! {
                    permit = inner.permits.acquire() => permit.expect("semaphore never closes"),
                    _ = shutdown.fired() => return Ending::Stopped,
                }
            };
            // An attempt in flight is never cancelled: it completes (bounded by the request
            // timeout) and its outcome is recorded, even during shutdown. The claim is renewed
            // while it runs, so a request slower than the lease cannot let another instance
            // start on the next event.
            let send = webhook::send(&inner.client, subscription, key, &delivery);
            tokio::pin!(send);
            let mut claim_lost = false;
            let mut next_renewal = claimed_at + renew_every;
            let attempt = loop {
                tokio::select! {
                    attempt = &mut send => break attempt,
                    _ = tokio::time::sleep_until(next_renewal), if !claim_lost => {
                        match inner.store.claim_partition(partition, inner.config.lease).await {
                            Ok(true) => {
                                claimed_at = tokio::time::Instant::now();
                                next_renewal = claimed_at + renew_every;
                            }
                            Ok(false) => claim_lost = true,
                            Err(error) => {
                                tracing::warn!(%partition, %error, "cannot renew partition claim");
                                next_renewal = tokio::time::Instant::now()
                                    + Duration::from_millis(500).min(renew_every);
                            }
                        }
                    }
                }
            };
            drop(permit);
            if claim_lost {
                tracing::warn!(%partition, "lost the partition claim during a delivery");
                return Ending::Stopped;
            }
            let sequence = delivery.event.sequence;
            match attempt {
                webhook::Attempt::Delivered => {
                    if let Err(error) = inner.store.complete_delivery(partition, sequence).await {
                        // Left pending: it will be sent again (at-least-once).
                        tracing::warn!(%partition, sequence, %error, "cannot record delivery");
                        inner.pause(STORE_RETRY_DELAY).await;
                        continue 'partition;
                    }
                }
                webhook::Attempt::Failed { error, retry_after } => {
                    let failures = delivery.state.attempts + 1;
                    let outcome = retry::after_failure(
                        &subscription.retry_policy,
                        subscription.on_exhausted,
                        failures,
                        retry_after,
                        now_millis(),
                        &mut rng,
                    );
                    tracing::debug!(%partition, sequence, failures, %error, ?outcome, "delivery failed");
                    if let Err(store_error) = inner
                        .store
                        .record_failure(partition, sequence, &error, outcome)
                        .await
                    {
                        tracing::warn!(%partition, sequence, %store_error, "cannot record failure");
                        inner.pause(STORE_RETRY_DELAY).await;
                    }
                    // Re-read the head: the same event with its new schedule, or the next one
                    // if this one was dead-lettered.
                    continue 'partition;
                }
            }
        }
    }
}
