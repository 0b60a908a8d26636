//! One HTTP delivery attempt, signed as Standard Webhooks specifies.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::model::{PendingDelivery, Subscription};

/// Prefix of Standard Webhooks symmetric secrets.
pub const SECRET_PREFIX: &str = "whsec_";

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

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not `whsec_` followed by base64.
    #[error("secret must be `whsec_` followed by base64")]
    Malformed,
    /// Decoded key length outside 24..=64 bytes.
    #[error("secret key must be 24 to 64 bytes, got {0}")]
    Length(usize),
}

/// Decodes a `whsec_...` secret into its HMAC key.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Malformed)?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| SecretError::Malformed)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::Length(key.len()));
    }
    Ok(key)
}

/// Generates a new secret with a random 32-byte key.
pub fn generate_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// Computes the `webhook-signature` value for one attempt.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mac = message_mac(key, id, timestamp, body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// True if any space-separated signature in `header` is a valid `v1` signature of the message.
/// The comparison runs in constant time.
pub fn verify(key: &[u8], id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
    header.split(' ').any(|candidate| {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = STANDARD.decode(encoded) else {
            return false;
        };
        message_mac(key, id, timestamp, body)
            .verify_slice(&expected)
            .is_ok()
    })
}

/// HMAC-SHA256 over `{id}.{timestamp}.{body}`.
fn message_mac(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
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
    let signature = sign(key, &event.id, timestamp, &event.payload);
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: u64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let key = decode_secret(SECRET).unwrap();
        assert_eq!(
            sign(&key, ID, TIMESTAMP, BODY),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn verify_accepts_any_listed_signature_and_rejects_tampering() {
        let key = decode_secret(SECRET).unwrap();
        let good = sign(&key, ID, TIMESTAMP, BODY);
        assert!(verify(&key, ID, TIMESTAMP, BODY, &good));
        assert!(verify(
            &key,
            ID,
            TIMESTAMP,
            BODY,
            &format!("v1,bm9wZQ== {good}")
        ));
        assert!(!verify(&key, ID, TIMESTAMP + 1, BODY, &good));
        assert!(!verify(&key, ID, TIMESTAMP, b"{}", &good));
        assert!(!verify(&key, ID, TIMESTAMP, BODY, "v1,bm9wZQ=="));
    }

    #[test]
    fn secrets_are_checked_and_generated_valid() {
        assert_eq!(decode_secret("abc"), Err(SecretError::Malformed));
        assert_eq!(decode_secret("whsec_!!"), Err(SecretError::Malformed));
        assert_eq!(decode_secret("whsec_AAAA"), Err(SecretError::Length(3)));
        let generated = generate_secret();
        assert_eq!(decode_secret(&generated).unwrap().len(), 32);
        assert_ne!(generated, generate_secret());
    }
}
