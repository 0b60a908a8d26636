//! Everyday faults an operator's fleet meets: deploys (SIGTERM) and crashes with events in
//! backoff, client deadlines during a commit, an instance paused past its lease, store writes
//! failing between a delivery and its bookkeeping, and `Retry-After: 0`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use herald::proto;
use tonic::Code;

use crate::support::faulty::FaultyStore;
use crate::support::metrics::{sample, scrape};
use crate::support::receiver::Received;
use crate::support::{
    Backend, Deployment, HeraldProcess, Receiver, Reply, all_pending, connect, eventually,
    eventually_pending, millis, publish_request, spawn_app_with_store, subscribe_request,
};

/// The test deployment's `--partition-lease` and `--rescan-interval` (see `support`).
const LEASE: Duration = crate::support::TEST_LEASE;
const RESCAN: Duration = Duration::from_millis(500);

/// How the first instance goes away in [`handover`].
#[derive(Debug, Clone, Copy)]
enum Departure {
    Sigterm,
    Kill9,
}

/// Two instances on one table; the first holds a partition whose events wait in backoff
/// (receiver down) and goes away; the receiver comes back and nothing else is published. The
/// second must deliver everything, in order, within lease + rescan + 5 s of a kill -9. After a
/// SIGTERM the lease is 30 s and the bound rescan + 5 s: only a real handover (the lease left
/// expired at the stop) meets it, not the lease running out.
async fn handover(departure: Departure) {
    let mut deployment = Deployment::new(Backend::Dynamodb).await;
    let bound = match departure {
        Departure::Sigterm => {
            deployment.partition_lease = Duration::from_secs(30);
            RESCAN + Duration::from_secs(5)
        }
        Departure::Kill9 => LEASE + RESCAN + Duration::from_secs(5),
    };
    let first = HeraldProcess::start(&deployment).await;
    let second = HeraldProcess::start(&deployment).await;
    // `Retry-After: 1` spaces the attempts exactly 1 s apart.
    let receiver = Receiver::scripted(|_| Reply::RetryAfter(503, 1)).await;
    let mut client = connect(first.address).await;
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    let policy = request.retry_policy.as_mut().unwrap();
    policy.initial_backoff = Some(millis(500));
    policy.max_backoff = Some(millis(1000));
    client.subscribe(request).await.unwrap();
    let mut sequences = Vec::new();
    for index in 0..15 {
        let published = client
            .publish(publish_request("t", format!("{index}")))
            .await
            .unwrap()
            .into_inner();
        sequences.push(published.sequence);
    }
    // The second instance saw the topic move at its next rescan and tried to claim the
    // partition for one lease; four attempts 1 s apart outlast that, so from now on only a
    // handover (or an expired lease) can lead it to the partition.
    eventually(
        Duration::from_secs(15),
        "the head was attempted 5 times",
        || async { receiver.received().len() >= 5 },
    )
    .await;
    match departure {
        Departure::Sigterm => first.terminate(Duration::from_secs(10)).await,
        Departure::Kill9 => first.kill_9().await,
    }
    let departed = Instant::now();
    receiver.set_script(|_| Reply::Status(200));
    eventually(
        bound + Duration::from_secs(1),
        "the other instance delivers everything",
        || async { receiver.delivered_count() >= 15 },
    )
    .await;
    let delivered = receiver.delivered();
    let failover = delivered[0].at.saturating_duration_since(departed);
    println!("{departure:?}: first delivery by the other instance {failover:?} after departure");
    assert!(failover <= bound, "failover took {failover:?}");
    let order: Vec<u64> = delivered.iter().map(|received| received.sequence).collect();
    assert_eq!(order, sequences);
    second.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_hands_over_events_left_in_backoff() {
    handover(Departure::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_instance_takes_over_a_killed_instances_partitions() {
    handover(Departure::Kill9).await;
}

/// Publishes whose clients give up while the commit is in flight (every commit here answers
/// 300 ms late, the client waits 50 ms), with no publish after them: each committed event
/// still reaches every subscription.
async fn client_deadlines_during_a_fan_out_strand_nothing(backend: Backend) {
    let (subscriptions, publishes) = match backend {
        Backend::Embedded => (100, 30),
        Backend::Dynamodb => (20, 10),
    };
    let deployment = Deployment::new(backend).await;
    let config = deployment.config();
    let store = FaultyStore::new(deployment.open_store(&config).await);
    let app = spawn_app_with_store(deployment, config, store.clone()).await;
    let receiver = Receiver::start().await;
    let mut client = app.client.clone();
    for index in 0..subscriptions {
        client
            .subscribe(subscribe_request(
                &format!("{}/{index}", receiver.url()),
                &["t"],
            ))
            .await
            .unwrap();
    }
    store.delay_after_publish(Duration::from_millis(1000));
    for index in 0..publishes {
        let mut request = tonic::Request::new(publish_request("t", format!("{index}")));
        request.set_timeout(Duration::from_millis(200));
        let status = client.publish(request).await.unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    // A deadline can also fire before the request reaches the store (a busy machine): such a
    // publish is not committed and reaches nobody. Whatever was committed must reach every
    // subscription with no later publish, and nothing may stay pending.
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_subscriptions(herald::proto::ListSubscriptionsRequest {
                    page_size: 1000,
                    page_token,
                    state: 0,
                })
                .await
                .unwrap()
                .into_inner();
            ids.extend(
                page.subscriptions
                    .into_iter()
                    .map(|subscription| subscription.id),
            );
            if page.next_page_token.is_empty() {
                break ids;
            }
            page_token = page.next_page_token;
        }
    };
    assert_eq!(ids.len(), subscriptions);
    eventually(
        Duration::from_secs(60),
        "every committed delivery arrives without a later publish",
        || {
            let client = client.clone();
            let ids = ids.clone();
            async move {
                for id in ids {
                    if !all_pending(&mut client.clone(), &id).await.is_empty() {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    // None of these publishes was acknowledged, so their relative order is whatever the
    // commits made it; every subscription must see that one order, in sequence order.
    let mut per_subscription: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for received in receiver.delivered() {
        per_subscription
            .entry(received.path.clone())
            .or_default()
            .push((
                received.sequence,
                String::from_utf8(received.body.to_vec()).unwrap(),
            ));
    }
    assert_eq!(per_subscription.len(), subscriptions);
    let reference = per_subscription.values().next().unwrap().clone();
    assert!(reference.windows(2).all(|pair| pair[0].0 < pair[1].0));
    let bodies: BTreeSet<&str> = reference.iter().map(|(_, body)| body.as_str()).collect();
    assert_eq!(bodies.len(), reference.len());
    assert!(
        !bodies.is_empty(),
        "no publish was committed: the test proved nothing"
    );
    println!(
        "{} of {publishes} abandoned publishes were committed",
        bodies.len()
    );
    for (path, deliveries) in &per_subscription {
        assert_eq!(deliveries, &reference, "{path}");
    }
}

/// Which of `instances` holds the (only) partition's lease, by their
/// `herald_partition_leases_held` gauges: waits until exactly one does.
async fn lease_holder(instances: &[&HeraldProcess]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut holders = Vec::new();
        for (index, instance) in instances.iter().enumerate() {
            let url = instance
                .metrics_url
                .clone()
                .expect("started with --metrics-listen");
            if sample(&scrape(&url).await, "herald_partition_leases_held") == Some(1.0) {
                holders.push(index);
            }
        }
        if let [holder] = holders[..] {
            return holder;
        }
        assert!(
            Instant::now() < deadline,
            "no single lease holder: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A slow receiver (400 ms per request) and the delivering instance paused past its lease,
/// three times (each instance in turn). At the receiver: no request of the partition starts
/// before the previous one was answered, and successes never go back in sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_instance_neither_overlaps_nor_goes_backwards() {
    const ANSWER: Duration = Duration::from_millis(400);
    const EVENTS: usize = 24;
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let first = HeraldProcess::start_with(&deployment, &metrics).await;
    let second = HeraldProcess::start_with(&deployment, &metrics).await;
    let receiver = Receiver::scripted(|_| Reply::Slow(ANSWER.as_millis() as u64)).await;
    let mut client = connect(first.address).await;
    client
        .subscribe(subscribe_request(&receiver.url(), &["t"]))
        .await
        .unwrap();
    for index in 0..EVENTS {
        client
            .publish(publish_request("t", format!("{index}")))
            .await
            .unwrap();
    }
    // Three times: pause the instance that holds the partition's lease (by its own metrics,
    // the other holding none) past its lease, while it delivers.
    let instances = [&first, &second];
    let mut paused_order = Vec::new();
    for _ in 0..3 {
        let before = receiver.received().len();
        eventually(Duration::from_secs(10), "a delivery in flight", || async {
            receiver.received().len() > before
        })
        .await;
        let holder = lease_holder(&instances).await;
        paused_order.push(holder);
        let paused = instances[holder];
        paused.signal("STOP");
        let stopped_at = receiver.received().len();
        eventually(
            Duration::from_secs(15),
            "the other instance takes over",
            || async { receiver.received().len() >= stopped_at + 2 },
        )
        .await;
        paused.signal("CONT");
    }
    eventually(Duration::from_secs(60), "everything delivered", || async {
        let sequences: BTreeSet<u64> = receiver
            .delivered()
            .iter()
            .map(|received| received.sequence)
            .collect();
        sequences.len() >= EVENTS
    })
    .await;
    let received = receiver.received();
    for pair in received.windows(2) {
        assert!(
            pair[1].at >= pair[0].at + ANSWER - Duration::from_millis(1),
            "sequence {} arrived {:?} after sequence {}, before it was answered",
            pair[1].sequence,
            pair[1].at - pair[0].at,
            pair[0].sequence
        );
    }
    let successes: Vec<u64> = received
        .iter()
        .filter(|received| received.succeeded())
        .map(|received| received.sequence)
        .collect();
    for pair in successes.windows(2) {
        assert!(
            pair[1] >= pair[0],
            "success of {} after {}: {successes:?}",
            pair[1],
            pair[0]
        );
    }
    println!(
        "{} requests for {EVENTS} events across three pauses of instances {paused_order:?}",
        received.len()
    );
    assert!(
        paused_order.windows(2).all(|pair| pair[0] != pair[1]),
        "each pause moved the partition to the other instance: {paused_order:?}"
    );
    first.kill_9().await;
    second.kill_9().await;
}

/// The store refuses the first writes of attempt outcomes. A failure's schedule and the
/// attempt limit still hold (exactly `max_attempts` requests, then dead-lettered), and a
/// success is recorded before the partition is read again (no event sent twice; on the
/// embedded store successes are written a batch at a time, on DynamoDB one by one).
async fn failed_bookkeeping_keeps_the_retry_policy(backend: Backend) {
    let deployment = Deployment::new(backend).await;
    let config = deployment.config();
    let store = FaultyStore::new(deployment.open_store(&config).await);
    let app = spawn_app_with_store(deployment, config, store.clone()).await;
    let receiver = Receiver::scripted(|received| {
        if received.body.as_ref() == b"bad" {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    let policy = request.retry_policy.as_mut().unwrap();
    policy.max_attempts = 3;
    policy.initial_backoff = Some(millis(100));
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    store.fail_failures(4);
    store.fail_completions(3);
    for body in ["bad", "a", "b", "c"] {
        client.publish(publish_request("t", body)).await.unwrap();
    }
    eventually(Duration::from_secs(30), "a, b and c delivered", || async {
        receiver.delivered_count() >= 3
    })
    .await;
    let bodies: Vec<String> = receiver
        .received()
        .iter()
        .map(|received: &Received| String::from_utf8(received.body.to_vec()).unwrap())
        .collect();
    assert_eq!(bodies, ["bad", "bad", "bad", "a", "b", "c"]);
    assert_eq!(store.refused_failures.load(Ordering::SeqCst), 4);
    eventually(Duration::from_secs(10), "every refusal used", || async {
        store.refused_completions.load(Ordering::SeqCst) == 3
    })
    .await;
    // The last completion may still be on its way to the store.
    let mut client = app.client.clone();
    eventually_pending(
        &client,
        &subscription.id,
        Duration::from_secs(10),
        "only the dead letter left",
        |pending| pending.len() == 1,
    )
    .await;
    let pending = all_pending(&mut client, &subscription.id).await;
    assert!(pending[0].dead_lettered);
    assert_eq!(pending[0].attempts, 3);
}

/// `Retry-After: 0` on every answer, under BLOCK: attempts are spaced by at least the initial
/// backoff, not a tight loop.
async fn retry_after_zero_waits_the_initial_backoff(backend: Backend) {
    let app = crate::support::spawn_app(backend, |_| {}).await;
    let receiver = Receiver::scripted(|_| Reply::RetryAfter(429, 0)).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    let policy = request.retry_policy.as_mut().unwrap();
    policy.initial_backoff = Some(millis(200));
    policy.max_backoff = Some(millis(1000));
    policy.max_attempts = 2;
    request.on_exhausted = proto::OnExhausted::Block as i32;
    client.subscribe(request).await.unwrap();
    client.publish(publish_request("t", "x")).await.unwrap();
    eventually(Duration::from_secs(10), "five attempts", || async {
        receiver.received().len() >= 5
    })
    .await;
    let received = receiver.received();
    for pair in received.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(190), "attempts {gap:?} apart");
    }
}

crate::on_both_backends!(
    client_deadlines_during_a_fan_out_strand_nothing,
    failed_bookkeeping_keeps_the_retry_policy,
    retry_after_zero_waits_the_initial_backoff,
);
