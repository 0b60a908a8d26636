//! A real HTTP webhook receiver that records every request and answers as scripted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald::delivery::webhook::headers;
use herald::signing;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// This HTTP status.
    Status(u16),
    /// This status with a `Retry-After` of the given seconds.
    RetryAfter(u16, u64),
    /// Never answer (the connection stays open).
    Hang,
    /// 200 after this many milliseconds.
    Slow(u64),
    /// `307 Temporary Redirect` to the cloud metadata address.
    RedirectToMetadata,
    /// This status with a body that never ends (64 KiB chunks of `x`, as fast as read).
    Endless(u16),
    /// This status with this body.
    Body(u16, &'static str),
}

/// A response body that never ends.
struct EndlessBody;

impl hyper::body::Body for EndlessBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        static CHUNK: [u8; 65536] = [b'x'; 65536];
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            &CHUNK,
        )))))
    }
}

type Body = http_body_util::Either<Full<Bytes>, EndlessBody>;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// The request path, e.g. `/hook/3`.
    pub path: String,
    pub id: String,
    pub timestamp: u64,
    pub signature: String,
    pub topic: String,
    pub sequence: u64,
    pub previous: u64,
    pub content_type: String,
    /// The `traceparent` header (empty if none).
    pub traceparent: String,
    /// The `tracestate` header (empty if none).
    pub tracestate: String,
    /// The `herald-redelivery` header (empty if none).
    pub redelivery: String,
    pub body: Bytes,
    /// 1 for the first request with this event id, 2 for the second...
    pub attempt: u32,
    /// What the receiver answered.
    pub reply: Reply,
}

impl Received {
    /// True if the receiver answered 2xx.
    pub fn succeeded(&self) -> bool {
        match self.reply {
            Reply::Status(status) | Reply::Endless(status) | Reply::Body(status, _) => {
                (200..300).contains(&status)
            }
            Reply::Slow(_) => true,
            Reply::RetryAfter(..) | Reply::Hang | Reply::RedirectToMetadata => false,
        }
    }

    /// True if the signature verifies with `secret`.
    pub fn signature_valid(&self, secret: &str) -> bool {
        let key = signing::decode_secret(secret).expect("valid secret");
        signing::verify(&key, &self.id, self.timestamp, &self.body, &self.signature)
    }
}

type Script = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

struct State {
    received: Mutex<Vec<Received>>,
    attempts: Mutex<HashMap<String, u32>>,
    script: Mutex<Script>,
}

/// A running receiver; stops when dropped with the test runtime.
#[derive(Clone)]
pub struct Receiver {
    pub address: SocketAddr,
    /// Whether it answers over TLS (at `https://localhost:port`).
    tls: bool,
    state: Arc<State>,
}

impl Receiver {
    /// Starts a receiver that answers 204 to everything.
    pub async fn start() -> Receiver {
        Receiver::scripted(|_| Reply::Status(204)).await
    }

    /// Starts a receiver whose answer `script` decides per request.
    pub async fn scripted(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Receiver {
        Receiver::serve(Arc::new(script), None).await
    }

    /// Starts a receiver that answers 204 over TLS with `config`'s certificate (one for
    /// `localhost`).
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Receiver {
        Receiver::serve(Arc::new(|_: &Received| Reply::Status(204)), Some(config)).await
    }

    async fn serve(script: Script, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let address = listener.local_addr().expect("address");
        let state = Arc::new(State {
            received: Mutex::new(Vec::new()),
            attempts: Mutex::new(HashMap::new()),
            script: Mutex::new(script),
        });
        let acceptor = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let accept_state = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = accept_state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(state.clone(), request));
                    let connection = http1::Builder::new();
                    let _ = match acceptor {
                        // A handshake the client aborts (an untrusted certificate) ends here.
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(stream) => {
                                connection
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                            }
                            Err(_) => return,
                        },
                        None => {
                            connection
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        Receiver {
            address,
            tls: tls.is_some(),
            state,
        }
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}/hook", self.address.port())
        } else {
            format!("http://{}/hook", self.address)
        }
    }

    /// Replaces the script.
    pub fn set_script(&self, script: impl Fn(&Received) -> Reply + Send + Sync + 'static) {
        *self.state.script.lock().unwrap() = Arc::new(script);
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The first request answered 2xx of each (path, event id), in arrival order: what was
    /// delivered, without at-least-once repeats (see [`Receiver::successes`] for all).
    pub fn delivered(&self) -> Vec<Received> {
        let mut seen = std::collections::HashSet::new();
        self.successes()
            .into_iter()
            .filter(|received| seen.insert((received.path.clone(), received.id.clone())))
            .collect()
    }

    /// Every request answered 2xx, repeats included, in arrival order.
    pub fn successes(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(Received::succeeded)
            .collect()
    }

    /// Number of distinct (path, event id) pairs answered 2xx: what has been delivered, with
    /// at-least-once repeats counted once (tests that care about repeats read `received`).
    pub fn delivered_count(&self) -> usize {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|received| received.succeeded())
            .map(|received| (received.path.as_str(), received.id.as_str()))
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    let at = Instant::now();
    let path = request.uri().path().to_string();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let id = header(headers::WEBHOOK_ID);
    let timestamp = header(headers::WEBHOOK_TIMESTAMP).parse().unwrap_or(0);
    let signature = header(headers::WEBHOOK_SIGNATURE);
    let topic = header(headers::TOPIC);
    let sequence = header(headers::SEQUENCE).parse().unwrap_or(0);
    let previous = header(headers::PREVIOUS_SEQUENCE).parse().unwrap_or(0);
    let content_type = header("content-type");
    let traceparent = header("traceparent");
    let tracestate = header("tracestate");
    let redelivery = header("herald-redelivery");
    let body = request.into_body().collect().await?.to_bytes();
    let attempt = {
        let mut attempts = state.attempts.lock().unwrap();
        let count = attempts.entry(id.clone()).or_insert(0);
        *count += 1;
        *count
    };
    let mut received = Received {
        at,
        path,
        id,
        timestamp,
        signature,
        topic,
        sequence,
        previous,
        content_type,
        traceparent,
        tracestate,
        redelivery,
        body,
        attempt,
        reply: Reply::Status(204),
    };
    let script = state.script.lock().unwrap().clone();
    received.reply = script(&received);
    let reply = received.reply;
    state.received.lock().unwrap().push(received);
    if let Reply::Endless(status) = reply {
        let mut response = Response::new(Body::Right(EndlessBody));
        *response.status_mut() = hyper::StatusCode::from_u16(status).expect("valid status");
        return Ok(response);
    }
    if let Reply::Body(status, body) = reply {
        let mut response =
            Response::new(Body::Left(Full::new(Bytes::from_static(body.as_bytes()))));
        *response.status_mut() = hyper::StatusCode::from_u16(status).expect("valid status");
        return Ok(response);
    }
    if reply == Reply::RedirectToMetadata {
        let mut response = Response::new(Body::Left(Full::new(Bytes::new())));
        *response.status_mut() = hyper::StatusCode::TEMPORARY_REDIRECT;
        response.headers_mut().insert(
            "location",
            "http://169.254.169.254/latest/meta-data/".parse().unwrap(),
        );
        return Ok(response);
    }
    let (status, retry_after) = match reply {
        Reply::Status(status) => (status, None),
        Reply::RedirectToMetadata | Reply::Endless(_) | Reply::Body(..) => {
            unreachable!("answered above")
        }
        Reply::RetryAfter(status, seconds) => (status, Some(seconds)),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (204, None)
        }
        Reply::Slow(delay) => {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            (200, None)
        }
    };
    let mut response = Response::new(Body::Left(Full::new(Bytes::new())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("valid status");
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", seconds.to_string().parse().unwrap());
    }
    Ok(response)
}
