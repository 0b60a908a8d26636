//! End-to-end delivery: order, signatures, retries, isolation, dead letters and blocking.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use herald::proto;

use crate::support::{
    Backend, Receiver, Reply, all_pending, eventually, eventually_pending, millis, publish_request,
    spawn_app, subscribe_request,
};

/// Asserts that, per topic, the successful deliveries arrived in increasing sequence order with
/// a complete `herald-previous-sequence` chain starting at 0, and returns them per topic.
fn assert_ordered_chains(
    delivered: &[crate::support::receiver::Received],
) -> BTreeMap<String, Vec<u64>> {
    let mut per_topic: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for received in delivered {
        let sequences = per_topic.entry(received.topic.clone()).or_default();
        let expected_previous = sequences.last().copied().unwrap_or(0);
        assert_eq!(
            received.previous, expected_previous,
            "topic {}: event {} has previous {} but the last delivered was {}",
            received.topic, received.sequence, received.previous, expected_previous
        );
        assert!(
            received.sequence > expected_previous,
            "sequence went backwards"
        );
        sequences.push(received.sequence);
    }
    per_topic
}

async fn concurrent_publishers_deliver_every_event_in_order_to_every_subscriber(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let topics = ["fin:purchase", "user:new", "user:online"];
    let receivers = [
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    ];
    // Three ways of subscribing: exact names, a prefix pattern, and everything.
    let patterns: [&[&str]; 3] = [
        &["fin:purchase", "user:new", "user:online"],
        &["user:*"],
        &["*"],
    ];
    let mut secrets = Vec::new();
    for (receiver, patterns) in receivers.iter().zip(patterns) {
        let subscription = app
            .client()
            .await
            .subscribe(subscribe_request(&receiver.url(), patterns))
            .await
            .unwrap()
            .into_inner();
        assert!(subscription.secret.starts_with("whsec_"));
        secrets.push(subscription.secret);
    }

    // 8 publishers share 3 topics x 200 events.
    let mut publishers = Vec::new();
    for publisher in 0..8 {
        let mut client = app.client().await;
        publishers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for index in (publisher..600).step_by(8) {
                let topic = topics[index % 3];
                let payload = format!("{{\"index\":{index}}}");
                let response = client
                    .publish(publish_request(topic, payload.clone()))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(
                    response.subscription_count,
                    if topic == "fin:purchase" { 2 } else { 3 }
                );
                acknowledged.push((
                    topic.to_string(),
                    response.event_id,
                    response.sequence,
                    payload,
                ));
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.unwrap());
    }
    assert_eq!(acknowledged.len(), 600);
    // Sequences are unique per topic.
    let unique: BTreeSet<(String, u64)> = acknowledged
        .iter()
        .map(|(topic, _, sequence, _)| (topic.clone(), *sequence))
        .collect();
    assert_eq!(unique.len(), 600);

    let expected_counts = [600, 400, 600];
    for (receiver, expected) in receivers.iter().zip(expected_counts) {
        eventually(Duration::from_secs(60), "every event delivered", || async {
            receiver.delivered_count() >= expected
        })
        .await;
    }
    for (index, receiver) in receivers.iter().enumerate() {
        let delivered = receiver.delivered();
        let wanted: BTreeMap<String, (String, u64, String)> = acknowledged
            .iter()
            .filter(|(topic, ..)| index != 1 || topic.starts_with("user:"))
            .map(|(topic, id, sequence, payload)| {
                (id.clone(), (topic.clone(), *sequence, payload.clone()))
            })
            .collect();
        let got: BTreeMap<String, (String, u64, String)> = delivered
            .iter()
            .map(|received| {
                (
                    received.id.clone(),
                    (
                        received.topic.clone(),
                        received.sequence,
                        String::from_utf8(received.body.to_vec()).unwrap(),
                    ),
                )
            })
            .collect();
        assert_eq!(
            delivered.len(),
            got.len(),
            "receiver {index} got duplicates from a healthy run"
        );
        assert_eq!(
            got, wanted,
            "receiver {index} got exactly its events, bodies intact"
        );
        for received in &delivered {
            assert!(
                received.signature_valid(&secrets[index]),
                "signature of {}",
                received.id
            );
            assert_eq!(received.content_type, "application/json");
        }
        let chains = assert_ordered_chains(&delivered);
        assert_eq!(chains.len(), if index == 1 { 2 } else { 3 });
        for sequences in chains.values() {
            assert_eq!(sequences.len(), 200);
        }
    }
    app.stop().await;
}

async fn failing_receiver_gets_everything_in_order_with_exponential_gaps(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    // Every event fails its first 5 attempts.
    let receiver = Receiver::scripted(|received| {
        if received.attempt <= 5 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut request = subscribe_request(&receiver.url(), &["orders"]);
    request.retry_policy = Some(proto::RetryPolicy {
        initial_backoff: Some(millis(20)),
        max_backoff: Some(millis(400)),
        max_attempts: 10,
        request_timeout: Some(millis(2000)),
    });
    let mut client = app.client().await;
    client.subscribe(request).await.unwrap();
    let mut sequences = Vec::new();
    for index in 0..20 {
        let response = client
            .publish(publish_request("orders", format!("{index}")))
            .await
            .unwrap()
            .into_inner();
        sequences.push(response.sequence);
    }
    eventually(Duration::from_secs(60), "20 events delivered", || async {
        receiver.delivered_count() == 20
    })
    .await;

    let delivered: Vec<u64> = receiver
        .delivered()
        .iter()
        .map(|received| received.sequence)
        .collect();
    assert_eq!(delivered, sequences, "delivered in publish order");
    assert_ordered_chains(&receiver.delivered());

    // Gaps between consecutive attempts of each event, indexed by the failure they follow.
    let mut by_event: HashMap<String, Vec<Instant>> = HashMap::new();
    for received in receiver.received() {
        by_event
            .entry(received.id.clone())
            .or_default()
            .push(received.at);
    }
    let caps = [20u64, 40, 80, 160, 320];
    // Store round trips and scheduling add to every gap, and a loaded machine can stall a
    // second or two; generous, since the exact schedule is tested with controlled time in
    // `delivery::retry`.
    let slack = Duration::from_millis(3000);
    let mut gaps: Vec<Vec<Duration>> = vec![Vec::new(); 5];
    for attempts in by_event.values() {
        assert_eq!(attempts.len(), 6, "5 failures then a success");
        for failure in 0..5 {
            let gap = attempts[failure + 1] - attempts[failure];
            assert!(
                gap <= Duration::from_millis(caps[failure]) + slack,
                "gap after failure {} was {gap:?}, above its cap {}ms",
                failure + 1,
                caps[failure]
            );
            gaps[failure].push(gap);
        }
    }
    let mean = |gaps: &[Duration]| gaps.iter().sum::<Duration>() / gaps.len() as u32;
    let means: Vec<Duration> = gaps.iter().map(|gaps| mean(gaps)).collect();
    println!("mean gap after failures 1..5: {means:?} (caps {caps:?} ms, full jitter)");
    // Full jitter averages half the cap (~10, 20, 40, 80, 160 ms) plus an overhead that is the
    // same for every gap on average, so compare differences: the fifth mean exceeds the first
    // by ~150 ms (standard deviation of a mean of 20 gaps: ~21 ms).
    // On a busy machine the overhead is noisy too: only the widest comparison is kept here.
    assert!(means[4] > means[0], "gaps grow: {means:?}");
    assert!(
        means[4] >= Duration::from_millis(80),
        "late gaps use the larger caps: {means:?}"
    );
    app.stop().await;
}

async fn retry_after_is_honoured_up_to_the_max_backoff(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let receiver = Receiver::scripted(|received| match received.attempt {
        1 => Reply::RetryAfter(429, 1),
        2 => Reply::RetryAfter(503, 60),
        _ => Reply::Status(200),
    })
    .await;
    let mut request = subscribe_request(&receiver.url(), &["limits"]);
    request.retry_policy = Some(proto::RetryPolicy {
        initial_backoff: Some(millis(10)),
        max_backoff: Some(millis(1500)),
        max_attempts: 10,
        request_timeout: Some(millis(2000)),
    });
    let mut client = app.client().await;
    client.subscribe(request).await.unwrap();
    client
        .publish(publish_request("limits", "x"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "delivered after two throttles",
        || async { receiver.delivered_count() == 1 },
    )
    .await;
    let received = receiver.received();
    assert_eq!(received.len(), 3);
    let first_gap = received[1].at - received[0].at;
    let second_gap = received[2].at - received[1].at;
    println!("Retry-After gaps: {first_gap:?} (asked 1s), {second_gap:?} (asked 60s, cap 1.5s)");
    assert!(
        first_gap >= Duration::from_millis(950),
        "waited the asked 1s: {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1400),
        "waited the cap: {second_gap:?}"
    );
    assert!(
        second_gap < Duration::from_secs(5),
        "the 60s ask was capped: {second_gap:?}"
    );
    app.stop().await;
}

async fn hanging_and_failing_endpoints_do_not_slow_other_partitions(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let healthy = Receiver::start().await;
    let hanging = Receiver::scripted(|_| Reply::Hang).await;
    let failing = Receiver::scripted(|_| Reply::Status(500)).await;
    // One subscription, two topics: `slow` hangs, `fast` succeeds.
    let mixed = Receiver::scripted(|received| {
        if received.topic == "slow" {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut client = app.client().await;
    for receiver in [&healthy, &hanging, &failing] {
        let mut request = subscribe_request(&receiver.url(), &["fast"]);
        if let Some(policy) = request.retry_policy.as_mut() {
            policy.request_timeout = Some(millis(60_000));
        }
        client.subscribe(request).await.unwrap();
    }
    let mut request = subscribe_request(&mixed.url(), &["fast", "slow"]);
    if let Some(policy) = request.retry_policy.as_mut() {
        policy.request_timeout = Some(millis(60_000));
    }
    client.subscribe(request).await.unwrap();

    let started = Instant::now();
    client
        .publish(publish_request("slow", "stuck"))
        .await
        .unwrap();
    for index in 0..200 {
        client
            .publish(publish_request("fast", format!("{index}")))
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(45),
        "healthy partitions drained",
        || async { healthy.delivered_count() == 200 && mixed.delivered_count() == 200 },
    )
    .await;
    let elapsed = started.elapsed();
    println!(
        "200 events reached the healthy endpoints in {elapsed:?} while one endpoint hung and one failed {} times",
        failing.received().len()
    );
    // The hanging endpoint is still holding its first request (60 s timeout): the healthy
    // partitions finished while it was stuck, so they never waited for it.
    assert_eq!(hanging.received().len(), 1);
    assert!(
        mixed
            .received()
            .iter()
            .filter(|received| received.topic == "slow")
            .count()
            == 1
    );
    assert!(failing.delivered_count() == 0 && !failing.received().is_empty());
    assert!(elapsed < Duration::from_secs(55), "{elapsed:?}");
    assert_ordered_chains(&healthy.delivered());
    assert_ordered_chains(&mixed.delivered());
}

async fn dead_letter_parks_the_event_and_the_partition_continues(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let receiver = Receiver::scripted(|received| {
        if received.body.as_ref() == b"poison" {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut request = subscribe_request(&receiver.url(), &["jobs"]);
    request.retry_policy = Some(proto::RetryPolicy {
        initial_backoff: Some(millis(5)),
        max_backoff: Some(millis(20)),
        max_attempts: 3,
        request_timeout: Some(millis(2000)),
    });
    request.on_exhausted = proto::OnExhausted::DeadLetter as i32;
    let mut client = app.client().await;
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let first = client
        .publish(publish_request("jobs", "one"))
        .await
        .unwrap()
        .into_inner();
    let poison = client
        .publish(publish_request("jobs", "poison"))
        .await
        .unwrap()
        .into_inner();
    let third = client
        .publish(publish_request("jobs", "three"))
        .await
        .unwrap()
        .into_inner();

    eventually(
        Duration::from_secs(10),
        "the event after the poison one is delivered",
        || async { receiver.delivered_count() == 2 },
    )
    .await;
    let delivered: Vec<u64> = receiver
        .delivered()
        .iter()
        .map(|received| received.sequence)
        .collect();
    assert_eq!(delivered, [first.sequence, third.sequence]);
    // The chain tells the receiver that it missed the dead-lettered event.
    assert_eq!(receiver.delivered()[1].previous, poison.sequence);
    let poison_attempts = receiver
        .received()
        .iter()
        .filter(|received| received.body.as_ref() == b"poison")
        .count();
    assert_eq!(poison_attempts, 3);

    // The last completion may still be on its way to the store.
    eventually_pending(
        &client,
        &subscription.id,
        Duration::from_secs(10),
        "only the dead letter pending",
        |pending| pending.len() == 1,
    )
    .await;
    let pending = all_pending(&mut client, &subscription.id).await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].event_id, poison.event_id);
    assert_eq!(pending[0].sequence, poison.sequence);
    assert!(pending[0].dead_lettered);
    assert_eq!(pending[0].attempts, 3);
    assert!(
        pending[0].last_error.contains("500"),
        "{}",
        pending[0].last_error
    );
    assert!(pending[0].next_attempt_at.is_none());
    app.stop().await;
}

async fn block_holds_the_partition_until_the_event_succeeds(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let receiver = Receiver::scripted(|received| {
        if received.body.as_ref() == b"poison" {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut request = subscribe_request(&receiver.url(), &["jobs"]);
    request.retry_policy = Some(proto::RetryPolicy {
        initial_backoff: Some(millis(5)),
        max_backoff: Some(millis(100)),
        max_attempts: 2,
        request_timeout: Some(millis(2000)),
    });
    request.on_exhausted = proto::OnExhausted::Block as i32;
    let mut client = app.client().await;
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let first = client
        .publish(publish_request("jobs", "one"))
        .await
        .unwrap()
        .into_inner();
    let poison = client
        .publish(publish_request("jobs", "poison"))
        .await
        .unwrap()
        .into_inner();
    let third = client
        .publish(publish_request("jobs", "three"))
        .await
        .unwrap()
        .into_inner();

    // Past max_attempts, the poison event keeps being retried and "three" is never sent.
    eventually(
        Duration::from_secs(10),
        "blocked event retried past max_attempts",
        || async {
            receiver
                .received()
                .iter()
                .filter(|received| received.body.as_ref() == b"poison")
                .count()
                >= 5
        },
    )
    .await;
    let delivered: Vec<u64> = receiver
        .delivered()
        .iter()
        .map(|received| received.sequence)
        .collect();
    assert_eq!(delivered, [first.sequence]);
    assert!(
        receiver
            .received()
            .iter()
            .all(|received| received.body.as_ref() != b"three")
    );
    let poison_times: Vec<Instant> = receiver
        .received()
        .iter()
        .filter(|received| received.body.as_ref() == b"poison")
        .map(|received| received.at)
        .collect();
    // Once blocked, retries come at the max backoff (100 ms).
    let late_gap = poison_times[4] - poison_times[3];
    assert!(
        late_gap >= Duration::from_millis(90),
        "blocked retries at max backoff: {late_gap:?}"
    );

    // The first event's completion may still be on its way to the store.
    eventually_pending(
        &client,
        &subscription.id,
        Duration::from_secs(10),
        "the first completion recorded",
        |pending| pending.len() == 2,
    )
    .await;
    let pending = all_pending(&mut client, &subscription.id).await;
    let sequences: Vec<u64> = pending.iter().map(|delivery| delivery.sequence).collect();
    assert_eq!(sequences, [poison.sequence, third.sequence]);
    assert!(!pending[0].dead_lettered && pending[0].attempts >= 2);
    assert!(pending[0].next_attempt_at.is_some());

    // The receiver recovers: the partition resumes, in order.
    receiver.set_script(|_| Reply::Status(200));
    eventually(Duration::from_secs(10), "partition unblocked", || async {
        receiver.delivered_count() >= 3
    })
    .await;
    let delivered: Vec<u64> = receiver
        .delivered()
        .iter()
        .map(|received| received.sequence)
        .collect();
    assert_eq!(delivered, [first.sequence, poison.sequence, third.sequence]);
    eventually_pending(
        &client,
        &subscription.id,
        Duration::from_secs(5),
        "nothing pending",
        |pending| pending.is_empty(),
    )
    .await;
    app.stop().await;
}

crate::on_both_backends!(
    concurrent_publishers_deliver_every_event_in_order_to_every_subscriber,
    failing_receiver_gets_everything_in_order_with_exponential_gaps,
    retry_after_is_honoured_up_to_the_max_backoff,
    hanging_and_failing_endpoints_do_not_slow_other_partitions,
    dead_letter_parks_the_event_and_the_partition_continues,
    block_holds_the_partition_until_the_event_succeeds,
);
