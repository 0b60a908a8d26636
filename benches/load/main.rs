//! `make bench`: a load benchmark of Herald against the limits of the machine.
//!
//! In one run it measures, with the same load tool:
//! (a) the publish rate of a tonic server whose Publish does nothing;
//! (b) the rate of raw HTTP POSTs to the receiver at Herald's delivery concurrency;
//! then Herald's publish rate (durable, fan-out 1), its delivery rate over many partitions, the
//! publish-to-delivery latency at half that delivery rate, and the healthy partitions' rate when
//! some endpoints fail. The receiver checks order throughout; a run that breaks order is void.
//!
//! Under `cargo test` (`--test`) it does a smoke run of a few seconds without timing checks.

mod clock;
mod receiver;
mod server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use herald::config::parse_duration;
use herald::proto;
use herald::proto::broker_service_client::BrokerServiceClient;
use tonic::transport::Channel;

use receiver::Receiver;
use server::{Herald, StoreChoice};

/// Load benchmark settings.
#[derive(Debug, Clone, Parser)]
#[command(name = "load", about = "Herald load benchmark")]
struct Args {
    /// Store: embedded or dynamodb (needs HERALD_BENCH_DYNAMODB_ENDPOINT; `make bench` sets it).
    #[arg(long, default_value = "embedded")]
    store: StoreChoice,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// Topics of the delivery phases.
    #[arg(long, default_value_t = 10)]
    topics: usize,
    /// Subscriptions per topic in the delivery phases.
    #[arg(long, default_value_t = 100)]
    subscriptions_per_topic: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Length of the timed publish phases.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Events per topic in the delivery phases.
    #[arg(long, default_value_t = 100)]
    events_per_topic: usize,
    /// Share of requests failed by the failing endpoints (one subscription in ten) in the
    /// failure phase.
    #[arg(long, default_value_t = 0.2)]
    failure_rate: f64,
    /// Pending deliveries to build up for the backlog phase (embedded store; 0 skips it).
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// Herald's --delivery-concurrency.
    #[arg(long, default_value_t = 256)]
    delivery_concurrency: usize,
    /// Deliveries per second of the latency phase; 0 (the default): half the measured
    /// delivery rate. A fixed rate compares runs whose delivery rates differ.
    #[arg(long, default_value_t = 0.0)]
    latency_rate: f64,
    /// Run a short smoke test instead (the default unless `--bench` is given, as under
    /// `cargo test`).
    #[arg(long, hide = true)]
    test: bool,
    /// Set by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
    /// Test-name filters that `cargo test`/`cargo bench` pass through; ignored.
    #[arg(hide = true)]
    filters: Vec<String>,
}

/// One publish phase's figures.
struct PublishFigures {
    published: usize,
    elapsed: Duration,
    latencies: Vec<u32>,
}

impl PublishFigures {
    fn rate(&self) -> f64 {
        self.published as f64 / self.elapsed.as_secs_f64()
    }
}

/// Publishes from `publishers` concurrent tasks round-robin over `topics` until `duration`
/// passes (or `total` events are sent), at most `pace` events per second overall.
async fn publish_load(
    clients: &[BrokerServiceClient<Channel>],
    publishers: usize,
    topics: &[String],
    payload: usize,
    duration: Duration,
    total: Option<usize>,
    pace: Option<f64>,
) -> PublishFigures {
    let started = Instant::now();
    let deadline = started + duration;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for publisher in 0..publishers {
        let mut client = clients[publisher % clients.len()].clone();
        let topics = topics.to_vec();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if total.is_some_and(|total| index >= total) || Instant::now() >= deadline {
                    break;
                }
                if let Some(pace) = pace {
                    let slot = started + Duration::from_secs_f64(index as f64 / pace);
                    // A slot past the deadline is not used: the phase stops on time.
                    if slot >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(slot.into()).await;
                }
                let topic = &topics[index % topics.len()];
                let mut body = vec![b' '; payload.max(8)];
                let sent = clock::micros();
                body[..8].copy_from_slice(&sent.to_le_bytes());
                let result = client
                    .publish(proto::PublishRequest {
                        topic: topic.clone(),
                        payload: body,
                        content_type: "application/octet-stream".into(),
                        ..Default::default()
                    })
                    .await;
                if let Err(status) = result {
                    panic!("publish failed: {status:?}");
                }
                latencies.push((clock::micros() - sent).min(u32::MAX as u64) as u32);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("publisher"));
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    PublishFigures {
        published: latencies.len(),
        elapsed,
        latencies,
    }
}

/// POSTs to the receiver from `concurrency` loops for `duration`; returns requests per second.
async fn raw_post_rate(
    receiver: &Receiver,
    concurrency: usize,
    payload: usize,
    duration: Duration,
) -> f64 {
    // The client Herald delivers with (hyper's pooled client, the same settings), so that
    // (b) is the ceiling of this machine for Herald's own HTTP path.
    let rules = herald::delivery::endpoint_policy::AddressRules {
        policy: herald::delivery::endpoint_policy::EndpointPolicy::AllowPrivate,
        allow: Vec::new(),
    };
    let client = herald::delivery::webhook::client(std::sync::Arc::new(rules), concurrency);
    let uri: http::Uri = format!("http://{}/raw", receiver.address).parse().unwrap();
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let request = http::Request::post(uri.clone())
                    .header("content-type", "application/octet-stream")
                    .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                        b' ';
                        payload
                    ])))
                    .unwrap();
                let response = client.request(request).await.expect("raw POST");
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                sent += 1;
            }
            sent
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// The backlog phase's figures.
struct BacklogFigures {
    pending: u64,
    publish_rate: f64,
    rss_with_backlog: Option<f64>,
    first_page_ms: f64,
    restart_to_first_delivery: Duration,
    drain_rate: f64,
    peak_rss_after_restart: Option<f64>,
}

/// Builds a backlog while the endpoints hold every request, measures memory and ListPending on
/// it, then kills the server, restarts it with the endpoints answering, and drains it.
async fn backlog_phase(args: &Args, receiver: &Receiver, herald: &mut Herald) -> BacklogFigures {
    receiver.set_hold(true);
    let herald_clients = clients(herald.address, 8).await;
    let mut admin = herald_clients[0].clone();
    let backlog_topics = topics("b", args.topics);
    // Held requests outlast the publishing: a 5-minute request timeout.
    let subscriptions = subscribe_all(
        &mut admin,
        receiver,
        &backlog_topics,
        args.subscriptions_per_topic,
        |_| "hold",
        300,
    )
    .await;
    let events = (args.backlog as usize).div_ceil(args.subscriptions_per_topic);
    let pending = (events * args.subscriptions_per_topic) as u64;
    let published = publish_load(
        &herald_clients,
        args.publishers,
        &backlog_topics,
        args.payload,
        Duration::from_secs(86400),
        Some(events),
        None,
    )
    .await;
    let rss_with_backlog = herald.rss_mib();
    let mut page_times = Vec::new();
    for _ in 0..21 {
        let started = clock::micros();
        let page = admin
            .list_pending(proto::ListPendingRequest {
                subscription_id: subscriptions[0].clone(),
                page_size: 50,
                ..Default::default()
            })
            .await
            .expect("list pending")
            .into_inner();
        assert_eq!(page.deliveries.len(), 50.min(events));
        page_times.push((clock::micros() - started) as u32);
    }
    page_times.sort_unstable();

    receiver.set_hold(false);
    receiver.reset();
    let restarted = Instant::now();
    herald.kill_and_restart().await;
    let first = wait_for(&receiver.delivered, 1, Duration::from_secs(600)).await;
    let drained = wait_for(&receiver.delivered, pending, Duration::from_secs(3600)).await;
    BacklogFigures {
        pending,
        publish_rate: published.rate(),
        rss_with_backlog,
        first_page_ms: clock::percentile_ms(&page_times, 50.0),
        restart_to_first_delivery: first - restarted,
        drain_rate: pending as f64 / (drained - first).as_secs_f64(),
        peak_rss_after_restart: herald.peak_rss_mib(),
    }
}

async fn clients(address: std::net::SocketAddr, count: usize) -> Vec<BrokerServiceClient<Channel>> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect");
        clients.push(BrokerServiceClient::new(channel).max_decoding_message_size(8 << 20));
    }
    clients
}

/// Creates `per_topic` subscriptions on each topic, the `index`-th one at the receiver path
/// `/{kind(index)}/...` (`ok`, `fail` or `hold`), and returns their ids.
/// Requests per operation between two snapshots.
fn operation_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(operation, count)| {
            let earlier = before.get(operation).copied().unwrap_or(0);
            (operation.clone(), count.saturating_sub(earlier))
        })
        .filter(|(_, count)| *count > 0)
        .collect()
}

async fn subscribe_all(
    client: &mut BrokerServiceClient<Channel>,
    receiver: &Receiver,
    topics: &[String],
    per_topic: usize,
    kind: impl Fn(usize) -> &'static str,
    request_timeout_seconds: i64,
) -> Vec<String> {
    // Concurrently: on DynamoDB each Subscribe waits out the subscription-cache validity
    // (about a second), and concurrent calls share their transaction and their wait.
    let mut calls = tokio::task::JoinSet::new();
    for topic in topics {
        for index in 0..per_topic {
            let kind = kind(index);
            let request = proto::SubscribeRequest {
                endpoint: format!("http://{}/{kind}/{topic}/{index}", receiver.address),
                topics: vec![topic.clone()],
                retry_policy: Some(proto::RetryPolicy {
                    initial_backoff: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 10_000_000,
                    }),
                    max_backoff: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 200_000_000,
                    }),
                    max_attempts: 1000,
                    request_timeout: Some(prost_types::Duration {
                        seconds: request_timeout_seconds,
                        nanos: 0,
                    }),
                }),
                ..Default::default()
            };
            let mut client = client.clone();
            let position = calls.len();
            calls.spawn(async move {
                let subscription = client.subscribe(request).await.expect("subscribe");
                (position, subscription.into_inner().id)
            });
        }
    }
    let mut ids = calls.join_all().await;
    ids.sort();
    let ids: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    ids
}

/// Waits until `counter` reaches `target` (or `limit` passes); returns when it got there.
async fn wait_for(counter: &std::sync::atomic::AtomicU64, target: u64, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    while counter.load(Ordering::SeqCst) < target {
        if Instant::now() > deadline {
            panic!(
                "gave up waiting: {} of {target} deliveries after {limit:?}",
                counter.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Instant::now()
}

fn topics(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|index| format!("{prefix}{index}")).collect()
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    // `cargo bench` passes --bench; `cargo test` runs this target without it.
    args.test |= !args.bench;
    if args.test {
        // Smoke run for `cargo test`: tiny and short, no figures judged.
        args.publishers = 4;
        args.topics = 2;
        args.subscriptions_per_topic = 3;
        args.duration = Duration::from_millis(500);
        args.events_per_topic = 5;
        args.delivery_concurrency = 16;
    }
    clock::micros();
    let receiver = Receiver::start().await;
    let partitions = args.topics * args.subscriptions_per_topic;
    let post_concurrency = partitions.min(args.delivery_concurrency);

    eprintln!("load: baseline (a)");
    // (a) A Publish that does nothing, behind the same tonic stack and load tool.
    let (empty_address, empty_stop) = server::start_empty_broker().await;
    let empty_clients = clients(empty_address, 8).await;
    let empty = publish_load(
        &empty_clients,
        args.publishers,
        &topics("a", 1),
        args.payload,
        args.duration,
        None,
        None,
    )
    .await;
    let _ = empty_stop.send(());

    eprintln!("load: baseline (b)");
    // (b) The receiver hit directly.
    let raw_rate = raw_post_rate(&receiver, post_concurrency, args.payload, args.duration).await;
    receiver.reset();

    let herald = Herald::start(args.store, args.delivery_concurrency).await;
    let herald_clients = clients(herald.address, 8).await;
    let mut admin = herald_clients[0].clone();

    eprintln!("load: phase 1");
    // 1. Publish rate, durable, fan-out 1. The endpoints hold their first request, so no
    // delivery competes with the publishes; they are drained afterwards.
    let publish_topics = topics("p", args.topics);
    receiver.set_hold(true);
    subscribe_all(&mut admin, &receiver, &publish_topics, 1, |_| "hold", 10).await;
    let requests_before = herald.dynamodb_requests();
    let operations_before = herald.dynamodb_by_operation();
    let cpu_before = herald.cpu_seconds();
    let publish = publish_load(
        &herald_clients,
        args.publishers,
        &publish_topics,
        args.payload,
        args.duration,
        None,
        None,
    )
    .await;
    let publish_cpu = cpu_per_event(cpu_before, herald.cpu_seconds(), publish.published as u64);
    let publish_requests = herald.dynamodb_requests().saturating_sub(requests_before);
    let publish_operations = operation_delta(&operations_before, &herald.dynamodb_by_operation());
    receiver.set_hold(false);
    wait_for(
        &receiver.delivered,
        publish.published as u64,
        Duration::from_secs(600),
    )
    .await;
    receiver.reset();

    eprintln!("load: phase 2");
    // 2. Delivery rate over topics x subscriptions partitions.
    let delivery_topics = topics("d", args.topics);
    subscribe_all(
        &mut admin,
        &receiver,
        &delivery_topics,
        args.subscriptions_per_topic,
        |_| "ok",
        10,
    )
    .await;
    let events = args.topics * args.events_per_topic;
    let expected = (events * args.subscriptions_per_topic) as u64;
    let requests_before = herald.dynamodb_requests();
    let operations_before = herald.dynamodb_by_operation();
    let cpu_before = herald.cpu_seconds();
    let started = Instant::now();
    publish_load(
        &herald_clients,
        args.publishers,
        &delivery_topics,
        args.payload,
        Duration::from_secs(3600),
        Some(events),
        None,
    )
    .await;
    let finished = wait_for(&receiver.delivered, expected, Duration::from_secs(1800)).await;
    let delivery_cpu = cpu_per_event(cpu_before, herald.cpu_seconds(), expected);
    let delivery_requests = herald.dynamodb_requests().saturating_sub(requests_before);
    let delivery_operations = operation_delta(&operations_before, &herald.dynamodb_by_operation());
    // Two clocks: from the first publish (what a publisher waits) and from the first delivery
    // (the delivery rate proper, comparable with the backlog's drain).
    let delivery_rate = expected as f64 / (finished - started).as_secs_f64();
    let first_delivery = receiver
        .first_delivered_at
        .lock()
        .unwrap()
        .expect("phase 2 delivered");
    let drain_like_rate = expected as f64 / (finished - first_delivery).as_secs_f64();
    receiver.reset();

    eprintln!("load: phase 3");
    // 3. Publish-to-delivery latency at half the delivery rate (or the rate asked for).
    let latency_rate = if args.latency_rate > 0.0 {
        args.latency_rate
    } else {
        0.5 * delivery_rate
    };
    let pace = latency_rate / args.subscriptions_per_topic as f64;
    let cpu_before = herald.cpu_seconds();
    let paced = publish_load(
        &herald_clients,
        args.publishers,
        &delivery_topics,
        args.payload,
        args.duration,
        None,
        Some(pace),
    )
    .await;
    let paced_deliveries = (paced.published * args.subscriptions_per_topic) as u64;
    wait_for(
        &receiver.delivered,
        paced_deliveries,
        Duration::from_secs(600),
    )
    .await;
    let latency_cpu = cpu_per_event(cpu_before, herald.cpu_seconds(), paced_deliveries);
    let mut latencies = std::mem::take(&mut *receiver.latencies.lock().unwrap());
    for slow in receiver
        .slow
        .lock()
        .unwrap()
        .iter()
        .filter(|slow| slow.2.starts_with('d'))
        .take(20)
    {
        eprintln!("slow delivery: {slow:?}");
    }
    latencies.sort_unstable();
    receiver.reset();

    eprintln!("load: phase 4");
    // 4. Healthy partitions' rate while one subscription in ten fails a share of requests.
    receiver.set_failure_rate(args.failure_rate);
    let failure_topics = topics("f", args.topics);
    subscribe_all(
        &mut admin,
        &receiver,
        &failure_topics,
        args.subscriptions_per_topic,
        |index| if index % 10 == 9 { "fail" } else { "ok" },
        10,
    )
    .await;
    let healthy_per_topic = (0..args.subscriptions_per_topic)
        .filter(|index| index % 10 != 9)
        .count();
    let healthy_expected = (events * healthy_per_topic) as u64;
    let started = Instant::now();
    publish_load(
        &herald_clients,
        args.publishers,
        &failure_topics,
        args.payload,
        Duration::from_secs(3600),
        Some(events),
        None,
    )
    .await;
    let finished = wait_for(
        &receiver.delivered_healthy,
        healthy_expected,
        Duration::from_secs(1800),
    )
    .await;
    let healthy_rate = healthy_expected as f64 / (finished - started).as_secs_f64();
    let healthy_share = healthy_per_topic as f64 / args.subscriptions_per_topic as f64;
    let all_expected = (events * args.subscriptions_per_topic) as u64;
    wait_for(&receiver.delivered, all_expected, Duration::from_secs(1800)).await;
    let failed = receiver.failed.load(Ordering::SeqCst);

    let peak_rss = herald.peak_rss_mib();
    let mut herald = herald;
    let backlog = if args.backlog > 0 && matches!(args.store, StoreChoice::Embedded) {
        eprintln!("load: backlog");
        Some(backlog_phase(&args, &receiver, &mut herald).await)
    } else {
        None
    };
    let request_breakdown = herald.dynamodb_breakdown();
    let conflicts = herald.dynamodb_conflicts();
    herald.stop().await;

    let ms =
        |figures: &PublishFigures, percentile| clock::percentile_ms(&figures.latencies, percentile);
    println!();
    println!(
        "Herald load benchmark: store={:?}, {} publishers, {} B payloads, {} topics x {} subscriptions, delivery concurrency {}",
        args.store,
        args.publishers,
        args.payload,
        args.topics,
        args.subscriptions_per_topic,
        args.delivery_concurrency
    );
    println!("| figure | value |");
    println!("| --- | --- |");
    println!(
        "| (a) empty-handler publishes/s | {:.0} (p50 {:.2} ms, p99 {:.2} ms) |",
        empty.rate(),
        ms(&empty, 50.0),
        ms(&empty, 99.0)
    );
    println!(
        "| Herald publishes/s (durable, fan-out 1, deliveries held) | {:.0} = {:.0}% of (a) |",
        publish.rate(),
        100.0 * publish.rate() / empty.rate()
    );
    println!(
        "| Herald publish latency p50 / p99 | {:.2} ms / {:.2} ms |",
        ms(&publish, 50.0),
        ms(&publish, 99.0)
    );
    println!("| (b) raw POSTs/s to the receiver ({post_concurrency} concurrent) | {raw_rate:.0} |");
    println!(
        "| Herald deliveries/s ({partitions} partitions, {expected} deliveries), clock from the first publish | {delivery_rate:.0} = {:.0}% of (b) |",
        100.0 * delivery_rate / raw_rate
    );
    println!(
        "| the same, clock from the first delivery | {drain_like_rate:.0} = {:.0}% of (b) |",
        100.0 * drain_like_rate / raw_rate
    );
    println!(
        "| publish-to-delivery at {:.0} deliveries/s: p50 / p99 / p999 | {:.2} ms / {:.2} ms / {:.2} ms ({} samples) |",
        pace * args.subscriptions_per_topic as f64,
        clock::percentile_ms(&latencies, 50.0),
        clock::percentile_ms(&latencies, 99.0),
        clock::percentile_ms(&latencies, 99.9),
        latencies.len()
    );
    println!(
        "| healthy deliveries/s with 1 in 10 endpoints failing {:.0}% ({failed} failures) | {healthy_rate:.0} = {:.0}% of the no-failure rate for the same share ({:.0}) |",
        args.failure_rate * 100.0,
        100.0 * healthy_rate / (delivery_rate * healthy_share),
        delivery_rate * healthy_share
    );
    match (publish_cpu, delivery_cpu, latency_cpu) {
        (Some(publish_cpu), Some(delivery_cpu), Some(latency_cpu)) => {
            println!(
                "| Herald CPU (user + system) per acknowledged publish, phase 1 | {publish_cpu:.1} µs |"
            );
            println!(
                "| Herald CPU per delivery, phase 2 (its publishes included: {events} events, {expected} deliveries) | {delivery_cpu:.1} µs |"
            );
            println!(
                "| Herald CPU per delivery, phase 3 (paced, publishes included) | {latency_cpu:.1} µs |"
            );
        }
        _ => println!("| Herald CPU per event | not measured (server in-process) |"),
    }
    match peak_rss {
        Some(rss) => println!("| peak RSS of the server | {rss:.1} MiB |"),
        None => println!("| peak RSS of the server | not measured (server in-process) |"),
    }
    if let Some(breakdown) = request_breakdown {
        println!(
            "| DynamoDB requests per publish, all-in during phase 1 | {:.2} |",
            publish_requests as f64 / publish.published as f64
        );
        let publish_cost = publish_requests as f64 / publish.published as f64;
        println!(
            "| DynamoDB requests per delivered event during phase 2, its {events} publishes' requests (at phase 1's rate) taken out | {:.2} |",
            (delivery_requests as f64 - publish_cost * events as f64) / expected as f64
        );
        let per = |operations: &BTreeMap<String, u64>, count: f64| {
            operations
                .iter()
                .map(|(operation, requests)| format!("{operation} {:.3}", *requests as f64 / count))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| DynamoDB requests per publish by operation, phase 1 | {} |",
            per(&publish_operations, publish.published as f64)
        );
        println!(
            "| DynamoDB requests per delivered event by operation, phase 2 (its publishes included) | {} |",
            per(&delivery_operations, expected as f64)
        );
        println!("| DynamoDB requests by operation, whole run | {breakdown} |");
        println!("| DynamoDB transaction conflicts reported, whole run | {conflicts} |");
    }
    if let Some(backlog) = backlog {
        let mib =
            |value: Option<f64>| value.map_or("n/a".to_string(), |value| format!("{value:.1} MiB"));
        println!(
            "| backlog: {} pending deliveries published at | {:.0} publishes/s |",
            backlog.pending, backlog.publish_rate
        );
        println!(
            "| backlog: server RSS holding it | {} |",
            mib(backlog.rss_with_backlog)
        );
        println!(
            "| backlog: first ListPending page (50), median of 21 | {:.2} ms |",
            backlog.first_page_ms
        );
        println!(
            "| backlog: kill -9, restart to first delivery | {:.0} ms |",
            backlog.restart_to_first_delivery.as_secs_f64() * 1000.0
        );
        println!(
            "| backlog: drain rate after restart | {:.0} deliveries/s = {:.0}% of phase 2 from its first delivery |",
            backlog.drain_rate,
            100.0 * backlog.drain_rate / drain_like_rate
        );
        println!(
            "| backlog: peak RSS of the restarted server | {} |",
            mib(backlog.peak_rss_after_restart)
        );
    }
    let violations = receiver.order_violations.load(Ordering::SeqCst);
    println!("| order violations seen by the receiver | {violations} |");
    println!(
        "| repeated deliveries (at-least-once) | {} |",
        receiver.repeats.load(Ordering::SeqCst)
    );
    if violations > 0 {
        eprintln!("ORDER BROKEN: this run is void");
        std::process::exit(1);
    }
    if args.test {
        println!("1 passed, 0 failed");
    }
}

/// Microseconds of server CPU per event between two readings, if both were taken.
fn cpu_per_event(before: Option<f64>, after: Option<f64>, events: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (events > 0).then(|| (after - before) * 1e6 / events as f64)
}
