//! One HTTP delivery attempt, signed as Standard Webhooks specifies.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::delivery::endpoint_policy::{AddressRules, PolicyResolver, refusal_in};

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

/// The connector under the delivery client: TCP through the endpoint rules' resolver, then
/// TLS for `https` endpoints.
type Connector = hyper_rustls::HttpsConnector<HttpConnector<PolicyResolver>>;

/// The HTTP client shared by all deliveries (hyper's pooled client, without reqwest's layers:
/// those parsed each request's URL twice and cloned the client on every request, 5 % of the
/// server's CPU while delivering).
pub type Client = hyper_util::client::legacy::Client<Connector, Full<Bytes>>;

/// Builds the HTTP client shared by all deliveries: pooled HTTP/1.1 connections, no redirects
/// (a 3xx is a failure, as it is for every webhook sender that signs its requests), no proxy,
/// TLS verified against the platform's roots, and names resolved under the endpoint `rules`
/// (checked again on every connection).
/// Response headers are bounded by hyper (100 headers, 400 KiB buffer).
///
/// Up to `concurrency` idle connections are kept per host: no more requests than that are in
/// flight at once, so a burst of them (a fan-out to many subscriptions of one receiver) finds
/// its connections open the next time instead of connecting again. A cap of 64 measured
/// about a third of the attempts of a fan-out of 100 connecting anew.
pub fn client(rules: Arc<AddressRules>, concurrency: usize) -> Client {
    let mut http = HttpConnector::new_with_resolver(PolicyResolver::new(rules));
    http.enforce_http(false);
    http.set_nodelay(true);
    // Probes keep a pooled connection's flow open through NATs and firewalls that forget idle
    // ones, and find a dead peer without waiting for the request timeout.
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_keepalive_interval(Some(Duration::from_secs(15)));
    http.set_keepalive_retries(Some(3));
    #[cfg(target_os = "linux")]
    http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> =
        match rustls_platform_verifier::Verifier::new(provider.clone()) {
            Ok(verifier) => Arc::new(verifier),
            Err(error) => {
                tracing::warn!(%error, "no trusted TLS roots: every https endpoint will fail");
                Arc::new(NoRoots {
                    reason: error.to_string(),
                    schemes: provider
                        .signature_verification_algorithms
                        .supported_schemes(),
                })
            }
        };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the TLS provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // `From` keeps the ALPN offer (the builder refuses one and offers none for HTTP/1.1) and
    // allows plain `http` endpoints.
    let connector = hyper_rustls::HttpsConnector::from((http, tls));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(concurrency.max(1))
        .build(connector)
}

/// The verifier when the platform has no trusted roots (a container without a CA bundle):
/// plain `http` endpoints still work, and every `https` one fails, saying why.
#[derive(Debug)]
struct NoRoots {
    reason: String,
    schemes: Vec<rustls::SignatureScheme>,
}

impl NoRoots {
    fn refuse<T>(&self) -> Result<T, rustls::Error> {
        Err(rustls::Error::General(format!(
            "no trusted TLS roots ({}; set SSL_CERT_FILE)",
            self.reason
        )))
    }
}

impl ServerCertVerifier for NoRoots {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.refuse()
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.refuse()
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.refuse()
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes.clone()
    }
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

/// An endpoint parsed for sending: its URI, and its host's address if the host is a literal
/// one (the resolver never sees those, so the rules are checked on it before sending).
#[derive(Debug, Clone)]
pub struct Target {
    uri: Uri,
    literal: Option<IpAddr>,
}

impl Target {
    /// Parses an endpoint URL (with the URL standard's rules, as it was validated), or says
    /// why it cannot be sent to.
    pub fn parse(endpoint: &str) -> Result<Target, String> {
        let mut url = url::Url::parse(endpoint)
            .map_err(|error| format!("endpoint `{endpoint}` is not a URL: {error}"))?;
        url.set_fragment(None);
        let uri = url
            .as_str()
            .parse::<Uri>()
            .map_err(|error| format!("endpoint `{endpoint}` is not an HTTP URI: {error}"))?;
        let literal = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        };
        Ok(Target { uri, literal })
    }
}

/// Deliveries over HTTP(S), under the endpoint address rules.
pub struct HttpTransport {
    client: Client,
    rules: Arc<AddressRules>,
    /// Endpoints parsed once, not on every attempt: parsing a URL with its host's IDNA
    /// processing was 4 % of the server's CPU while delivering.
    parsed: std::sync::Mutex<std::collections::HashMap<String, Result<Target, String>>>,
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

    fn parse(&self, endpoint: &str) -> Result<Target, String> {
        let mut parsed = self.parsed.lock().expect("endpoint cache lock");
        if let Some(target) = parsed.get(endpoint) {
            return target.clone();
        }
        if parsed.len() >= PARSED_ENDPOINTS {
            parsed.clear();
        }
        let target = Target::parse(endpoint);
        parsed.insert(endpoint.to_string(), target.clone());
        target
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
        match self.parse(&subscription.endpoint) {
            Ok(target) => {
                send(
                    &self.client,
                    &self.rules,
                    &target,
                    subscription,
                    key,
                    delivery,
                )
                .await
            }
            Err(error) => failed(error),
        }
    }
}

/// A failure before any response.
fn failed(error: String) -> Attempt {
    Attempt::Failed {
        status: None,
        error,
        retry_after: None,
    }
}

/// Builds one signed attempt of `delivery` to `uri` (with the subscription's secret `key`,
/// and its previous one during a rotation's grace window), stamped `now` (Unix milliseconds).
pub fn request(
    uri: &Uri,
    subscription: &Subscription,
    key: &[u8],
    delivery: &PendingDelivery,
    now: u64,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let event = &delivery.event;
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
    let mut request = Request::post(uri.clone())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::ACCEPT, "*/*")
        .header(header::CONTENT_TYPE, &event.content_type)
        .header(HeaderName::from_static(headers::WEBHOOK_ID), &event.id)
        .header(
            HeaderName::from_static(headers::WEBHOOK_TIMESTAMP),
            timestamp,
        )
        .header(
            HeaderName::from_static(headers::WEBHOOK_SIGNATURE),
            signature,
        )
        .header(HeaderName::from_static(headers::TOPIC), &event.topic)
        .header(HeaderName::from_static(headers::SEQUENCE), event.sequence)
        .header(
            HeaderName::from_static(headers::PREVIOUS_SEQUENCE),
            delivery.previous_sequence,
        );
    if let Some(redelivery) = delivery.redelivery {
        request = request.header(
            HeaderName::from_static(headers::REDELIVERY),
            redelivery.name(),
        );
    }
    // Each attempt is a child span of the publisher's.
    if let Some(trace) = &event.trace {
        request = request.header(
            HeaderName::from_static(headers::TRACEPARENT),
            trace.child_of(&tracing::Span::current()),
        );
        if let Some(state) = &trace.tracestate {
            request = request.header(HeaderName::from_static(headers::TRACESTATE), state);
        }
    }
    request.body(Full::new(Bytes::copy_from_slice(&event.payload)))
}

/// The `User-Agent` of every attempt.
const USER_AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));

/// Sends one attempt of `delivery` to the subscription's endpoint (`target`), unless the
/// endpoint is a literal address the `rules` refuse (names are checked by the client's
/// resolver). The subscription's request timeout bounds the whole exchange, the response
/// body included.
pub async fn send(
    client: &Client,
    rules: &AddressRules,
    target: &Target,
    subscription: &Subscription,
    key: &[u8],
    delivery: &PendingDelivery,
) -> Attempt {
    if let Some(address) = target.literal
        && let Err(refused) = rules.check(address)
    {
        return failed(refused.to_string());
    }
    let timeout = subscription.retry_policy.request_timeout;
    let request = match request(
        &target.uri,
        subscription,
        key,
        delivery,
        crate::model::now_millis(),
    ) {
        Ok(request) => request,
        Err(error) => return failed(format!("the request cannot be built: {error}")),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let response = match tokio::time::timeout_at(deadline, client.request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return failed(describe(&error)),
        Err(_) => return failed(timed_out(timeout)),
    };
    let status = response.status();
    let retry_after = if status.as_u16() == 429 || status.as_u16() == 503 {
        response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    } else {
        None
    };
    // Read a bounded body, so a small one lets the connection go back to the pool and a huge
    // one costs no memory (the rest is never read: the connection is dropped). A body that
    // does not arrive within the timeout counts as a failure.
    let body = match tokio::time::timeout_at(
        deadline,
        read_bounded(response.into_body(), MAX_RESPONSE_BODY),
    )
    .await
    {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(error)) => Err(describe(&error)),
        Err(_) => Err(timed_out(timeout)),
    };
    if status.is_success() {
        return match body {
            Ok(_) => Attempt::Delivered,
            Err(error) => Attempt::Failed {
                status: Some(status.as_u16()),
                error,
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
async fn read_bounded(mut body: Incoming, cap: usize) -> Result<Vec<u8>, hyper::Error> {
    let mut read = Vec::new();
    while read.len() < cap {
        match body.frame().await.transpose()? {
            Some(frame) => {
                if let Some(chunk) = frame.data_ref() {
                    let room = cap - read.len();
                    read.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
            }
            None => break,
        }
    }
    Ok(read)
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

fn timed_out(timeout: Duration) -> String {
    format!("timed out after {} ms", timeout.as_millis())
}

fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    if let Some(refused) = refusal_in(error) {
        return refused.to_string();
    }
    if let Some(error) = error.downcast_ref::<hyper_util::client::legacy::Error>()
        && error.is_connect()
    {
        // The innermost cause says why: refused, unreachable, a name that does not resolve,
        // a certificate that is not trusted.
        let mut cause: &(dyn std::error::Error + 'static) = error;
        while let Some(next) = cause.source() {
            cause = next;
        }
        return format!("connection failed: {cause}");
    }
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
