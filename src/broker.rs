//! The broker's operations, independent of gRPC: validate, assign ids, store, wake the engine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::delivery::{Engine, webhook};
use crate::error::Error;
use crate::model::{
    NewEvent, OnExhausted, Page, PendingDelivery, Published, RetryPolicy, Subscription, now_millis,
};
use crate::store::Store;
use crate::validate;

/// Content type of events published without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// Server-wide limits and defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted payload, in bytes.
    pub max_payload_bytes: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
    /// The policy new subscriptions start from.
    pub default_retry_policy: RetryPolicy,
}

/// A publish request.
#[derive(Debug, Clone, Default)]
pub struct PublishInput {
    /// Topic name.
    pub topic: String,
    /// Body bytes.
    pub payload: Vec<u8>,
    /// Content type; empty means [`DEFAULT_CONTENT_TYPE`].
    pub content_type: String,
    /// Idempotency key; empty means none.
    pub idempotency_key: String,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
}

/// Retry settings as requested; `None` takes the server default.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryPolicyInput {
    /// See [`RetryPolicy::initial_backoff`].
    pub initial_backoff: Option<Duration>,
    /// See [`RetryPolicy::max_backoff`].
    pub max_backoff: Option<Duration>,
    /// See [`RetryPolicy::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`RetryPolicy::request_timeout`].
    pub request_timeout: Option<Duration>,
}

/// A subscribe request.
#[derive(Debug, Clone, Default)]
pub struct SubscribeInput {
    /// Endpoint URL.
    pub endpoint: String,
    /// Topic patterns.
    pub topics: Vec<String>,
    /// Secret; empty means generate one.
    pub secret: String,
    /// Retry settings.
    pub retry_policy: RetryPolicyInput,
    /// Exhaustion behaviour; `None` means dead-letter.
    pub on_exhausted: Option<OnExhausted>,
}

/// The broker service.
pub struct Broker {
    store: Arc<dyn Store>,
    engine: Engine,
    limits: Limits,
}

impl Broker {
    /// Creates the service over a store and a running engine.
    pub fn new(store: Arc<dyn Store>, engine: Engine, limits: Limits) -> Self {
        Broker {
            store,
            engine,
            limits,
        }
    }

    /// Validates and publishes an event; returns once it and its fan-out are durable.
    pub async fn publish(&self, input: PublishInput) -> Result<Published, Error> {
        validate::topic("topic", &input.topic)?;
        if input.payload.len() > self.limits.max_payload_bytes {
            return Err(Error::invalid(
                "payload",
                format!(
                    "{} bytes exceeds the limit of {} bytes",
                    input.payload.len(),
                    self.limits.max_payload_bytes
                ),
            ));
        }
        let content_type = if input.content_type.is_empty() {
            DEFAULT_CONTENT_TYPE.to_string()
        } else {
            input.content_type
        };
        validate::content_type(&content_type)?;
        validate::idempotency_key(&input.idempotency_key)?;
        validate::attributes(&input.attributes)?;
        let event = NewEvent {
            id: new_id("evt"),
            topic: input.topic,
            payload: input.payload,
            content_type,
            idempotency_key: Some(input.idempotency_key).filter(|key| !key.is_empty()),
            attributes: input.attributes,
        };
        // The store call and the wake-up run in their own task: if the client gives up (a
        // deadline, a dropped connection) while the commit is in flight, the commit still
        // completes and its partitions are still woken.
        let store = self.store.clone();
        let engine = self.engine.clone();
        let window = self.limits.idempotency_window;
        tokio::spawn(async move {
            let published = store.publish(&event, window).await?;
            engine.notify(&published.partitions);
            Ok(published)
        })
        .await
        .map_err(|error| Error::Internal(format!("publish task failed: {error}")))?
    }

    /// Validates and creates a subscription. The returned value carries the secret.
    pub async fn subscribe(&self, input: SubscribeInput) -> Result<Subscription, Error> {
        validate::endpoint(&input.endpoint)?;
        validate::patterns(&input.topics)?;
        let secret = if input.secret.is_empty() {
            webhook::generate_secret()
        } else {
            validate::secret(&input.secret)?;
            input.secret
        };
        let defaults = self.limits.default_retry_policy;
        let requested = input.retry_policy;
        let retry_policy = RetryPolicy {
            initial_backoff: requested
                .initial_backoff
                .unwrap_or(defaults.initial_backoff),
            max_backoff: requested.max_backoff.unwrap_or(defaults.max_backoff),
            max_attempts: requested.max_attempts.unwrap_or(defaults.max_attempts),
            request_timeout: requested
                .request_timeout
                .unwrap_or(defaults.request_timeout),
        };
        validate::retry_policy(&retry_policy)?;
        let mut topics = input.topics;
        topics.sort();
        topics.dedup();
        let subscription = Subscription {
            id: new_id("sub"),
            endpoint: input.endpoint,
            topics,
            secret,
            retry_policy,
            on_exhausted: input.on_exhausted.unwrap_or(OnExhausted::DeadLetter),
            created_at: now_millis(),
        };
        self.store.create_subscription(&subscription).await?;
        Ok(subscription)
    }

    /// Returns a subscription, or `NotFound`.
    pub async fn get_subscription(&self, id: &str) -> Result<Subscription, Error> {
        require_id("id", id)?;
        Ok(self.store.get_subscription(id).await?)
    }

    /// Lists subscriptions, paged.
    pub async fn list_subscriptions(
        &self,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<Subscription>, Error> {
        let page_size = validate::page_size(page_size)?;
        let token = Some(page_token).filter(|token| !token.is_empty());
        Ok(self.store.list_subscriptions(page_size, token).await?)
    }

    /// Deletes a subscription; returns the number of pending deliveries dropped.
    pub async fn unsubscribe(&self, id: &str) -> Result<u64, Error> {
        require_id("id", id)?;
        // In its own task, so that a client giving up does not stop it halfway.
        let store = self.store.clone();
        let id = id.to_string();
        tokio::spawn(async move { store.delete_subscription(&id).await })
            .await
            .map_err(|error| Error::Internal(format!("unsubscribe task failed: {error}")))?
            .map_err(Error::from)
    }

    /// Lists a subscription's pending deliveries, paged.
    pub async fn list_pending(
        &self,
        subscription_id: &str,
        topic: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<PendingDelivery>, Error> {
        require_id("subscription_id", subscription_id)?;
        let topic = Some(topic).filter(|topic| !topic.is_empty());
        if let Some(topic) = topic {
            validate::topic("topic", topic)?;
        }
        let page_size = validate::page_size(page_size)?;
        let token = Some(page_token).filter(|token| !token.is_empty());
        Ok(self
            .store
            .list_pending(subscription_id, topic, page_size, token)
            .await?)
    }
}

fn require_id(field: &'static str, id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if id.len() > 64 {
        return Err(Error::NotFound(format!("subscription {id}")));
    }
    Ok(())
}

/// The time part of the last id made by this process.
static LAST_ID_TIME: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A new id `{prefix}_{time:014x}{random:014x}`: unique, and ordered by creation: `time` is the
/// creation time in microseconds since the epoch, bumped past the previous id's so that two ids
/// made by one process in the same microsecond still sort in creation order.
pub fn new_id(prefix: &str) -> String {
    let now = crate::model::now_micros();
    let previous = LAST_ID_TIME
        .fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |last| Some(now.max(last + 1)),
        )
        .expect("the update always succeeds");
    let time = now.max(previous + 1);
    let random: u64 = rand::random::<u64>() & ((1 << 56) - 1);
    format!("{prefix}_{time:014x}{random:014x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sort_in_creation_order_and_start_with_the_creation_time() {
        let before = crate::model::now_micros();
        let ids: Vec<String> = (0..1000).map(|_| new_id("sub")).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "unique and already in creation order");
        for id in &ids {
            assert_eq!(id.len(), 4 + 28);
            let micros = u64::from_str_radix(&id[4..18], 16).unwrap();
            // Bumped past the previous id by at most one microsecond per id.
            assert!(micros >= before && micros <= crate::model::now_micros() + 1000);
        }
    }
}
