//! Partition scheduling. One task per partition with pending work delivers its events strictly
//! in sequence order, one at a time (`partition`); a shared semaphore bounds
//! the HTTP requests in flight over all partitions. A publish wakes the tasks of the partitions
//! it wrote to (no polling); a task with nothing left to deliver waits a moment for more, then
//! exits. On a shared store a task first claims its partition's lease
//! ([`crate::delivery::lease`]), so one instance at a time delivers it; a task that stops with
//! work left leaves the lease expired, where every instance's periodic rescan finds it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::delivery::endpoint_policy::AddressRules;
use crate::delivery::lease::Lease;
use crate::delivery::partition::{PartitionWorker, Stop};
use crate::delivery::webhook::{HttpTransport, Transport};
use crate::metrics::Metrics;
use crate::model::{PartitionKey, Subscription, now_millis};
use crate::shutdown::Shutdown;
use crate::store::{DeliveryLog, PartitionLeases, Store, StoreError, SubscriptionStore};

/// Pause before retrying a subscription read that failed.
const STORE_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most HTTP deliveries in flight at once.
    pub concurrency: usize,
    /// How long a partition claim lasts; it is renewed every third of that while in use.
    pub lease: Duration,
    /// How often to look in the store for partitions with pending work that this instance
    /// was not told about (left by another instance). `None` for a store only this process
    /// writes.
    pub rescan: Option<Duration>,
    /// Which endpoint addresses deliveries may connect to.
    pub endpoint_rules: Arc<AddressRules>,
    /// Where attempts, deliveries and active partitions are counted.
    pub metrics: Arc<Metrics>,
    /// Disable a subscription whose attempts have all failed for this long; `None`: never.
    pub auto_disable_after: Option<Duration>,
}

/// Tells a partition task that new deliveries were stored.
#[derive(Default)]
pub(crate) struct Signal {
    /// Set on every notification; cleared by the task when it decides to exit.
    new_work: AtomicBool,
    /// Wakes a lingering task (keeps one permit if it is not waiting yet).
    pub(crate) wake: tokio::sync::Notify,
}

impl Signal {
    /// Marks new work and wakes the task (or leaves it a permit if it is not waiting yet).
    fn wake(&self) {
        self.new_work.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// Handle to the delivery engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// What every partition task shares.
pub(crate) struct Inner {
    /// Where each partition's subscription (endpoint, secret, policy) is read.
    pub(crate) subscriptions: Arc<dyn SubscriptionStore>,
    /// Deliveries and their outcomes.
    pub(crate) log: Arc<dyn DeliveryLog>,
    /// The store's partition leases; `None` on a store that one process owns.
    pub(crate) leases: Option<Arc<dyn PartitionLeases>>,
    pub(crate) config: EngineConfig,
    /// How attempts are sent (HTTP, or a script in tests).
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) permits: Semaphore,
    /// Partitions with a running task, each with its wake-up signal.
    partitions: Mutex<HashMap<PartitionKey, Arc<Signal>>>,
    /// Moves each time a subscription is changed through this instance, so that its running
    /// partition tasks read it again before their next attempt.
    pub(crate) changes: AtomicU64,
    /// Subscriptions whose attempts have all failed lately: since when, and how many.
    failing: Mutex<HashMap<String, (u64, u64)>>,
    /// The limiters of subscriptions with pacing limits.
    pub(crate) pacers: crate::delivery::pacing::Pacers,
    tasks: TaskTracker,
    pub(crate) shutdown: Shutdown,
}

impl Engine {
    /// Creates an engine; call [`Engine::resume`] to pick up work stored before a restart.
    pub fn new(store: Arc<dyn Store>, config: EngineConfig, shutdown: Shutdown) -> Self {
        let transport = Arc::new(HttpTransport::new(
            config.endpoint_rules.clone(),
            config.concurrency,
        ));
        Engine::with_transport(store, config, shutdown, transport)
    }

    /// An engine that sends its attempts through `transport`.
    pub fn with_transport(
        store: Arc<dyn Store>,
        config: EngineConfig,
        shutdown: Shutdown,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Engine {
            inner: Arc::new(Inner {
                subscriptions: store.clone(),
                log: store.clone(),
                leases: store.leases(),
                transport,
                permits: Semaphore::new(config.concurrency),
                config,
                partitions: Mutex::new(HashMap::new()),
                changes: AtomicU64::new(0),
                failing: Mutex::new(HashMap::new()),
                pacers: Default::default(),
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
        let partitions = self.inner.log.pending_partitions().await?;
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
                    signal.wake();
                }
                None => {
                    let new_work = Arc::new(Signal::default());
                    running.insert(partition.clone(), new_work.clone());
                    self.inner.config.metrics.partitions_active.inc();
                    let inner = self.inner.clone();
                    let partition = partition.clone();
                    self.inner
                        .tasks
                        .spawn(run_partition(inner, partition, new_work));
                }
            }
        }
    }

    /// Tells the engine that a subscription changed (paused, resumed, updated): its running
    /// partition tasks read it again before their next attempt, and those waiting (paused,
    /// or for a backoff) wake to do so.
    pub fn subscription_changed(&self, subscription_id: &str) {
        self.inner.changes.fetch_add(1, Ordering::SeqCst);
        // A changed subscription (a new endpoint, a resume) starts its failure run afresh.
        self.inner
            .failing
            .lock()
            .expect("failing lock")
            .remove(subscription_id);
        let running = self.inner.partitions.lock().expect("partition map lock");
        for (partition, signal) in running.iter() {
            if partition.subscription_id == subscription_id {
                signal.wake();
            }
        }
    }

    /// The state the partition tasks share (tests drive it directly).
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.config.metrics
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
    /// Notes an attempt's outcome for auto-disable. Returns the start of the run of failures
    /// and its length when the subscription has failed for longer than allowed.
    pub(crate) fn endpoint_outcome(
        &self,
        subscription_id: &str,
        succeeded: bool,
        now: u64,
    ) -> Option<(u64, u64)> {
        let after = self.config.auto_disable_after?;
        let mut failing = self.failing.lock().expect("failing lock");
        if succeeded {
            failing.remove(subscription_id);
            return None;
        }
        let entry = failing
            .entry(subscription_id.to_string())
            .or_insert((now, 0));
        entry.1 += 1;
        let (since, count) = *entry;
        (now.saturating_sub(since) >= after.as_millis() as u64).then_some((since, count))
    }

    /// Disables a subscription whose endpoint kept failing (unless it is paused or disabled
    /// already), in a task of its own (on DynamoDB the change takes a moment to settle), then
    /// has its partitions read it again.
    pub(crate) fn disable(
        self: &Arc<Self>,
        subscription_id: &str,
        since: u64,
        failures: u64,
        error: &str,
    ) {
        let inner = self.clone();
        let subscription_id = subscription_id.to_string();
        let error = error.to_string();
        self.tasks.spawn(async move {
            inner
                .disable_now(&subscription_id, since, failures, &error)
                .await
        });
    }

    async fn disable_now(&self, subscription_id: &str, since: u64, failures: u64, error: &str) {
        let reason = format!(
            "disabled by Herald: every attempt failed for {} ({failures} attempts; the last: {error})",
            crate::admin::human_age(now_millis().saturating_sub(since))
        );
        let update: crate::store::SubscriptionUpdate = Arc::new(move |subscription| {
            let control = &mut subscription.control;
            if control.state == crate::model::SubscriptionState::Active {
                control.state = crate::model::SubscriptionState::Disabled;
                control.reason = reason.clone();
                control.since = now_millis();
            }
            Ok(())
        });
        match self
            .subscriptions
            .update_subscription(subscription_id, update)
            .await
        {
            Ok(updated) => {
                tracing::warn!(subscription = subscription_id, reason = %updated.subscription.control.reason, "subscription disabled");
                self.failing
                    .lock()
                    .expect("failing lock")
                    .remove(subscription_id);
                self.changes.fetch_add(1, Ordering::SeqCst);
            }
            Err(error) => {
                tracing::warn!(subscription = subscription_id, %error, "cannot disable the subscription yet")
            }
        }
    }

    /// Removes a partition whose task found no work, unless new work arrived meanwhile.
    /// Returns true if the task should exit.
    pub(crate) fn retire(&self, partition: &PartitionKey, signal: &Signal) -> bool {
        let mut running = self.partitions.lock().expect("partition map lock");
        if signal.new_work.swap(false, Ordering::SeqCst) && !self.shutdown.is_fired() {
            return false;
        }
        if running.remove(partition).is_some() {
            self.config.metrics.partitions_active.dec();
        }
        true
    }

    /// Drops a stopped partition task from the map.
    fn forget(&self, partition: &PartitionKey) {
        let removed = self
            .partitions
            .lock()
            .expect("partition map lock")
            .remove(partition);
        if removed.is_some() {
            self.config.metrics.partitions_active.dec();
        }
    }

    /// Drops a task that stopped because its subscription no longer sends to the partition,
    /// unless it was woken meanwhile (the topic added back, or the subscription recreated,
    /// and a publish): then a new task takes the partition, since nothing else would look at
    /// it before the next publish on it. Under the map's lock, so a wake-up either reaches
    /// the new task or starts its own.
    fn forget_or_restart(self: &Arc<Self>, partition: &PartitionKey, signal: &Signal) {
        let mut running = self.partitions.lock().expect("partition map lock");
        if signal.new_work.swap(false, Ordering::SeqCst) && !self.shutdown.is_fired() {
            let new_work = Arc::new(Signal::default());
            running.insert(partition.clone(), new_work.clone());
            self.tasks
                .spawn(run_partition(self.clone(), partition.clone(), new_work));
            return;
        }
        if running.remove(partition).is_some() {
            self.config.metrics.partitions_active.dec();
        }
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

/// Claims the partition's lease, retrying briefly while another instance holds it (it may be
/// about to let go). `None` if it was not granted: the holder delivers what is pending, and if
/// it stops with work left its expired lease is found by the rescan.
async fn claim(
    inner: &Inner,
    leases: &dyn PartitionLeases,
    partition: &PartitionKey,
) -> Option<Lease> {
    let mut pause = Duration::from_millis(20);
    let mut waited = Duration::ZERO;
    while waited < inner.config.lease {
        match Lease::claim(leases, partition, inner.config.lease).await {
            Ok(Some(lease)) => return Some(lease),
            Ok(None) => {}
            Err(error) => tracing::warn!(%partition, %error, "cannot claim partition"),
        }
        if !inner.pause(pause).await {
            return None;
        }
        waited += pause;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    None
}

/// Reads the partition's subscription and signing key; `None` if it is gone or unusable, or
/// on shutdown. Subscriptions never change, so this is done once per task.
async fn load_subscription(
    inner: &Inner,
    partition: &PartitionKey,
) -> Option<(Subscription, Vec<u8>)> {
    loop {
        match inner
            .subscriptions
            .get_subscription(&partition.subscription_id)
            .await
        {
            Ok(subscription) => {
                return match crate::signing::decode_secret(&subscription.secret) {
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

async fn run_partition(inner: Arc<Inner>, partition: PartitionKey, signal: Arc<Signal>) {
    let leases = inner.leases.as_deref();
    let lease = match leases {
        Some(leases) => match claim(&inner, leases, &partition).await {
            Some(lease) => Some(lease),
            None => {
                inner.forget(&partition);
                return;
            }
        },
        None => None,
    };
    let held = lease.is_some();
    if held {
        inner.config.metrics.leases_held.inc();
    }
    // Taken before the read: a change committed while it runs is read again before the first
    // attempt.
    let changes = inner.changes.load(Ordering::SeqCst);
    let (stop, lease) = match load_subscription(&inner, &partition).await {
        Some(subscription) => {
            PartitionWorker::new(&inner, &partition, &signal, lease, subscription, changes)
                .run()
                .await
        }
        None if inner.shutdown.is_fired() => (Stop::Shutdown, lease),
        None => (Stop::SubscriptionGone, lease),
    };
    match stop {
        Stop::Idle => {}
        Stop::SubscriptionGone | Stop::TopicRemoved => inner.forget_or_restart(&partition, &signal),
        _ => inner.forget(&partition),
    }
    if let (Some(lease), Some(leases)) = (lease, leases)
        && stop != Stop::Lease(crate::delivery::lease::LeaseEnded::Lost)
    {
        lease.release(leases, stop.hands_over()).await;
    }
    if held {
        inner.config.metrics.leases_held.dec();
    }
}
