//! A store wrapper that fails chosen write calls, as a store outage between a delivery and its
//! bookkeeping would. Every call is passed to the real store unless a fault is armed for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use herald::model::{
    FailureOutcome, NewEvent, Page, PartitionKey, PartitionStatus, PendingDelivery, Published,
    Subscription,
};
use herald::store::{
    DeliveryLog, LeaseToken, PartitionLeases, Store, StoreError, SubscriptionLimits,
    SubscriptionStore, SubscriptionUpdate,
};

/// Wraps a real store; `fail_completions(n)` / `fail_failures(n)` make the next `n` calls of
/// `complete_delivery` or `complete_deliveries` / `record_failure` fail with `Unavailable` without reaching the store
/// (`fail_subscription_reads(n)` the same for `get_subscription`);
/// `delay_after_publish(d)` makes every publish return `d` after its commit (a client deadline
/// shorter than that then always fires after the commit).
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    publish_delay_millis: AtomicU32,
    completions_to_fail: AtomicU32,
    failures_to_fail: AtomicU32,
    subscription_reads_to_fail: AtomicU32,
    /// Calls refused so far, per method.
    pub refused_completions: AtomicU32,
    pub refused_failures: AtomicU32,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            publish_delay_millis: AtomicU32::new(0),
            completions_to_fail: AtomicU32::new(0),
            failures_to_fail: AtomicU32::new(0),
            subscription_reads_to_fail: AtomicU32::new(0),
            refused_completions: AtomicU32::new(0),
            refused_failures: AtomicU32::new(0),
        })
    }

    pub fn delay_after_publish(&self, delay: Duration) {
        self.publish_delay_millis
            .store(delay.as_millis() as u32, Ordering::SeqCst);
    }

    pub fn fail_completions(&self, count: u32) {
        self.completions_to_fail.store(count, Ordering::SeqCst);
    }

    pub fn fail_failures(&self, count: u32) {
        self.failures_to_fail.store(count, Ordering::SeqCst);
    }

    /// The next `count` reads of one subscription fail with `Unavailable`, as while the
    /// subscription set cannot be loaded.
    pub fn fail_subscription_reads(&self, count: u32) {
        self.subscription_reads_to_fail
            .store(count, Ordering::SeqCst);
    }
}

/// Takes one armed fault, if any.
fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
            left.checked_sub(1)
        })
        .is_ok()
}

fn injected() -> StoreError {
    StoreError::Unavailable("injected store fault".into())
}

#[async_trait]
impl SubscriptionStore for FaultyStore {
    async fn create_subscription(
        &self,
        subscription: &Subscription,
        limits: &SubscriptionLimits,
    ) -> Result<(), StoreError> {
        self.inner.create_subscription(subscription, limits).await
    }

    async fn update_subscription(
        &self,
        id: &str,
        update: SubscriptionUpdate,
    ) -> Result<herald::store::Updated, StoreError> {
        self.inner.update_subscription(id, update).await
    }

    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        if take(&self.subscription_reads_to_fail) {
            return Err(injected());
        }
        self.inner.get_subscription(id).await
    }

    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError> {
        self.inner.list_subscriptions(page_size, page_token).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError> {
        self.inner.delete_subscription(id).await
    }
}

#[async_trait]
impl DeliveryLog for FaultyStore {
    async fn publish(
        &self,
        event: &NewEvent,
        idempotency_window: Duration,
    ) -> Result<Published, StoreError> {
        let published = self.inner.publish(event, idempotency_window).await;
        let delay = self.publish_delay_millis.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
        published
    }

    async fn partition_status(
        &self,
        subscription_id: &str,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PartitionStatus>, StoreError> {
        self.inner
            .partition_status(subscription_id, page_size, page_token)
            .await
    }

    async fn retry_now(&self, partition: &PartitionKey) -> Result<Option<u64>, StoreError> {
        self.inner.retry_now(partition).await
    }

    async fn skip_head(&self, partition: &PartitionKey, sequence: u64) -> Result<(), StoreError> {
        self.inner.skip_head(partition, sequence).await
    }

    async fn next_deliveries(
        &self,
        partition: &PartitionKey,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        self.inner.next_deliveries(partition, limit).await
    }

    async fn complete_delivery(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        if take(&self.completions_to_fail) {
            self.refused_completions.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        self.inner
            .complete_delivery(partition, sequence, fence)
            .await
    }

    async fn complete_deliveries(
        &self,
        partition: &PartitionKey,
        sequences: &[u64],
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        if take(&self.completions_to_fail) {
            self.refused_completions.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        self.inner
            .complete_deliveries(partition, sequences, fence)
            .await
    }

    async fn record_failure(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        attempt: u32,
        error: &str,
        outcome: FailureOutcome,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        if take(&self.failures_to_fail) {
            self.refused_failures.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        self.inner
            .record_failure(partition, sequence, attempt, error, outcome, fence)
            .await
    }

    async fn list_pending(
        &self,
        subscription_id: &str,
        topic: Option<&str>,
        dead_only: bool,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PendingDelivery>, StoreError> {
        self.inner
            .list_pending(subscription_id, topic, dead_only, page_size, page_token)
            .await
    }

    async fn redrive(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        self.inner.redrive(partition, sequences).await
    }

    async fn purge(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        self.inner.purge(partition, sequences).await
    }

    async fn replay(
        &self,
        partition: &PartitionKey,
        range: &herald::model::ReplayRange,
    ) -> Result<herald::model::Replayed, StoreError> {
        self.inner.replay(partition, range).await
    }

    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError> {
        self.inner.pending_partitions().await
    }
}

impl Store for FaultyStore {
    fn leases(self: Arc<Self>) -> Option<Arc<dyn PartitionLeases>> {
        self.inner.clone().leases()
    }

    fn health(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.inner.health()
    }

    fn request_counts(&self) -> Option<Arc<herald::store::dynamodb::RequestCounts>> {
        self.inner.request_counts()
    }
}
