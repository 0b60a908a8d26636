//! One HTTP delivery attempt, signed as Standard Webhooks specifies.

use std::time::Duration;

use crate::model::{PendingDelivery, Subscription};

/// Header names sent with every delivery.
pub mod headers {
    /// The event id, identical on every attempt.
    pub const WEBHOOK_ID: &str = "webhook-id";
    /// Unix seconds of this attempt.
    pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
    /// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
    /// The event's topic.
    pub const TOPIC: &str = "herald-topic";
    /// The event's sequence.
    pub const SEQUENCE: &str = "herald-sequence";
    /// The sequence of the previous event of the same partition (0 for the first).
    pub const PREVIOUS_SEQUENCE: &str = "herald-previous-sequence";
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx response within the timeout.
    Delivered,
    /// Anything else, with a short description and the receiver's `Retry-After` (only on 429
    /// and 503).
    Failed {
        /// What went wrong, for ListPending.
        error: String,
        /// How long the receiver asked us to wait.
        retry_after: Option<Duration>,
    },
}

/// Builds the HTTP client shared by all deliveries: pooled connections, no redirects (a 3xx
/// is a failure, as it is for every webhook sender that signs its requests), no proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client configuration is valid")
}

/// Sends one attempt of `delivery` to the subscription's endpoint.
pub async fn send(
    client: &reqwest::Client,
    subscription: &Subscription,
    key: &[u8],
    delivery: &PendingDelivery,
) -> Attempt {
    let event = &delivery.event;
    let timestamp = crate::model::now_millis() / 1000;
    let signature = crate::signing::sign(key, &event.id, timestamp, &event.payload);
    let request = client
        .post(&subscription.endpoint)
        .timeout(subscription.retry_policy.request_timeout)
        .header(reqwest::header::CONTENT_TYPE, &event.content_type)
        .header(headers::WEBHOOK_ID, &event.id)
        .header(headers::WEBHOOK_TIMESTAMP, timestamp.to_string())
        .header(headers::WEBHOOK_SIGNATURE, signature)
        .header(headers::TOPIC, &event.topic)
        .header(headers::SEQUENCE, event.sequence.to_string())
        .header(
            headers::PREVIOUS_SEQUENCE,
            delivery.previous_sequence.to_string(),
        )
        .body(event.payload.clone());
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            return Attempt::Failed {
                error: describe(&error, subscription.retry_policy.request_timeout),
                retry_after: None,
            };
        }
    };
    let status = response.status();
    let retry_after = if status.as_u16() == 429 || status.as_u16() == 503 {
        response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    } else {
        None
    };
    // Read the (small) body so the connection goes back to the pool; a body that does not
    // arrive within the timeout counts as a failure.
    let body = response.bytes().await;
    if status.is_success() {
        return match body {
            Ok(_) => Attempt::Delivered,
            Err(error) => Attempt::Failed {
                error: describe(&error, subscription.retry_policy.request_timeout),
                retry_after: None,
            },
        };
    }
    Attempt::Failed {
        error: format!("HTTP {status}"),
        retry_after,
    }
}

fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        format!("timed out after {} ms", timeout.as_millis())
    } else if error.is_connect() {
        "connection failed".to_string()
    } else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}
