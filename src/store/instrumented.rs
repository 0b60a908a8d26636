//! A store that times every call of the store it wraps and counts its errors, by operation,
//! into the server's metrics (`herald_store_calls_total`, `herald_store_errors_total`,
//! `herald_store_call_duration_seconds`): one wrapper for every backend, so the backends stay
//! free of metrics code.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::{
    FailureOutcome, NewEvent, Page, PartitionKey, PartitionStatus, PendingDelivery, Published,
    ReplayRange, Replayed, Subscription,
};
use crate::store::{
    DeliveryLog, LeaseToken, PartitionLeases, Store, StoreError, SubscriptionLimits,
    SubscriptionStore, SubscriptionUpdate, dynamodb::RequestCounts,
};

/// `inner`, timed.
pub struct Instrumented {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Instrumented {
    /// Wraps `inner`; its calls are counted in `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Instrumented { inner, metrics }
    }
}

/// Runs a store call and records its duration and outcome under `operation`.
async fn timed<T>(
    metrics: &Metrics,
    operation: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    use tracing::Instrument;
    let started = Instant::now();
    let result = call
        .instrument(tracing::debug_span!("store", operation))
        .await;
    metrics.store_call(operation, started.elapsed(), result.as_ref().err());
    result
}

#[async_trait]
impl SubscriptionStore for Instrumented {
    async fn create_subscription(
        &self,
        subscription: &Subscription,
        limits: &SubscriptionLimits,
    ) -> Result<(), StoreError> {
        timed(
            &self.metrics,
            "create_subscription",
            self.inner.create_subscription(subscription, limits),
        )
        .await
    }

    async fn update_subscription(
        &self,
        id: &str,
        update: SubscriptionUpdate,
    ) -> Result<crate::store::Updated, StoreError> {
        timed(
            &self.metrics,
            "update_subscription",
            self.inner.update_subscription(id, update),
        )
        .await
    }

    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        timed(
            &self.metrics,
            "get_subscription",
            self.inner.get_subscription(id),
        )
        .await
    }

    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError> {
        timed(
            &self.metrics,
            "list_subscriptions",
            self.inner.list_subscriptions(page_size, page_token),
        )
        .await
    }

    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError> {
        timed(
            &self.metrics,
            "delete_subscription",
            self.inner.delete_subscription(id),
        )
        .await
    }
}

#[async_trait]
impl DeliveryLog for Instrumented {
    async fn publish(
        &self,
        event: &NewEvent,
        idempotency_window: Duration,
    ) -> Result<Published, StoreError> {
        timed(
            &self.metrics,
            "publish",
            self.inner.publish(event, idempotency_window),
        )
        .await
    }

    async fn next_deliveries(
        &self,
        partition: &PartitionKey,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        timed(
            &self.metrics,
            "next_deliveries",
            self.inner.next_deliveries(partition, limit),
        )
        .await
    }

    async fn complete_delivery(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        timed(
            &self.metrics,
            "complete_delivery",
            self.inner.complete_delivery(partition, sequence, fence),
        )
        .await
    }

    async fn complete_deliveries(
        &self,
        partition: &PartitionKey,
        sequences: &[u64],
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        timed(
            &self.metrics,
            "complete_deliveries",
            self.inner.complete_deliveries(partition, sequences, fence),
        )
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
        timed(
            &self.metrics,
            "record_failure",
            self.inner
                .record_failure(partition, sequence, attempt, error, outcome, fence),
        )
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
        timed(
            &self.metrics,
            "list_pending",
            self.inner
                .list_pending(subscription_id, topic, dead_only, page_size, page_token),
        )
        .await
    }

    async fn partition_status(
        &self,
        subscription_id: &str,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PartitionStatus>, StoreError> {
        timed(
            &self.metrics,
            "partition_status",
            self.inner
                .partition_status(subscription_id, page_size, page_token),
        )
        .await
    }

    async fn retry_now(&self, partition: &PartitionKey) -> Result<Option<u64>, StoreError> {
        timed(&self.metrics, "retry_now", self.inner.retry_now(partition)).await
    }

    async fn skip_head(&self, partition: &PartitionKey, sequence: u64) -> Result<(), StoreError> {
        timed(
            &self.metrics,
            "skip_head",
            self.inner.skip_head(partition, sequence),
        )
        .await
    }

    async fn redrive(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        timed(
            &self.metrics,
            "redrive",
            self.inner.redrive(partition, sequences),
        )
        .await
    }

    async fn purge(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        timed(
            &self.metrics,
            "purge",
            self.inner.purge(partition, sequences),
        )
        .await
    }

    async fn replay(
        &self,
        partition: &PartitionKey,
        range: &ReplayRange,
    ) -> Result<Replayed, StoreError> {
        timed(&self.metrics, "replay", self.inner.replay(partition, range)).await
    }

    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError> {
        timed(
            &self.metrics,
            "pending_partitions",
            self.inner.pending_partitions(),
        )
        .await
    }
}

impl Store for Instrumented {
    fn leases(self: Arc<Self>) -> Option<Arc<dyn PartitionLeases>> {
        let leases = self.inner.clone().leases()?;
        Some(Arc::new(InstrumentedLeases {
            inner: leases,
            metrics: self.metrics.clone(),
        }))
    }

    fn health(&self) -> Option<watch::Receiver<bool>> {
        self.inner.health()
    }

    fn request_counts(&self) -> Option<Arc<RequestCounts>> {
        self.inner.request_counts()
    }
}

/// The wrapped store's leases, timed.
struct InstrumentedLeases {
    inner: Arc<dyn PartitionLeases>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl PartitionLeases for InstrumentedLeases {
    async fn claim(
        &self,
        partition: &PartitionKey,
        duration: Duration,
    ) -> Result<Option<LeaseToken>, StoreError> {
        timed(
            &self.metrics,
            "claim_lease",
            self.inner.claim(partition, duration),
        )
        .await
    }

    async fn renew(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        timed(
            &self.metrics,
            "renew_lease",
            self.inner.renew(partition, token, duration),
        )
        .await
    }

    fn extended_at(&self, token: &LeaseToken) -> Option<Instant> {
        self.inner.extended_at(token)
    }

    async fn release(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        handover: bool,
    ) -> Result<(), StoreError> {
        timed(
            &self.metrics,
            "release_lease",
            self.inner.release(partition, token, handover),
        )
        .await
    }
}
