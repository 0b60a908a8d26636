//! Prometheus metrics (prometheus-client), served in the Prometheus text format on
//! `--metrics-listen` at `/metrics`. One registry per server, so several servers in one
//! process (the tests) keep their own counts.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::delivery::webhook::Attempt;
use crate::shutdown::Shutdown;
use crate::store::StoreError;
use crate::store::dynamodb::RequestCounts;

/// Outcome of a Publish call.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    /// `stored`, `duplicate` or `error`.
    pub outcome: &'static str,
}

/// Outcome of one delivery attempt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `delivered` or `failed`.
    pub outcome: &'static str,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `none` (no HTTP answer: timeout, connection error,
    /// refused by the endpoint policy).
    pub status_class: &'static str,
}

/// One store operation (a method of the store traits, such as `publish`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOperationLabels {
    /// The method.
    pub operation: &'static str,
}

/// A store operation that failed, and how.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    /// The method.
    pub operation: &'static str,
    /// The error's kind (`unavailable`, `not_found`, `contention`, ...).
    pub error: &'static str,
}

/// The server's metrics.
pub struct Metrics {
    store_calls: Family<StoreOperationLabels, Counter>,
    store_errors: Family<StoreErrorLabels, Counter>,
    store_durations: Family<StoreOperationLabels, Histogram>,
    /// Partition leases this instance holds (shared stores only).
    pub leases_held: Gauge,
    registry: Registry,
    publishes: Family<PublishLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    dead_lettered: Counter,
    attempt_duration: Histogram,
    publish_to_delivery: Histogram,
    /// Partitions with a running delivery task.
    pub partitions_active: Gauge,
    /// 1 while the store can write, 0 after a failed write until it recovers.
    pub store_healthy: Gauge,
    /// The backlog gauges' last snapshot (see [`crate::backlog`]).
    pub backlog: crate::backlog::SharedSnapshot,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

impl Metrics {
    /// A registry with every metric; `requests` are the DynamoDB request counters, if any.
    pub fn new(requests: Option<Arc<RequestCounts>>) -> Self {
        let mut registry = Registry::with_prefix("herald");
        let publishes = Family::<PublishLabels, Counter>::default();
        registry.register("publishes", "Publish calls by outcome", publishes.clone());
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts by outcome and HTTP status class",
            attempts.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "deliveries_dead_lettered",
            "Deliveries parked after their last attempt (DEAD_LETTER policy)",
            dead_lettered.clone(),
        );
        let attempt_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "delivery_attempt_duration_seconds",
            "Duration of one delivery attempt, response included",
            attempt_duration.clone(),
        );
        let publish_to_delivery = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        registry.register(
            "publish_to_delivery_seconds",
            "Time from an event's publish to its successful delivery, per delivery",
            publish_to_delivery.clone(),
        );
        let partitions_active = Gauge::default();
        registry.register(
            "partitions_active",
            "Partitions with a running delivery task on this instance",
            partitions_active.clone(),
        );
        let store_healthy = Gauge::default();
        store_healthy.set(1);
        registry.register(
            "store_healthy",
            "1 while the store can write, 0 after a failed write until it recovers",
            store_healthy.clone(),
        );
        registry.register(
            "build",
            "Herald's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        if let Some(requests) = requests {
            registry.register_collector(Box::new(StoreRequests(requests)));
        }
        let store_calls = Family::<StoreOperationLabels, Counter>::default();
        registry.register(
            "store_calls",
            "Store calls by operation (a method of the store, whatever the backend)",
            store_calls.clone(),
        );
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store calls that failed, by operation and error kind",
            store_errors.clone(),
        );
        let store_durations =
            Family::<StoreOperationLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            });
        registry.register(
            "store_call_duration_seconds",
            "Duration of store calls by operation",
            store_durations.clone(),
        );
        let leases_held = Gauge::default();
        registry.register(
            "partition_leases_held",
            "Partition leases this instance holds (DynamoDB)",
            leases_held.clone(),
        );
        let backlog = crate::backlog::SharedSnapshot::default();
        registry.register_collector(Box::new(Backlog(backlog.clone())));
        Metrics {
            store_calls,
            store_errors,
            store_durations,
            leases_held,
            registry,
            publishes,
            attempts,
            dead_lettered,
            attempt_duration,
            publish_to_delivery,
            partitions_active,
            store_healthy,
            backlog,
        }
    }

    /// Counts a Publish call.
    pub fn publish(&self, outcome: &'static str) {
        self.publishes
            .get_or_create(&PublishLabels { outcome })
            .inc();
    }

    /// Counts a delivery attempt and its duration.
    pub fn attempt(&self, attempt: &Attempt, took: Duration) {
        let labels = match attempt {
            Attempt::Delivered => AttemptLabels {
                outcome: "delivered",
                status_class: "2xx",
            },
            Attempt::Failed { status, .. } => AttemptLabels {
                outcome: "failed",
                status_class: match status.map(|status| status / 100) {
                    Some(2) => "2xx",
                    Some(3) => "3xx",
                    Some(4) => "4xx",
                    Some(5) => "5xx",
                    _ => "none",
                },
            },
        };
        self.attempts.get_or_create(&labels).inc();
        self.attempt_duration.observe(took.as_secs_f64());
    }

    /// Records a successful delivery `latency` after its publish.
    pub fn delivered(&self, latency: Duration) {
        self.publish_to_delivery.observe(latency.as_secs_f64());
    }

    /// Records a store call: its duration and, if it failed, the error's kind.
    pub fn store_call(&self, operation: &'static str, took: Duration, error: Option<&StoreError>) {
        let labels = StoreOperationLabels { operation };
        self.store_calls.get_or_create(&labels).inc();
        self.store_durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(error) = error {
            self.store_errors
                .get_or_create(&StoreErrorLabels {
                    operation,
                    error: error_kind(error),
                })
                .inc();
        }
    }

    /// Counts a dead-lettered delivery.
    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The label of a store error's kind.
fn error_kind(error: &StoreError) -> &'static str {
    match error {
        StoreError::NotFound(_) => "not_found",
        StoreError::Conflict(_) => "conflict",
        StoreError::FailedPrecondition(_) => "failed_precondition",
        StoreError::InvalidArgument(_) => "invalid_argument",
        StoreError::Contention(_) => "contention",
        StoreError::StorageFull(_) => "storage_full",
        StoreError::LimitReached(_) => "limit_reached",
        StoreError::Overloaded(_) => "overloaded",
        StoreError::Corrupt(_) => "corrupt",
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Uncertain(_) => "uncertain",
        StoreError::Partial(_) => "partial",
        StoreError::LeaseLost(_) => "lease_lost",
        StoreError::Internal(_) => "internal",
    }
}

/// `herald_store_requests_total{operation}`, read from the DynamoDB counters at each scrape.
#[derive(Debug)]
struct StoreRequests(Arc<RequestCounts>);

impl Collector for StoreRequests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.snapshot();
        let family = Family::<[(&'static str, String); 1], Counter>::default();
        for (operation, count) in counts {
            family
                .get_or_create(&[("operation", operation)])
                .inc_by(count);
        }
        let metric = encoder.encode_descriptor(
            "store_requests",
            "Requests sent to DynamoDB, per operation (retried attempts included)",
            None,
            MetricType::Counter,
        )?;
        family.encode(metric)?;
        let conflicts = Counter::<u64>::default();
        conflicts.inc_by(self.0.conflicts());
        let metric = encoder.encode_descriptor(
            "store_transaction_conflicts",
            "DynamoDB transactions cancelled for a conflict with another transaction",
            None,
            MetricType::Counter,
        )?;
        conflicts.encode(metric)
    }
}

/// Serves `/metrics` on `listener` until shutdown.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener cannot accept");
                    continue;
                }
            },
            _ = shutdown.fired() => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, request.uri().path())) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"see /metrics\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    page(metrics)
}

/// The exposition of `metrics`, as a response.
pub fn page(metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// The backlog gauges, from the last snapshot (nothing before the first).
#[derive(Debug)]
struct Backlog(crate::backlog::SharedSnapshot);

impl Collector for Backlog {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(snapshot) = self.0.lock().expect("snapshot lock").clone() else {
            return Ok(());
        };
        let now = crate::model::now_millis();
        let pending = Family::<[(&'static str, String); 1], Gauge>::default();
        let dead = Family::<[(&'static str, String); 1], Gauge>::default();
        let oldest = Family::<[(&'static str, String); 1], Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for backlog in &snapshot.subscriptions {
            let labels = [("subscription", backlog.subscription.clone())];
            pending.get_or_create(&labels).set(backlog.pending as i64);
            dead.get_or_create(&labels).set(backlog.dead_letters as i64);
            let age = backlog
                .oldest_pending
                .map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0);
            oldest.get_or_create(&labels).set(age);
        }
        let metric = encoder.encode_descriptor(
            "subscription_pending_deliveries",
            "Deliveries waiting per subscription, dead letters not included (the largest \
             backlogs; the rest summed as subscription=\"_other\")",
            None,
            MetricType::Gauge,
        )?;
        pending.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "subscription_dead_letters",
            "Dead letters kept per subscription",
            None,
            MetricType::Gauge,
        )?;
        dead.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "subscription_oldest_pending_age_seconds",
            "Age of each subscription's oldest pending event (0 when nothing is pending)",
            None,
            MetricType::Gauge,
        )?;
        oldest.encode(metric)?;
        let partitions = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        for state in [
            crate::broker::PartitionState::Idle,
            crate::broker::PartitionState::Delivering,
            crate::broker::PartitionState::Retrying,
            crate::broker::PartitionState::Blocked,
            crate::broker::PartitionState::Paused,
        ] {
            let (slot, label) = crate::backlog::state_slot(state);
            partitions
                .get_or_create(&[("state", label)])
                .set(snapshot.partitions[slot] as i64);
        }
        let metric = encoder.encode_descriptor(
            "partitions",
            "Partitions by state, over every subscription",
            None,
            MetricType::Gauge,
        )?;
        partitions.encode(metric)
    }
}
