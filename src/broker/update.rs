//! Changing a subscription in place: UpdateSubscription (a field mask) and RotateSecret.

use std::sync::Arc;
use std::time::Duration;

use super::{Broker, RetryPolicyInput, require_id};
use crate::error::Error;
use crate::model::{OnExhausted, PreviousSecret, RetryPolicy, Subscription, now_millis};
use crate::store::records::subscription_etag;
use crate::store::{StoreError, SubscriptionUpdate};
use crate::validate;

/// How long a rotated-out secret keeps signing unless told otherwise, and at most.
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// An UpdateSubscription request: the fields `mask` names are taken from the others.
#[derive(Debug, Clone, Default)]
pub struct UpdateInput {
    /// The subscription.
    pub id: String,
    /// Field paths to change.
    pub mask: Vec<String>,
    /// New endpoint (`endpoint`).
    pub endpoint: String,
    /// New retry settings (`retry_policy` and its fields).
    pub retry_policy: RetryPolicyInput,
    /// New exhaustion policy (`on_exhausted`); `None` means the default.
    pub on_exhausted: Option<OnExhausted>,
    /// New limits (`max_requests_per_second`, `max_in_flight`).
    pub pacing: crate::model::Pacing,
    /// New topic patterns (`topics`).
    pub topics: Vec<String>,
    /// New filter (`filter`); empty removes it.
    pub filter: String,
    /// Optional precondition.
    pub etag: String,
}

/// What UpdateSubscription did.
#[derive(Debug, Clone)]
pub struct UpdateOutcome {
    /// The subscription after the update.
    pub subscription: Subscription,
    /// With `topics` in the mask: the pending deliveries dropped with the topics no longer
    /// matched.
    pub dropped_deliveries: Option<u64>,
}

/// The mask paths UpdateSubscription takes.
const PATHS: [&str; 11] = [
    "endpoint",
    "retry_policy",
    "retry_policy.initial_backoff",
    "retry_policy.max_backoff",
    "retry_policy.max_attempts",
    "retry_policy.request_timeout",
    "on_exhausted",
    "max_requests_per_second",
    "max_in_flight",
    "topics",
    "filter",
];

/// Refuses the update if `etag` is given and is not the subscription's current one.
fn check_etag(current: &Subscription, etag: &str) -> Result<(), StoreError> {
    if etag.is_empty() {
        return Ok(());
    }
    let now = subscription_etag(current);
    if now != etag {
        return Err(StoreError::Contention(format!(
            "etag mismatch: subscription {} changed since it was read (etag {etag}, now {now}); \
             read it again and retry",
            current.id
        )));
    }
    Ok(())
}

impl Broker {
    /// Changes the fields of a subscription that the mask names.
    pub async fn update_subscription(&self, input: UpdateInput) -> Result<UpdateOutcome, Error> {
        require_id("subscription.id", &input.id)?;
        if input.mask.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                format!("name the fields to change: {}", PATHS.join(", ")),
            ));
        }
        for path in &input.mask {
            if !PATHS.contains(&path.as_str()) {
                return Err(Error::invalid(
                    "update_mask",
                    format!("unknown field `{path}`; fields: {}", PATHS.join(", ")),
                ));
            }
        }
        let has = |path: &str| input.mask.iter().any(|named| named == path);
        if has("endpoint") {
            validate::endpoint(&input.endpoint)?;
            self.check_endpoint_address(&input.endpoint).await?;
        }
        // The new policy is made from the current one and checked here, where a bad value
        // can be named; the update then applies it only if the policy did not change since.
        let current = self.subscriptions.get_subscription(&input.id).await?;
        let policy = merged_policy(
            current.retry_policy,
            self.limits.default_retry_policy,
            input.retry_policy,
            &input.mask,
        );
        validate::retry_policy(&policy)?;
        let read_policy = current.retry_policy;
        let policy = input
            .mask
            .iter()
            .any(|path| path.starts_with("retry_policy"))
            .then_some(policy);
        validate::pacing(&input.pacing)?;
        let set_rate =
            has("max_requests_per_second").then_some(input.pacing.max_requests_per_second);
        let set_in_flight = has("max_in_flight").then_some(input.pacing.max_in_flight);
        let set_endpoint = has("endpoint").then(|| input.endpoint.clone());
        let set_topics = if has("topics") {
            validate::patterns(&input.topics)?;
            let mut topics = input.topics.clone();
            topics.sort();
            topics.dedup();
            Some(topics)
        } else {
            None
        };
        let set_filter = if has("filter") {
            Some(validate::filter(&input.filter)?)
        } else {
            None
        };
        let set_on_exhausted =
            has("on_exhausted").then(|| input.on_exhausted.unwrap_or(OnExhausted::DeadLetter));
        let etag = input.etag.clone();
        let id = input.id.clone();
        let update: SubscriptionUpdate = Arc::new(move |subscription| {
            check_etag(subscription, &etag)?;
            if let Some(policy) = policy {
                // Made from the policy read before: refused if that changed meanwhile.
                if !same_policy(&subscription.retry_policy, &read_policy) {
                    return Err(StoreError::Contention(format!(
                        "subscription {id} changed while it was being updated; retry"
                    )));
                }
                subscription.retry_policy = policy;
            }
            if let Some(endpoint) = &set_endpoint {
                subscription.endpoint = endpoint.clone();
            }
            if let Some(on_exhausted) = set_on_exhausted {
                subscription.on_exhausted = on_exhausted;
            }
            if let Some(rate) = set_rate {
                subscription.pacing.max_requests_per_second = rate;
            }
            if let Some(in_flight) = set_in_flight {
                subscription.pacing.max_in_flight = in_flight;
            }
            if let Some(topics) = &set_topics {
                subscription.topics = topics.clone();
            }
            if let Some(filter) = &set_filter {
                subscription.filter = filter.clone();
            }
            Ok(())
        });
        let updated = self.change_subscription(&input.id, update).await?;
        if has("endpoint") {
            // Heads waiting out a backoff against the old endpoint try the new one now.
            self.retry_waiting_heads(&input.id).await;
        }
        Ok(UpdateOutcome {
            subscription: updated.subscription,
            dropped_deliveries: has("topics").then_some(updated.dropped),
        })
    }

    /// Makes due now every head of the subscription that failed before and waits for its
    /// next attempt. Best effort: a partition it cannot reach keeps its schedule.
    async fn retry_waiting_heads(&self, id: &str) {
        let mut token = String::new();
        loop {
            let Ok((_, page)) = self.subscription_status(id, 1000, &token).await else {
                return;
            };
            for status in &page.items {
                if status
                    .head
                    .as_ref()
                    .is_some_and(|head| head.state.attempts > 0)
                {
                    if let Err(error) = self.log.retry_now(&status.partition).await {
                        tracing::warn!(partition = %status.partition, %error, "cannot make the head due after an endpoint change");
                    }
                    self.engine.notify(std::slice::from_ref(&status.partition));
                }
            }
            match page.next_token {
                Some(next) => token = next,
                None => return,
            }
        }
    }

    /// Replaces the signing secret; returns the subscription and the new secret.
    pub async fn rotate_secret(
        &self,
        id: &str,
        secret: &str,
        grace: Option<Duration>,
        etag: &str,
    ) -> Result<(Subscription, String), Error> {
        require_id("subscription_id", id)?;
        let secret = if secret.is_empty() {
            crate::signing::generate_secret()
        } else {
            validate::secret(secret)?;
            secret.to_string()
        };
        let grace = grace.unwrap_or(DEFAULT_GRACE);
        if grace > MAX_GRACE {
            return Err(Error::invalid("grace", "at most 30 days"));
        }
        let new = secret.clone();
        let etag = etag.to_string();
        let update: SubscriptionUpdate = Arc::new(move |subscription| {
            check_etag(subscription, &etag)?;
            if subscription.secret == new {
                // A retried call: already done.
                return Ok(());
            }
            let now = now_millis();
            if !grace.is_zero()
                && let Some(previous) = subscription
                    .previous_secret
                    .as_ref()
                    .filter(|previous| previous.until > now)
            {
                return Err(StoreError::FailedPrecondition(format!(
                    "subscription {} still signs with its previous secret for {} s: rotating \
                     again now would drop it while receivers may use it; wait, or rotate with \
                     grace 0s to drop both old secrets at once",
                    subscription.id,
                    (previous.until - now).div_ceil(1000)
                )));
            }
            let old = std::mem::replace(&mut subscription.secret, new.clone());
            // With no grace it ends at once (kept expired, so the etag still changes).
            subscription.previous_secret = Some(PreviousSecret {
                secret: old,
                until: now + grace.as_millis() as u64,
            });
            Ok(())
        });
        let subscription = self.change_control(id, update).await?;
        Ok((subscription, secret))
    }
}

/// True if two policies are the same as stored (durations in whole milliseconds).
fn same_policy(a: &RetryPolicy, b: &RetryPolicy) -> bool {
    let millis = |policy: &RetryPolicy| {
        (
            policy.initial_backoff.as_millis(),
            policy.max_backoff.as_millis(),
            policy.max_attempts,
            policy.request_timeout.as_millis(),
        )
    };
    millis(a) == millis(b)
}

/// The retry policy after an update: `retry_policy` in the mask replaces it whole (unset
/// fields take the defaults), a `retry_policy.<field>` path replaces that field.
fn merged_policy(
    current: RetryPolicy,
    defaults: RetryPolicy,
    requested: RetryPolicyInput,
    mask: &[String],
) -> RetryPolicy {
    let whole = mask.iter().any(|path| path == "retry_policy");
    let named = |field: &str| {
        whole
            || mask
                .iter()
                .any(|path| path.strip_prefix("retry_policy.") == Some(field))
    };
    RetryPolicy {
        initial_backoff: if named("initial_backoff") {
            requested
                .initial_backoff
                .unwrap_or(defaults.initial_backoff)
        } else {
            current.initial_backoff
        },
        max_backoff: if named("max_backoff") {
            requested.max_backoff.unwrap_or(defaults.max_backoff)
        } else {
            current.max_backoff
        },
        max_attempts: if named("max_attempts") {
            requested.max_attempts.unwrap_or(defaults.max_attempts)
        } else {
            current.max_attempts
        },
        request_timeout: if named("request_timeout") {
            requested
                .request_timeout
                .unwrap_or(defaults.request_timeout)
        } else {
            current.request_timeout
        },
    }
}
