//! The chaos test: three instances on one DynamoDB table, concurrent publishers on all three,
//! receivers that fail and answer slowly at random, and a cycle of faults every 20 s: one
//! instance killed -9 and restarted, one paused (SIGSTOP) past its lease, one stopped with
//! SIGTERM and restarted. The publishers' acknowledgements and every request the receivers got
//! are written to JSON Lines files and judged by an independent program,
//! `scripts/chaos_check.py` (lost events, out-of-order first deliveries, chain breaks,
//! duplicates, overlapping requests, latency after each fault).
//!
//! `make test` runs one 20 s cycle; `make chaos` runs `HERALD_CHAOS_SECONDS` (default 120).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::proto::broker_service_client::BrokerServiceClient;
use rand::Rng;
use serde_json::json;
use tonic::transport::Channel;

use crate::support::receiver::Received;
use crate::support::{
    Backend, Deployment, HeraldProcess, Receiver, Reply, connect, eventually, publish_request,
    subscribe_request,
};

/// The test deployment's lease (see `support`); pauses last longer than it.
const LEASE: Duration = Duration::from_secs(2);
const TOPICS: [&str; 4] = ["t0", "t1", "t2", "t3"];
const PUBLISHERS: usize = 6;
/// One fault cycle: kill -9 at 3 s, SIGSTOP at 8 s (for lease + 3 s), SIGTERM at 14 s.
const CYCLE: Duration = Duration::from_secs(20);

/// The instances, restartable; `None` while one is down.
struct Fleet {
    deployment: Deployment,
    processes: Vec<Option<HeraldProcess>>,
    addresses: Arc<Mutex<Vec<Option<SocketAddr>>>>,
}

impl Fleet {
    async fn start(deployment: Deployment, size: usize) -> Fleet {
        let mut processes = Vec::new();
        for _ in 0..size {
            processes.push(Some(HeraldProcess::start(&deployment).await));
        }
        let addresses = processes
            .iter()
            .map(|process| process.as_ref().map(|process| process.address))
            .collect();
        Fleet {
            deployment,
            processes,
            addresses: Arc::new(Mutex::new(addresses)),
        }
    }

    fn take(&mut self, index: usize) -> HeraldProcess {
        self.addresses.lock().unwrap()[index] = None;
        self.processes[index].take().expect("instance running")
    }

    async fn restart(&mut self, index: usize) {
        let process = HeraldProcess::start(&self.deployment).await;
        self.addresses.lock().unwrap()[index] = Some(process.address);
        self.processes[index] = Some(process);
    }

    fn process(&self, index: usize) -> &HeraldProcess {
        self.processes[index].as_ref().expect("instance running")
    }
}

/// Writes JSON Lines.
fn write_lines(path: &std::path::Path, lines: &[serde_json::Value]) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
}

/// Publishes until `until`, each publish on a random live instance, retried on another with
/// the same idempotency key until acknowledged. Returns the acknowledgements as JSON lines.
async fn publisher(
    number: usize,
    addresses: Arc<Mutex<Vec<Option<SocketAddr>>>>,
    subscribers: Arc<BTreeMap<&'static str, Vec<String>>>,
    origin: Instant,
    until: Instant,
) -> Vec<serde_json::Value> {
    let mut clients: HashMap<SocketAddr, BrokerServiceClient<Channel>> = HashMap::new();
    let mut acknowledgements = Vec::new();
    let mut count = 0;
    while Instant::now() < until {
        count += 1;
        let topic = TOPICS[rand::rng().random_range(0..TOPICS.len())];
        let key = format!("p{number}-{count}");
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < give_up, "publish {key} never acknowledged");
            let live: Vec<SocketAddr> = addresses
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .copied()
                .collect();
            if live.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let address = live[rand::rng().random_range(0..live.len())];
            let client = clients.entry(address).or_insert_with(|| {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                    .unwrap()
                    .connect_timeout(Duration::from_millis(500))
                    .connect_lazy();
                BrokerServiceClient::new(channel)
            });
            let mut request = publish_request(topic, key.clone());
            request.idempotency_key = key.clone();
            let mut request = tonic::Request::new(request);
            request.set_timeout(Duration::from_secs(2));
            match client.publish(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    acknowledgements.push(json!({
                        "topic": topic,
                        "sequence": response.sequence,
                        "event_id": response.event_id,
                        "acked_ms": origin.elapsed().as_secs_f64() * 1000.0,
                        "subscriptions": subscribers[topic],
                        "subscription_count": response.subscription_count,
                    }));
                    break;
                }
                Err(_) => {
                    clients.remove(&address);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let pause = Duration::from_millis(rand::rng().random_range(5..40));
        tokio::time::sleep(pause).await;
    }
    acknowledgements
}

/// The receivers' log as JSON lines, with subscription ids from the request paths.
fn received_lines(
    received: &[Received],
    paths: &HashMap<String, String>,
    origin: Instant,
) -> Vec<serde_json::Value> {
    received
        .iter()
        .map(|request| {
            let arrived = request.at.saturating_duration_since(origin);
            let (answered, status) = match request.reply {
                Reply::Slow(delay) => (arrived + Duration::from_millis(delay), 200),
                Reply::Status(status)
                | Reply::RetryAfter(status, _)
                | Reply::Endless(status)
                | Reply::Body(status, _) => (arrived, status),
                Reply::RedirectToMetadata => (arrived, 307),
                Reply::Hang => (Duration::from_secs(86400), 0),
            };
            json!({
                "subscription": paths[&request.path],
                "topic": request.topic,
                "sequence": request.sequence,
                "previous": request.previous,
                "event_id": request.id,
                "arrived_ms": arrived.as_secs_f64() * 1000.0,
                "answered_ms": answered.as_secs_f64() * 1000.0,
                "status": status,
                "redelivery": !request.redelivery.is_empty(),
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_three_instances_faults_and_an_independent_checker() {
    let seconds: u64 = std::env::var("HERALD_CHAOS_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(CYCLE.as_secs());
    let duration = Duration::from_secs(seconds.max(CYCLE.as_secs()));
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let mut fleet = Fleet::start(deployment, 3).await;

    // 15 % failures, 10 % slow (under a third of the lease, see the README's limits).
    let receiver = Receiver::scripted(|_| {
        let roll = rand::rng().random_range(0..100);
        if roll < 15 {
            Reply::Status(500)
        } else if roll < 25 {
            Reply::Slow(rand::rng().random_range(50..200))
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let patterns: [&[&str]; 3] = [&["t*"], &["t0", "t1"], &["t1", "t2", "t3"]];
    let mut client = connect(fleet.process(0).address).await;
    let mut paths = HashMap::new();
    let mut subscribers: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for (index, topics) in patterns.iter().enumerate() {
        let mut request = subscribe_request(&format!("{}/{index}", receiver.url()), topics);
        let policy = request.retry_policy.as_mut().unwrap();
        policy.max_attempts = 1000;
        let subscription = client.subscribe(request).await.unwrap().into_inner();
        paths.insert(format!("/hook/{index}"), subscription.id.clone());
        for topic in TOPICS {
            // The test's own matcher, not Herald's: the checker compares it with each
            // publish's subscription_count.
            let matches = |pattern: &&str| match pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => *pattern == topic,
            };
            if topics.iter().any(matches) {
                subscribers
                    .entry(topic)
                    .or_default()
                    .push(subscription.id.clone());
            }
        }
    }
    let subscribers = Arc::new(subscribers);

    let origin = Instant::now();
    let until = origin + duration;
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|number| {
            tokio::spawn(publisher(
                number,
                fleet.addresses.clone(),
                subscribers.clone(),
                origin,
                until,
            ))
        })
        .collect();

    let mut faults = Vec::new();
    let at = |origin: Instant| origin.elapsed().as_secs_f64() * 1000.0;
    let mut cycle_start = origin;
    while cycle_start + CYCLE <= until + Duration::from_millis(1) {
        tokio::time::sleep_until((cycle_start + Duration::from_secs(3)).into()).await;
        faults.push(json!({"at_ms": at(origin), "fault": "kill -9", "instance": 0}));
        fleet.take(0).kill_9().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        fleet.restart(0).await;

        tokio::time::sleep_until((cycle_start + Duration::from_secs(8)).into()).await;
        faults.push(json!({"at_ms": at(origin), "fault": "SIGSTOP", "instance": 1}));
        fleet.process(1).signal("STOP");
        tokio::time::sleep(LEASE + Duration::from_secs(3)).await;
        fleet.process(1).signal("CONT");

        tokio::time::sleep_until((cycle_start + Duration::from_secs(14)).into()).await;
        faults.push(json!({"at_ms": at(origin), "fault": "SIGTERM", "instance": 2}));
        fleet.take(2).terminate(Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        fleet.restart(2).await;
        cycle_start += CYCLE;
    }

    let mut acknowledgements = Vec::new();
    for publisher in publishers {
        acknowledgements.extend(publisher.await.unwrap());
    }
    // Wait until every acknowledged (event, subscription) pair got a success, then judge.
    let expected: HashSet<(String, String)> = acknowledgements
        .iter()
        .flat_map(|ack| {
            let event = ack["event_id"].as_str().unwrap().to_string();
            ack["subscriptions"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |id| (event.clone(), id.as_str().unwrap().to_string()))
        })
        .collect();
    eventually(
        Duration::from_secs(60),
        "every acknowledged event reaches its subscriptions",
        || async {
            let delivered: HashSet<(String, String)> = receiver
                .delivered()
                .iter()
                .map(|request| (request.id.clone(), paths[&request.path].clone()))
                .collect();
            expected.is_subset(&delivered)
        },
    )
    .await;

    let directory = tempfile::tempdir().unwrap();
    let acks_path = directory.path().join("acks.jsonl");
    let received_path = directory.path().join("received.jsonl");
    let faults_path = directory.path().join("faults.jsonl");
    write_lines(&acks_path, &acknowledgements);
    write_lines(
        &received_path,
        &received_lines(&receiver.received(), &paths, origin),
    );
    write_lines(&faults_path, &faults);
    let checker = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chaos_check.py");
    let output = std::process::Command::new("python3")
        .arg(checker)
        .arg("--acks")
        .arg(&acks_path)
        .arg("--received")
        .arg(&received_path)
        .arg("--faults")
        .arg(&faults_path)
        // A request sent back in sequence is allowed only this long after a fault began: a
        // pause lasts the lease + 3 s, then a lease and a rescan may pass before the other
        // instance has it all, plus a second of slack.
        .arg("--redelivery-window-ms")
        .arg(
            ((LEASE + Duration::from_secs(3)) + LEASE + Duration::from_millis(1500))
                .as_millis()
                .to_string(),
        )
        .output()
        .expect("run scripts/chaos_check.py with python3");
    let report = String::from_utf8_lossy(&output.stdout);
    println!(
        "chaos run of {duration:?}, {} faults:\n{report}",
        faults.len()
    );
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the checker found violations:\n{report}"
    );
    assert!(acknowledgements.len() >= 100, "too few publishes to judge");
    for index in 0..3 {
        if let Some(process) = fleet.processes[index].take() {
            process.kill_9().await;
        }
    }
}
