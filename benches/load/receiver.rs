//! The fast receiver: answers every POST at once (or fails a chosen share of them on chosen
//! paths), checks order per (path, topic) and records publish-to-delivery latency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::clock;

/// Shared receiver state.
pub struct Receiver {
    pub address: SocketAddr,
    /// Requests answered 2xx.
    pub delivered: AtomicU64,
    /// When the first 2xx answer since the last reset was given.
    pub first_delivered_at: Mutex<Option<std::time::Instant>>,
    /// Requests answered 2xx on paths that never fail.
    pub delivered_healthy: AtomicU64,
    /// Requests answered 500.
    pub failed: AtomicU64,
    /// Deliveries that broke order (a sequence at or below the last one delivered, whose
    /// previous-sequence did not match).
    pub order_violations: AtomicU64,
    /// Deliveries of an event the path had already received (at-least-once repeats).
    pub repeats: AtomicU64,
    /// Micros from publish start to arrival, of deliveries carrying a timestamp.
    pub latencies: Mutex<Vec<u32>>,
    /// Deliveries slower than a second: (latency micros, path, topic, sequence).
    pub slow: Mutex<Vec<(u64, String, String, u64)>>,
    last: Mutex<HashMap<(String, String), u64>>,
    /// Share of requests failed on failing paths, in parts per million.
    failure_ppm: AtomicU64,
    /// While set, requests to paths starting with `/hold/` get no answer.
    hold: std::sync::atomic::AtomicBool,
    /// Bumped on release: requests held across a release are dropped unrecorded (their sender
    /// is gone).
    hold_epoch: AtomicU64,
}

impl Receiver {
    pub async fn start() -> Arc<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let receiver = Arc::new(Receiver {
            address: listener.local_addr().unwrap(),
            delivered: AtomicU64::new(0),
            first_delivered_at: Mutex::new(None),
            delivered_healthy: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
            slow: Mutex::new(Vec::new()),
            last: Mutex::new(HashMap::new()),
            failure_ppm: AtomicU64::new(0),
            hold: std::sync::atomic::AtomicBool::new(false),
            hold_epoch: AtomicU64::new(0),
        });
        let state = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(state.clone(), request));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        receiver
    }

    /// Fails `rate` (0..1) of the requests to paths starting with `/fail/`.
    pub fn set_failure_rate(&self, rate: f64) {
        self.failure_ppm
            .store((rate * 1_000_000.0) as u64, Ordering::SeqCst);
    }

    /// Holds (or releases) requests to `/hold/` paths.
    pub fn set_hold(&self, hold: bool) {
        if !hold {
            self.hold_epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.hold.store(hold, Ordering::SeqCst);
    }

    /// Forgets recorded latencies and counters.
    pub fn reset(&self) {
        self.delivered.store(0, Ordering::SeqCst);
        *self.first_delivered_at.lock().unwrap() = None;
        self.delivered_healthy.store(0, Ordering::SeqCst);
        self.failed.store(0, Ordering::SeqCst);
        self.latencies.lock().unwrap().clear();
    }
}

async fn handle(
    state: Arc<Receiver>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_string();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    let topic = header("herald-topic");
    let sequence: Option<u64> = header("herald-sequence").and_then(|value| value.parse().ok());
    let previous: Option<u64> =
        header("herald-previous-sequence").and_then(|value| value.parse().ok());
    let body = request.into_body().collect().await?.to_bytes();
    if path.starts_with("/hold/") && state.hold.load(Ordering::SeqCst) {
        let epoch = state.hold_epoch.load(Ordering::SeqCst);
        while state.hold.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if state.hold_epoch.load(Ordering::SeqCst) != epoch {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            return Ok(response);
        }
    }
    let failing = path.starts_with("/fail/");
    let failure_ppm = state.failure_ppm.load(Ordering::Relaxed);
    if failing && failure_ppm > 0 && rand::random_range(0..1_000_000) < failure_ppm {
        state.failed.fetch_add(1, Ordering::Relaxed);
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(response);
    }
    if let (Some(topic), Some(sequence), Some(previous)) = (topic, sequence, previous) {
        if body.len() >= 8 {
            let sent = u64::from_le_bytes(body[..8].try_into().unwrap());
            let latency = clock::micros().saturating_sub(sent);
            if sent > 0 && latency > 1_000_000 && std::env::var_os("HERALD_BENCH_SLOW").is_some() {
                state
                    .slow
                    .lock()
                    .unwrap()
                    .push((latency, path.clone(), topic.clone(), sequence));
            }
        }
        let mut last = state.last.lock().unwrap();
        let seen = last.entry((path, topic)).or_insert(0);
        if sequence > *seen {
            // A fresh delivery must chain onto the last one (dead letters are off here).
            if *seen != 0 && previous != *seen {
                state.order_violations.fetch_add(1, Ordering::Relaxed);
            }
            *seen = sequence;
        } else if sequence == *seen {
            state.repeats.fetch_add(1, Ordering::Relaxed);
        } else if sequence < *seen {
            // Redeliveries of the last event are allowed (at-least-once); older ones are not.
            state.order_violations.fetch_add(1, Ordering::Relaxed);
        }
        drop(last);
        if body.len() >= 8 {
            let sent = u64::from_le_bytes(body[..8].try_into().unwrap());
            if sent > 0 {
                let latency = clock::micros().saturating_sub(sent);
                state
                    .latencies
                    .lock()
                    .unwrap()
                    .push(latency.min(u32::MAX as u64) as u32);
            }
        }
    }
    if state.delivered.fetch_add(1, Ordering::Relaxed) == 0 {
        state
            .first_delivered_at
            .lock()
            .unwrap()
            .get_or_insert_with(std::time::Instant::now);
    }
    if !failing {
        state.delivered_healthy.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Response::new(Full::new(Bytes::new())))
}
