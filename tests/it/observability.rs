//! Metrics and logs: a real server's `/metrics` after a known run (checked by Prometheus's own
//! `promtool check metrics`), the store-health gauge, and JSON log lines.

use std::time::Duration;

use crate::support::metrics::{sample, scrape};
use crate::support::receiver::{Receiver, Reply};
use crate::support::{
    Backend, Deployment, HeraldProcess, all_pending, connect, eventually, publish_request,
    subscribe_request,
};

/// `promtool check metrics` (Prometheus's linter), installed by scripts/test.sh.
fn promtool_check(scrape: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test.sh installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_run_and_pass_promtool() {
    // One receiver fails each event's first attempt; another always fails (dead letters).
    let flaky = Receiver::scripted(|request| {
        if request.attempt == 1 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let broken = Receiver::scripted(|_| Reply::Status(404)).await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let server = HeraldProcess::start_with(&deployment, &["--metrics-listen", "127.0.0.1:0"]).await;
    let url = server.metrics_url.clone().expect("metrics url");
    let mut client = connect(server.address).await;
    client
        .subscribe(subscribe_request(&flaky.url(), &["t"]))
        .await
        .unwrap();
    let mut once = subscribe_request(&broken.url(), &["t"]);
    once.retry_policy.as_mut().unwrap().max_attempts = 1;
    let dead = client.subscribe(once).await.unwrap().into_inner();
    for index in 0..3 {
        let mut request = publish_request("t", format!("event {index}"));
        request.idempotency_key = format!("key-{index}");
        client.publish(request).await.unwrap();
    }
    let mut again = publish_request("t", "event 0");
    again.idempotency_key = "key-0".into();
    assert!(client.publish(again).await.unwrap().into_inner().duplicate);

    eventually(Duration::from_secs(20), "the run is done", || async {
        let dead_lettered = all_pending(&mut client.clone(), &dead.id)
            .await
            .iter()
            .filter(|delivery| delivery.dead_lettered)
            .count();
        // The receivers count a request when it arrives, the server once the answer is back
        // (and a dead letter once it is recorded): a moment later.
        let text = scrape(&url).await;
        let counted = sample(&text, "herald_delivery_attempt_duration_seconds_count") >= Some(9.0)
            && sample(&text, "herald_deliveries_dead_lettered_total") >= Some(3.0);
        flaky.delivered_count() == 3 && dead_lettered == 3 && counted
    })
    .await;
    let text = scrape(&url).await;
    assert_eq!(
        sample(&text, "herald_publishes_total{outcome=\"stored\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "herald_publishes_total{outcome=\"duplicate\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "herald_delivery_attempts_total{outcome=\"delivered\",status_class=\"2xx\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "herald_delivery_attempts_total{outcome=\"failed\",status_class=\"5xx\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "herald_delivery_attempts_total{outcome=\"failed\",status_class=\"4xx\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "herald_deliveries_dead_lettered_total"),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "herald_publish_to_delivery_seconds_count"),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "herald_delivery_attempt_duration_seconds_count"),
        Some(9.0)
    );
    assert_eq!(sample(&text, "herald_store_healthy"), Some(1.0));
    assert!(
        text.contains(&format!(
            "herald_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    promtool_check(&text);
    server.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_requests_are_counted_per_operation() {
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let server = HeraldProcess::start_with(&deployment, &["--metrics-listen", "127.0.0.1:0"]).await;
    let url = server.metrics_url.clone().expect("metrics url");
    let mut client = connect(server.address).await;
    // A receiver that hangs keeps its partition's lease held.
    let hanging = Receiver::scripted(|_| Reply::Hang).await;
    client
        .subscribe(subscribe_request(&hanging.url(), &["t"]))
        .await
        .unwrap();
    client.publish(publish_request("t", "x")).await.unwrap();
    let missing = client
        .get_subscription(herald::proto::GetSubscriptionRequest {
            id: "sub_missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    eventually(Duration::from_secs(10), "a lease is held", || async {
        sample(&scrape(&url).await, "herald_partition_leases_held") == Some(1.0)
    })
    .await;
    let text = scrape(&url).await;
    let transactions = sample(
        &text,
        "herald_store_requests_total{operation=\"TransactWriteItems\"}",
    )
    .expect("TransactWriteItems counted");
    assert!(transactions >= 1.0, "{text}");
    // The same calls, seen at the store's own interface, whatever the backend.
    assert_eq!(
        sample(&text, "herald_store_calls_total{operation=\"publish\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "herald_store_call_duration_seconds_count{operation=\"publish\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "herald_store_errors_total{operation=\"get_subscription\",error=\"not_found\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "herald_store_calls_total{operation=\"claim_lease\"}") >= Some(1.0));
    promtool_check(&text);
    server.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_event_fields() {
    let receiver = Receiver::scripted(|_| Reply::Status(500)).await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(deployment.data_dir.path())
        .env("HERALD_LOG", "herald=debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = stdout.next_line().await.unwrap().unwrap();
    let address = line
        .strip_prefix("herald listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let mut client = connect(address).await;
    client
        .subscribe(subscribe_request(&receiver.url(), &["t"]))
        .await
        .unwrap();
    client.publish(publish_request("t", "x")).await.unwrap();
    // The debug line of a failed attempt carries the partition and sequence as keys.
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        let mut lines = 0;
        while let Some(line) = stderr.next_line().await.unwrap() {
            lines += 1;
            let object: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            if object["message"] == "delivery failed" {
                return (object, lines);
            }
        }
        panic!("stderr closed");
    })
    .await
    .expect("a failed attempt is logged");
    let (object, _) = found;
    let partition = object["partition"].as_str().unwrap_or_default();
    assert!(partition.starts_with("t#sub_"), "{object}");
    assert!(object["sequence"].as_u64().is_some(), "{object}");
    assert_eq!(object["level"], "DEBUG");
    child.kill().await.unwrap();
}

async fn a_traceparent_given_to_publish_reaches_every_attempt_as_a_child_span(backend: Backend) {
    let receiver = Receiver::scripted(|request| {
        if request.attempt == 1 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let app = crate::support::spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    client
        .subscribe(subscribe_request(&receiver.url(), &["t"]))
        .await
        .unwrap();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = tonic::Request::new(publish_request("t", "x"));
    request
        .metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    request
        .metadata_mut()
        .insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
    client.publish(request).await.unwrap();
    // And an event without a trace context gets no traceparent.
    client.publish(publish_request("t", "y")).await.unwrap();
    eventually(Duration::from_secs(20), "both events delivered", || async {
        receiver.delivered_count() == 2
    })
    .await;
    let received = receiver.received();
    let traced: Vec<_> = received
        .iter()
        .filter(|request| request.body.as_ref() == b"x")
        .collect();
    assert_eq!(traced.len(), 2, "a failed attempt and a successful one");
    let mut spans = std::collections::BTreeSet::new();
    for attempt in &traced {
        let parts: Vec<&str> = attempt.traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{}", attempt.traceparent);
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(
            parts[2], "00f067aa0ba902b7",
            "a child span, not the publisher's"
        );
        assert_eq!(parts[3], "01");
        assert_eq!(attempt.tracestate, "congo=t61rcWkgMzE");
        spans.insert(parts[2].to_string());
    }
    assert_eq!(spans.len(), 2, "a new span per attempt");
    let untraced = received
        .iter()
        .find(|request| request.body.as_ref() == b"y")
        .unwrap();
    assert!(untraced.traceparent.is_empty());
    app.stop().await;
}

mod traced {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        a_traceparent_given_to_publish_reaches_every_attempt_as_a_child_span(Backend::Embedded)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dynamodb() {
        a_traceparent_given_to_publish_reaches_every_attempt_as_a_child_span(Backend::Dynamodb)
            .await;
    }
}

/// A real Prometheus server (Debian's `prometheus`, which `make test` installs) scrapes a
/// running Herald, and PromQL queries through its HTTP API return the counts of a known run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_herald_and_answers_queries() {
    use tokio::io::AsyncBufReadExt;
    let receiver = Receiver::start().await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let server = HeraldProcess::start_with(&deployment, &["--metrics-listen", "127.0.0.1:0"]).await;
    let target = server
        .metrics_url
        .clone()
        .expect("metrics url")
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let mut client = connect(server.address).await;
    client
        .subscribe(subscribe_request(&receiver.url(), &["prom:*"]))
        .await
        .unwrap();
    for index in 0..5 {
        client
            .publish(publish_request("prom:run", format!("event {index}")))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "five deliveries", || async {
        receiver.delivered_count() == 5
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: herald\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (scripts/prometheus-tools.sh)");
    let mut lines = tokio::io::BufReader::new(prometheus.stderr.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("msg=\"Listening on\"") {
                return line.rsplit("address=").next().unwrap().trim().to_string();
            }
        }
        panic!("prometheus exited before listening");
    })
    .await
    .expect("prometheus listens in time");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let query = |promql: &'static str| {
        let url = url::Url::parse_with_params(
            &format!("http://{address}/api/v1/query"),
            &[("query", promql)],
        )
        .expect("query url");
        async move {
            let text = reqwest::Client::new()
                .get(url)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let body: serde_json::Value = serde_json::from_str(&text).ok()?;
            body["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|value| value.parse::<f64>().ok())
        }
    };
    eventually(
        Duration::from_secs(30),
        "Prometheus has scraped Herald",
        || async { query("up{job=\"herald\"}").await == Some(1.0) },
    )
    .await;
    assert_eq!(
        query("herald_publishes_total{job=\"herald\",outcome=\"stored\"}").await,
        Some(5.0)
    );
    assert_eq!(
        query("sum(herald_delivery_attempts_total{job=\"herald\",outcome=\"delivered\"})").await,
        Some(5.0)
    );
    assert_eq!(query("herald_build_info{job=\"herald\"}").await, Some(1.0));
    let _ = prometheus.kill().await;
    server.terminate(Duration::from_secs(10)).await;
}

/// The backlog gauges: pending deliveries, dead letters and the oldest pending age per
/// subscription (the largest under their own label, the rest summed as `_other`), and
/// partitions by state, including a blocked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_gauges_show_a_blocked_partition_and_bound_their_labels() {
    let failing = Receiver::scripted(|_| Reply::Status(500)).await;
    let healthy = Receiver::start().await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let server = HeraldProcess::start_with(
        &deployment,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-backlog-interval",
            "200ms",
            "--metrics-max-subscriptions",
            "1",
        ],
    )
    .await;
    let url = server.metrics_url.clone().expect("metrics url");
    let mut client = connect(server.address).await;
    let mut blocking = subscribe_request(&failing.url(), &["gauge:a"]);
    blocking.on_exhausted = herald::proto::OnExhausted::Block as i32;
    blocking.retry_policy.as_mut().unwrap().max_attempts = 1;
    let blocked = client.subscribe(blocking).await.unwrap().into_inner();
    let mut parking = subscribe_request(&failing.url(), &["gauge:b"]);
    parking.retry_policy.as_mut().unwrap().max_attempts = 1;
    client.subscribe(parking).await.unwrap();
    client
        .subscribe(subscribe_request(&healthy.url(), &["gauge:c"]))
        .await
        .unwrap();
    for topic in [
        "gauge:a", "gauge:a", "gauge:a", "gauge:b", "gauge:b", "gauge:c",
    ] {
        client.publish(publish_request(topic, "{}")).await.unwrap();
    }
    let blocked_series = format!(
        "herald_subscription_pending_deliveries{{subscription=\"{}\"}}",
        blocked.id
    );
    eventually(Duration::from_secs(20), "the gauges show the run", || {
        let url = url.clone();
        let blocked_series = blocked_series.clone();
        async move {
            let text = scrape(&url).await;
            sample(&text, &blocked_series) == Some(3.0)
                && sample(
                    &text,
                    "herald_subscription_dead_letters{subscription=\"_other\"}",
                ) == Some(2.0)
                && sample(&text, "herald_partitions{state=\"blocked\"}") == Some(1.0)
                && sample(&text, "herald_partitions{state=\"idle\"}") == Some(2.0)
        }
    })
    .await;
    let text = scrape(&url).await;
    let age = sample(
        &text,
        &format!(
            "herald_subscription_oldest_pending_age_seconds{{subscription=\"{}\"}}",
            blocked.id
        ),
    )
    .expect("an oldest-age sample");
    assert!(age > 0.0, "{age}");
    // One subscription under its own label, the other two summed.
    assert_eq!(
        text.lines()
            .filter(|line| line.starts_with("herald_subscription_pending_deliveries{"))
            .count(),
        2,
        "{text}"
    );
    promtool_check(&text);
    server.terminate(Duration::from_secs(10)).await;
}

/// Spans collected by a real OTLP trace receiver (the collector's gRPC service).
#[derive(Default)]
struct Collector {
    spans: std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// With `--otlp-endpoint`, Herald's spans reach an OTLP receiver: the publish span is a child
/// of the publisher's span, its store calls are children of it, and the delivery attempt's
/// span is the parent the receiver is told about in `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_join_the_publishers_trace() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let collector = std::sync::Arc::new(Collector::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::from_arc(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let receiver = Receiver::start().await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let endpoint = format!("http://{otlp}");
    let server =
        HeraldProcess::start_with(&deployment, &["--otlp-endpoint", endpoint.as_str()]).await;
    let mut client = connect(server.address).await;
    client
        .subscribe(subscribe_request(&receiver.url(), &["otel"]))
        .await
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let publisher_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(publish_request("otel", "x"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{publisher_span}-01")
            .parse()
            .unwrap(),
    );
    client.publish(request).await.unwrap();
    eventually(Duration::from_secs(10), "delivered", || async {
        receiver.delivered_count() == 1
    })
    .await;
    let told = receiver.delivered()[0].traceparent.clone();
    let parts: Vec<&str> = told.split('-').collect();
    assert_eq!(parts[1], trace_id, "{told}");
    let attempt_span = parts[2].to_string();
    // Stopping flushes the spans still batched.
    server.terminate(Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "the spans are exported",
        || async {
            collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .any(|span| span.name == "deliver")
        },
    )
    .await;
    let spans = collector.spans.lock().unwrap().clone();
    let named = |name: &str| {
        spans
            .iter()
            .filter(|span| span.name == name && hex(&span.trace_id) == trace_id)
            .cloned()
            .collect::<Vec<_>>()
    };
    let publish = named("publish");
    assert_eq!(publish.len(), 1, "{spans:?}");
    assert_eq!(hex(&publish[0].parent_span_id), publisher_span);
    let publish_id = publish[0].span_id.clone();
    assert!(
        named("store")
            .iter()
            .any(|span| span.parent_span_id == publish_id),
        "the publish's store call is a child of it: {spans:?}"
    );
    let deliver = named("deliver");
    assert_eq!(deliver.len(), 1, "{spans:?}");
    assert_eq!(
        hex(&deliver[0].span_id),
        attempt_span,
        "the receiver's parent"
    );
    assert_eq!(hex(&deliver[0].parent_span_id), publisher_span);
}
