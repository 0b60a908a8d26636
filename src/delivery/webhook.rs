//! One HTTP delivery attempt, signed as Standard Webhooks specifies.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::delivery::endpoint_policy::{AddressRules, PolicyResolver, Refused, refusal_in};

use crate::model::{PendingDelivery, Subscription};

/// Header names sent with every delivery.
pub mod headers {
    /// The event id, identical on every attempt.
    pub const WEBHOOK_ID: &str = "webhook-id";
    /// Unix seconds of this attempt.
    pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
    /// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`; during a secret rotation's grace
    /// window, a second one with the old secret after a space.
    pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
    /// The event's topic.
    pub const TOPIC: &str = "herald-topic";
    /// The event's sequence.
    pub const SEQUENCE: &str = "herald-sequence";
    /// The sequence of the previous event of the same partition (0 for the first).
    pub const PREVIOUS_SEQUENCE: &str = "herald-previous-sequence";
    /// `redrive` or `replay` on an event sent again out of its partition's order (by an
    /// operator); absent on first deliveries and their retries.
    pub const REDELIVERY: &str = "herald-redelivery";
    /// W3C trace context: a child span of the publisher's, new on every attempt.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state, as the publisher sent it.
    pub const TRACESTATE: &str = "tracestate";
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx response within the timeout.
    Delivered,
    /// Anything else, with a short description and the receiver's `Retry-After` (only on 429
    /// and 503).
    Failed {
        /// The HTTP status, if the receiver answered.
        status: Option<u16>,
        /// What went wrong, for ListPending.
        error: String,
        /// How long the receiver asked us to wait.
        retry_after: Option<Duration>,
    },
}

/// Most bytes of a response body read; the rest is not read (the connection is dropped).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// Most bytes of a failed response's body kept in `last_error`.
const ERROR_EXCERPT: usize = 200;

/// Builds the HTTP client shared by all deliveries: pooled connections, no redirects (a 3xx
/// is a failure, as it is for every webhook sender that signs its requests), no proxy, and
/// names resolved under the endpoint `rules` (checked again on every connection).
/// Response headers are bounded by hyper (100 headers, 400 KiB buffer).
///
/// Up to `concurrency` idle connections are kept per host: no more requests than that are in
/// flight at once, so a burst of them (a fan-out to many subscriptions of one receiver) finds
/// its connections open the next time instead of connecting again. A cap of 64 measured
/// about a third of the attempts of a fan-out of 100 connecting anew.
pub fn client(rules: Arc<AddressRules>, concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(PolicyResolver::new(rules)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(concurrency.max(1))
        .tcp_nodelay(true)
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client configuration is valid")
}

/// How the engine makes one attempt: the seam between scheduling and HTTP.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Sends one attempt of `delivery` to the subscription's endpoint, signed with `key`.
    async fn send(
        &self,
        subscription: &Subscription,
        key: &[u8],
        delivery: &PendingDelivery,
    ) -> Attempt;
}

/// Endpoints whose parsed URL is kept, at most (beyond, the cache starts again).
const PARSED_ENDPOINTS: usize = 10_000;

/// Deliveries over HTTP(S), under the endpoint address rules.
pub struct HttpTransport {
    client: reqwest::Client,
    rules: Arc<AddressRules>,
    /// Endpoints parsed once (`None`: not a URL), not on every attempt: parsing a URL with
    /// its host's IDNA processing was 4 % of the server's CPU while delivering.
    parsed: std::sync::Mutex<std::collections::HashMap<String, Option<reqwest::Url>>>,
}

impl HttpTransport {
    /// A pooled client (see [`client`]) enforcing `rules`, for `concurrency` requests in
    /// flight at most.
    pub fn new(rules: Arc<AddressRules>, concurrency: usize) -> Self {
        HttpTransport {
            client: client(rules.clone(), concurrency),
            rules,
            parsed: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn parse(&self, endpoint: &str) -> Option<reqwest::Url> {
        let mut parsed = self.parsed.lock().expect("endpoint cache lock");
        if let Some(url) = parsed.get(endpoint) {
            return url.clone();
        }
        if parsed.len() >= PARSED_ENDPOINTS {
            parsed.clear();
        }
        let url = reqwest::Url::parse(endpoint).ok();
        parsed.insert(endpoint.to_string(), url.clone());
        url
    }
}

#[async_trait::async_trait]
impl Transport for HttpTransport {
    async fn send(
        &self,
        subscription: &Subscription,
        key: &[u8],
        delivery: &PendingDelivery,
    ) -> Attempt {
        let url = self.parse(&subscription.endpoint);
        send(
            &self.client,
            &self.rules,
            url.as_ref(),
            subscription,
            key,
            delivery,
        )
        .await
    }
}

/// Sends one attempt of `delivery` to the subscription's endpoint (`url`, parsed; `None` if it
/// does not parse), unless the endpoint is a literal address the `rules` refuse (names are
/// checked by the client's resolver).
pub async fn send(
    client: &reqwest::Client,
    rules: &AddressRules,
    url: Option<&reqwest::Url>,
    subscription: &Subscription,
    key: &[u8],
    delivery: &PendingDelivery,
) -> Attempt {
    if let Err(refused) = check_literal(rules, url) {
        return Attempt::Failed {
            status: None,
            error: refused.to_string(),
            retry_after: None,
        };
    }
    let event = &delivery.event;
    let now = crate::model::now_millis();
    let timestamp = now / 1000;
    let mut signature = crate::signing::sign(key, &event.id, timestamp, &event.payload);
    // During a secret rotation's grace window, signed with the old secret too (Standard
    // Webhooks: space-separated signatures, any of which may verify).
    if let Some(previous) = subscription.previous_secret_at(now)
        && let Ok(old_key) = crate::signing::decode_secret(previous)
    {
        signature.push(' ');
        signature.push_str(&crate::signing::sign(
            &old_key,
            &event.id,
            timestamp,
            &event.payload,
        ));
    }
    let request = match url {
        Some(url) => client.post(url.clone()),
        // Refused by the client with the parse error.
        None => client.post(&subscription.endpoint),
    };
    let mut request = request
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
        );
    if let Some(redelivery) = delivery.redelivery {
        request = request.header(headers::REDELIVERY, redelivery.name());
    }
    // Each attempt is a child span of the publisher's.
    if let Some(trace) = &event.trace {
        request = request.header(
            headers::TRACEPARENT,
            trace.child_of(&tracing::Span::current()),
        );
        if let Some(state) = &trace.tracestate {
            request = request.header(headers::TRACESTATE, state);
        }
    }
    let request = request.body(event.payload.clone());
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            return Attempt::Failed {
                status: None,
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
    // Read a bounded body, so a small one lets the connection go back to the pool and a huge
    // one costs no memory (the rest is never read: the connection is dropped). A body that
    // does not arrive within the timeout counts as a failure.
    let body = read_bounded(response, MAX_RESPONSE_BODY).await;
    if status.is_success() {
        return match body {
            Ok(_) => Attempt::Delivered,
            Err(error) => Attempt::Failed {
                status: Some(status.as_u16()),
                error: describe(&error, subscription.retry_policy.request_timeout),
                retry_after: None,
            },
        };
    }
    let excerpt = body.map(|body| excerpt(&body)).unwrap_or_default();
    Attempt::Failed {
        status: Some(status.as_u16()),
        error: if excerpt.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {excerpt}")
        },
        retry_after,
    }
}

/// Reads at most `cap` bytes of the body (then stops).
async fn read_bounded(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while body.len() < cap {
        match response.chunk().await? {
            Some(chunk) => {
                let room = cap - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            None => break,
        }
    }
    Ok(body)
}

/// The start of a failed response's body as one line of printable text, for `last_error`.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_EXCERPT)]);
    text.chars()
        .map(|character| {
            if character.is_control() {
                ' '
            } else {
                character
            }
        })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Checks an endpoint whose host is a literal address (the resolver never sees those).
fn check_literal(rules: &AddressRules, url: Option<&reqwest::Url>) -> Result<(), Refused> {
    let Some(url) = url else {
        return Ok(());
    };
    match url.host() {
        Some(url::Host::Ipv4(v4)) => rules.check(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => rules.check(IpAddr::V6(v6)),
        _ => Ok(()),
    }
}

fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if let Some(refused) = refusal_in(error) {
        refused.to_string()
    } else if error.is_timeout() {
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
