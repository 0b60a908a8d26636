//! The broker's operations, independent of gRPC: validate, assign ids, store, wake the engine.

mod operate;
mod update;

pub use operate::{PartitionState, ReplayBound, http_status, partition_state};
pub use update::UpdateInput;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::delivery::Engine;
use crate::delivery::endpoint_policy::{self, AddressRules};
use crate::error::Error;
use crate::model::{
    NewEvent, OnExhausted, Page, PendingDelivery, Published, RetryPolicy, Subscription, now_millis,
};
use crate::store::{DeliveryLog, Store, SubscriptionLimits, SubscriptionStore};
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
    /// Which endpoint addresses Subscribe accepts (deliveries check again at connect time).
    pub endpoint_rules: Arc<AddressRules>,
    /// How many subscriptions Subscribe may create.
    pub subscriptions: SubscriptionLimits,
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
    /// The caller's trace context (from its `traceparent` metadata).
    pub trace: Option<crate::trace::TraceContext>,
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
    /// Limits on how hard the endpoint is driven.
    pub pacing: crate::model::Pacing,
    /// CEL filter; empty for none.
    pub filter: String,
}

/// How long Subscribe waits for an endpoint's name to resolve before accepting it unchecked.
const RESOLVE_BOUND: Duration = Duration::from_secs(2);

/// The broker service.
pub struct Broker {
    subscriptions: Arc<dyn SubscriptionStore>,
    log: Arc<dyn DeliveryLog>,
    engine: Engine,
    limits: Limits,
}

impl Broker {
    /// Creates the service over a store and a running engine.
    pub fn new(store: Arc<dyn Store>, engine: Engine, limits: Limits) -> Self {
        Broker {
            subscriptions: store.clone(),
            log: store,
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
            id: crate::ids::new_id("evt"),
            topic: input.topic,
            payload: input.payload,
            content_type,
            idempotency_key: Some(input.idempotency_key).filter(|key| !key.is_empty()),
            attributes: input.attributes,
            trace: input.trace,
        };
        // The store call and the wake-up run in their own task: if the client gives up (a
        // deadline, a dropped connection) while the commit is in flight, the commit still
        // completes and its partitions are still woken.
        let log = self.log.clone();
        let engine = self.engine.clone();
        let window = self.limits.idempotency_window;
        let span = tracing::debug_span!("publish", topic = %event.topic, event_id = %event.id);
        if let Some(trace) = &event.trace {
            trace.parent(&span);
        }
        let task = async move {
            let published = log.publish(&event, window).await;
            let metrics = engine.metrics();
            match &published {
                Ok(published) if published.duplicate => metrics.publish("duplicate"),
                Ok(_) => metrics.publish("stored"),
                Err(_) => metrics.publish("error"),
            }
            let published = published?;
            engine.notify(&published.partitions);
            Ok(published)
        };
        tokio::spawn(tracing::Instrument::instrument(task, span))
            .await
            .map_err(|error| Error::Internal(format!("publish task failed: {error}")))?
    }

    /// Validates and creates a subscription. The returned value carries the secret.
    pub async fn subscribe(&self, input: SubscribeInput) -> Result<Subscription, Error> {
        validate::endpoint(&input.endpoint)?;
        self.check_endpoint_address(&input.endpoint).await?;
        validate::patterns(&input.topics)?;
        let secret = if input.secret.is_empty() {
            crate::signing::generate_secret()
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
        validate::pacing(&input.pacing)?;
        let filter = validate::filter(&input.filter)?;
        let mut topics = input.topics;
        topics.sort();
        topics.dedup();
        let subscription = Subscription {
            id: crate::ids::new_id("sub"),
            endpoint: input.endpoint,
            topics,
            secret,
            retry_policy,
            on_exhausted: input.on_exhausted.unwrap_or(OnExhausted::DeadLetter),
            created_at: now_millis(),
            control: Default::default(),
            previous_secret: None,
            pacing: input.pacing,
            filter,
        };
        self.subscriptions
            .create_subscription(&subscription, &self.limits.subscriptions)
            .await?;
        Ok(subscription)
    }

    /// Refuses an endpoint whose literal address, or the address its name resolves to now,
    /// the endpoint rules refuse. A name that does not resolve (within a bound) is accepted:
    /// every delivery attempt checks the address it connects to.
    async fn check_endpoint_address(&self, endpoint: &str) -> Result<(), Error> {
        let url = url::Url::parse(endpoint)
            .map_err(|error| Error::invalid("endpoint", error.to_string()))?;
        let Some(host) = url.host() else {
            return Ok(());
        };
        let check = endpoint_policy::check_endpoint(&self.limits.endpoint_rules, &host);
        match tokio::time::timeout(RESOLVE_BOUND, check).await {
            Ok(Err(refused)) => Err(Error::invalid("endpoint", refused.to_string())),
            Ok(Ok(())) | Err(_) => Ok(()),
        }
    }

    /// Returns a subscription, or `NotFound`.
    pub async fn get_subscription(&self, id: &str) -> Result<Subscription, Error> {
        require_id("id", id)?;
        Ok(self.subscriptions.get_subscription(id).await?)
    }

    /// Lists subscriptions, paged.
    pub async fn list_subscriptions(
        &self,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<Subscription>, Error> {
        let page_size = validate::page_size(page_size)?;
        let token = Some(page_token).filter(|token| !token.is_empty());
        Ok(self
            .subscriptions
            .list_subscriptions(page_size, token)
            .await?)
    }

    /// Deletes a subscription; returns the number of pending deliveries dropped. Once it
    /// returns, this instance's partition tasks send the subscription nothing more (an attempt
    /// already in flight may finish): they read it again before their next attempt and stop.
    pub async fn unsubscribe(&self, id: &str) -> Result<u64, Error> {
        require_id("id", id)?;
        // In its own task, so that a client giving up does not stop it halfway.
        let subscriptions = self.subscriptions.clone();
        let engine = self.engine.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let dropped = subscriptions.delete_subscription(&id).await;
            // Told even after an error: the deletion may have committed before it.
            engine.subscription_changed(&id);
            dropped
        })
        .await
        .map_err(|error| Error::Internal(format!("unsubscribe task failed: {error}")))?
        .map_err(Error::from)
    }

    /// Lists a subscription's pending deliveries, paged.
    pub async fn list_pending(
        &self,
        subscription_id: &str,
        topic: &str,
        dead_only: bool,
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
            .log
            .list_pending(subscription_id, topic, dead_only, page_size, token)
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
