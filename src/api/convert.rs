//! Conversions between proto messages and domain types.

use crate::trace::TraceContext;
use std::time::Duration;

use crate::broker::{
    PartitionState, PublishInput, ReplayBound, RetryPolicyInput, SubscribeInput, UpdateInput,
    http_status, partition_state,
};
use crate::error::Error;
use crate::model::{
    OnExhausted, PartitionStatus, PendingDelivery, Published, RetryPolicy, Subscription,
    SubscriptionState, UnixMillis,
};
use crate::proto;

pub fn publish_input(request: tonic::Request<proto::PublishRequest>) -> PublishInput {
    let header = |name: &str| {
        request
            .metadata()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    let trace = TraceContext::from_headers(
        header("traceparent").as_deref(),
        header("tracestate").as_deref(),
    );
    let request = request.into_inner();
    PublishInput {
        topic: request.topic,
        payload: request.payload,
        content_type: request.content_type,
        idempotency_key: request.idempotency_key,
        attributes: request.attributes.into_iter().collect(),
        trace,
    }
}

pub fn publish_response(published: Published) -> proto::PublishResponse {
    proto::PublishResponse {
        event_id: published.event_id,
        sequence: published.sequence,
        published_at: Some(timestamp(published.published_at)),
        subscription_count: published.subscription_count,
        duplicate: published.duplicate,
    }
}

pub fn subscribe_input(request: proto::SubscribeRequest) -> Result<SubscribeInput, Error> {
    let policy = request.retry_policy.unwrap_or_default();
    let on_exhausted = match proto::OnExhausted::try_from(request.on_exhausted) {
        Ok(proto::OnExhausted::Unspecified) => None,
        Ok(proto::OnExhausted::DeadLetter) => Some(OnExhausted::DeadLetter),
        Ok(proto::OnExhausted::Block) => Some(OnExhausted::Block),
        Err(_) => {
            return Err(Error::invalid(
                "on_exhausted",
                format!("unknown value {}", request.on_exhausted),
            ));
        }
    };
    Ok(SubscribeInput {
        endpoint: request.endpoint,
        topics: request.topics,
        secret: request.secret,
        retry_policy: RetryPolicyInput {
            initial_backoff: duration("retry_policy.initial_backoff", policy.initial_backoff)?,
            max_backoff: duration("retry_policy.max_backoff", policy.max_backoff)?,
            max_attempts: Some(policy.max_attempts).filter(|attempts| *attempts != 0),
            request_timeout: duration("retry_policy.request_timeout", policy.request_timeout)?,
        },
        on_exhausted,
        pacing: crate::model::Pacing {
            max_requests_per_second: request.max_requests_per_second,
            max_in_flight: request.max_in_flight,
        },
        filter: request.filter,
    })
}

/// An UpdateSubscription request as the broker takes it.
pub fn update_input(request: proto::UpdateSubscriptionRequest) -> Result<UpdateInput, Error> {
    let subscription = request
        .subscription
        .ok_or_else(|| Error::invalid("subscription", "required: its id and the new fields"))?;
    let mask = request
        .update_mask
        .map(|mask| mask.paths)
        .unwrap_or_default();
    let fields = subscribe_input(proto::SubscribeRequest {
        endpoint: subscription.endpoint,
        topics: Vec::new(),
        secret: String::new(),
        retry_policy: subscription.retry_policy,
        on_exhausted: subscription.on_exhausted,
        max_requests_per_second: subscription.max_requests_per_second,
        max_in_flight: subscription.max_in_flight,
        filter: String::new(),
    })?;
    Ok(UpdateInput {
        id: subscription.id,
        mask,
        endpoint: fields.endpoint,
        retry_policy: fields.retry_policy,
        on_exhausted: fields.on_exhausted,
        pacing: fields.pacing,
        topics: subscription.topics,
        filter: subscription.filter,
        etag: request.etag,
    })
}

/// A RotateSecret request's grace: `None` for the default.
pub fn grace(request: &proto::RotateSecretRequest) -> Result<Option<Duration>, Error> {
    let Some(grace) = request.grace else {
        return Ok(None);
    };
    if grace.seconds < 0 || grace.nanos < 0 || grace.nanos >= 1_000_000_000 {
        return Err(Error::invalid("grace", "must be a non-negative duration"));
    }
    Ok(Some(Duration::new(
        grace.seconds as u64,
        grace.nanos as u32,
    )))
}

pub fn subscription(subscription: Subscription, with_secret: bool) -> proto::Subscription {
    let etag = crate::store::records::subscription_etag(&subscription);
    let on_exhausted = match subscription.on_exhausted {
        OnExhausted::DeadLetter => proto::OnExhausted::DeadLetter,
        OnExhausted::Block => proto::OnExhausted::Block,
    };
    proto::Subscription {
        id: subscription.id,
        endpoint: subscription.endpoint,
        topics: subscription.topics,
        retry_policy: Some(retry_policy(&subscription.retry_policy)),
        on_exhausted: on_exhausted as i32,
        secret: if with_secret {
            subscription.secret
        } else {
            String::new()
        },
        created_at: Some(timestamp(subscription.created_at)),
        state: subscription_state(subscription.control.state) as i32,
        state_reason: subscription.control.reason,
        state_changed_at: optional_timestamp(subscription.control.since),
        paused_topics: subscription.control.paused_topics.into_iter().collect(),
        etag,
        max_requests_per_second: subscription.pacing.max_requests_per_second,
        max_in_flight: subscription.pacing.max_in_flight,
        filter: subscription.filter.unwrap_or_default(),
        previous_secret_expires_at: subscription
            .previous_secret
            .as_ref()
            .filter(|previous| previous.until > crate::model::now_millis())
            .map(|previous| timestamp(previous.until)),
    }
}

pub fn subscription_state(state: SubscriptionState) -> proto::SubscriptionState {
    match state {
        SubscriptionState::Active => proto::SubscriptionState::Active,
        SubscriptionState::Paused => proto::SubscriptionState::Paused,
        SubscriptionState::Disabled => proto::SubscriptionState::Disabled,
    }
}

/// The state a ListSubscriptions filter names; `None` for no filter.
pub fn state_filter(state: i32) -> Result<Option<SubscriptionState>, Error> {
    match proto::SubscriptionState::try_from(state) {
        Ok(proto::SubscriptionState::Unspecified) => Ok(None),
        Ok(proto::SubscriptionState::Active) => Ok(Some(SubscriptionState::Active)),
        Ok(proto::SubscriptionState::Paused) => Ok(Some(SubscriptionState::Paused)),
        Ok(proto::SubscriptionState::Disabled) => Ok(Some(SubscriptionState::Disabled)),
        Err(_) => Err(Error::invalid("state", format!("unknown state {state}"))),
    }
}

pub fn partition_status(
    subscription: &Subscription,
    status: PartitionStatus,
) -> proto::PartitionStatus {
    let state = match partition_state(subscription, &status) {
        PartitionState::Idle => proto::PartitionState::Idle,
        PartitionState::Delivering => proto::PartitionState::Delivering,
        PartitionState::Retrying => proto::PartitionState::Retrying,
        PartitionState::Blocked => proto::PartitionState::Blocked,
        PartitionState::Paused => proto::PartitionState::Paused,
    };
    let head = status.head;
    let last_error = head
        .as_ref()
        .and_then(|head| head.last_error.clone())
        .unwrap_or_default();
    proto::PartitionStatus {
        topic: status.partition.topic,
        state: state as i32,
        pending_count: status.pending,
        dead_letter_count: status.dead_letters,
        oldest_pending_published_at: head.as_ref().map(|head| timestamp(head.published_at)),
        head_sequence: head.as_ref().map_or(0, |head| head.sequence),
        head_attempts: head.as_ref().map_or(0, |head| head.state.attempts),
        head_next_attempt_at: head
            .as_ref()
            .map(|head| timestamp(head.state.next_attempt_at)),
        last_http_status: http_status(&last_error).map_or(0, u32::from),
        last_error,
        consecutive_failures: status.consecutive_failures,
        last_success_at: optional_timestamp(status.last_success_at),
        last_failure_at: optional_timestamp(status.last_failure_at),
    }
}

/// A timestamp, unset for 0 (never).
fn optional_timestamp(millis: UnixMillis) -> Option<prost_types::Timestamp> {
    (millis > 0).then(|| timestamp(millis))
}

pub fn pending(delivery: PendingDelivery) -> proto::PendingDelivery {
    proto::PendingDelivery {
        event_id: delivery.event.id,
        topic: delivery.event.topic,
        sequence: delivery.event.sequence,
        attempts: delivery.state.attempts,
        next_attempt_at: (!delivery.state.dead_lettered)
            .then(|| timestamp(delivery.state.next_attempt_at)),
        last_error: delivery.last_error.unwrap_or_default(),
        dead_lettered: delivery.state.dead_lettered,
        published_at: Some(timestamp(delivery.event.published_at)),
        attributes: delivery.event.attributes.into_iter().collect(),
        redelivery: delivery
            .redelivery
            .map_or_else(String::new, |redelivery| redelivery.name().to_string()),
    }
}

fn retry_policy(policy: &RetryPolicy) -> proto::RetryPolicy {
    proto::RetryPolicy {
        initial_backoff: Some(proto_duration(policy.initial_backoff)),
        max_backoff: Some(proto_duration(policy.max_backoff)),
        max_attempts: policy.max_attempts,
        request_timeout: Some(proto_duration(policy.request_timeout)),
    }
}

fn timestamp(millis: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (millis / 1000) as i64,
        nanos: ((millis % 1000) * 1_000_000) as i32,
    }
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

/// A proto duration as a std one; unset (or zero) means "use the default".
fn duration(
    field: &'static str,
    value: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must be a non-negative duration"));
    }
    let duration = Duration::new(value.seconds as u64, value.nanos as u32);
    Ok(Some(duration).filter(|duration| !duration.is_zero()))
}

/// A Replay request's bounds.
pub fn replay_bounds(
    request: &proto::ReplayRequest,
) -> Result<(Option<ReplayBound>, Option<ReplayBound>), Error> {
    use proto::replay_request::{End, Start};
    let start = match &request.start {
        Some(Start::FromSequence(sequence)) => Some(ReplayBound::Sequence(*sequence)),
        Some(Start::FromTime(time)) => Some(ReplayBound::Time(millis("from_time", time)?)),
        None => None,
    };
    let end = match &request.end {
        Some(End::ToSequence(sequence)) => Some(ReplayBound::Sequence(*sequence)),
        Some(End::ToTime(time)) => Some(ReplayBound::Time(millis("to_time", time)?)),
        None => None,
    };
    Ok((start, end))
}

/// A proto timestamp in milliseconds since the epoch; before the epoch is refused.
fn millis(field: &'static str, time: &prost_types::Timestamp) -> Result<UnixMillis, Error> {
    if time.seconds < 0 || !(0..1_000_000_000).contains(&time.nanos) {
        return Err(Error::invalid(field, "must be a time after 1970"));
    }
    Ok((time.seconds as u64)
        .saturating_mul(1000)
        .saturating_add(time.nanos as u64 / 1_000_000))
}
