//! The operator's controls through the gRPC API, with real receivers, on both stores: status,
//! skip, pause and resume, retry-now.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald::proto;
use herald::proto::broker_service_client::BrokerServiceClient;
use tonic::transport::Channel;

use crate::support::{
    Backend, Receiver, Reply, all_pending, eventually, millis, publish_request, spawn_app,
    subscribe_request,
};

/// The status of a subscription's partition of `topic`, if it has one.
async fn partition(
    client: &mut BrokerServiceClient<Channel>,
    subscription_id: &str,
    topic: &str,
) -> Option<proto::PartitionStatus> {
    client
        .get_subscription_status(proto::GetSubscriptionStatusRequest {
            subscription_id: subscription_id.to_string(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("status")
        .into_inner()
        .partitions
        .into_iter()
        .find(|partition| partition.topic == topic)
}

/// Waits until the subscription's partition of `topic` is in `wanted` state.
async fn wait_for_state(
    client: &BrokerServiceClient<Channel>,
    subscription_id: &str,
    topic: &str,
    wanted: proto::PartitionState,
) {
    eventually(
        Duration::from_secs(20),
        &format!("partition {topic} is {wanted:?}"),
        || {
            let mut client = client.clone();
            async move { state(&partition(&mut client, subscription_id, topic).await) == wanted }
        },
    )
    .await;
}

fn state(status: &Option<proto::PartitionStatus>) -> proto::PartitionState {
    status
        .as_ref()
        .map(|status| proto::PartitionState::try_from(status.state).unwrap())
        .unwrap_or_default()
}

/// The bodies the receiver has acknowledged, in arrival order, repeats removed.
fn delivered_bodies(receiver: &Receiver) -> Vec<String> {
    receiver
        .delivered()
        .iter()
        .map(|received| String::from_utf8_lossy(&received.body).into_owned())
        .collect()
}

async fn publish(client: &mut BrokerServiceClient<Channel>, topic: &str, body: &str) -> u64 {
    client
        .publish(publish_request(topic, body.as_bytes().to_vec()))
        .await
        .expect("publish")
        .into_inner()
        .sequence
}

/// A BLOCKed partition shows the failing head with its error; skipping it with a stale
/// sequence is refused, with the head's sequence it moves the partition on, in order.
async fn a_blocked_partition_shows_its_error_and_skip_moves_it_on(backend: Backend) {
    let receiver = Receiver::scripted(|received| {
        if received.body.as_ref() == b"poison" {
            Reply::Status(500)
        } else {
            Reply::Status(204)
        }
    })
    .await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["ops:block"]);
    request.on_exhausted = proto::OnExhausted::Block as i32;
    request.retry_policy.as_mut().unwrap().max_attempts = 2;
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let id = subscription.id.as_str();

    publish(&mut client, "ops:block", "first").await;
    let poison = publish(&mut client, "ops:block", "poison").await;
    let after = publish(&mut client, "ops:block", "after").await;
    publish(&mut client, "ops:block", "last").await;

    wait_for_state(&client, id, "ops:block", proto::PartitionState::Blocked).await;
    let status = partition(&mut client, id, "ops:block").await.unwrap();
    assert_eq!(status.head_sequence, poison);
    assert_eq!(status.pending_count, 3, "{status:?}");
    assert!(status.head_attempts >= 2, "{status:?}");
    assert!(status.last_error.starts_with("HTTP 500"), "{status:?}");
    assert_eq!(status.last_http_status, 500);
    assert!(status.consecutive_failures >= 2, "{status:?}");
    assert!(
        status.last_success_at.is_some(),
        "the first event was delivered"
    );
    assert!(status.oldest_pending_published_at.is_some());
    assert_eq!(delivered_bodies(&receiver), ["first"]);

    // A sequence that is not the head is refused and changes nothing.
    let stale = client
        .skip_head(proto::SkipHeadRequest {
            subscription_id: id.to_string(),
            topic: "ops:block".into(),
            sequence: after,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains(&poison.to_string()), "{stale:?}");
    let missing = client
        .skip_head(proto::SkipHeadRequest {
            subscription_id: id.to_string(),
            topic: "ops:block".into(),
            sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    let unknown = client
        .skip_head(proto::SkipHeadRequest {
            subscription_id: "sub_unknown".into(),
            topic: "ops:block".into(),
            sequence: poison,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    client
        .skip_head(proto::SkipHeadRequest {
            subscription_id: id.to_string(),
            topic: "ops:block".into(),
            sequence: poison,
        })
        .await
        .expect("skip the head");
    eventually(
        Duration::from_secs(10),
        "the events after the skipped one arrive",
        || async { receiver.delivered_count() == 3 },
    )
    .await;
    assert_eq!(delivered_bodies(&receiver), ["first", "after", "last"]);
    wait_for_state(&client, id, "ops:block", proto::PartitionState::Idle).await;
    let status = partition(&mut client, id, "ops:block").await.unwrap();
    assert_eq!((status.pending_count, status.dead_letter_count), (0, 1));
    assert_eq!(status.consecutive_failures, 0);
    let parked = all_pending(&mut client, id).await;
    assert_eq!(parked.len(), 1);
    assert!(parked[0].dead_lettered);
    assert_eq!(parked[0].sequence, poison);
    assert_eq!(parked[0].last_error, "skipped by an operator");
    app.stop().await;
}

/// Nothing is sent while a subscription (or one partition) is paused; events published
/// meanwhile are kept and arrive in order once it is resumed.
async fn nothing_is_sent_while_paused_and_order_holds_after_resume(backend: Backend) {
    let receiver = Receiver::start().await;
    // A second subscription's deliveries show that the engine is busy meanwhile.
    let witness = Receiver::start().await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let subscription = client
        .subscribe(subscribe_request(&receiver.url(), &["ops:a", "ops:b"]))
        .await
        .unwrap()
        .into_inner();
    let id = subscription.id.clone();
    client
        .subscribe(subscribe_request(&witness.url(), &["ops:a", "ops:b"]))
        .await
        .unwrap();
    publish(&mut client, "ops:a", "a1").await;
    eventually(Duration::from_secs(10), "a1 arrives", || async {
        receiver.delivered_count() == 1
    })
    .await;

    let paused = client
        .pause_subscription(proto::PauseSubscriptionRequest {
            subscription_id: id.clone(),
            topic: String::new(),
            reason: "receiver deploy".into(),
        })
        .await
        .expect("pause")
        .into_inner();
    assert_eq!(paused.state, proto::SubscriptionState::Paused as i32);
    assert_eq!(paused.state_reason, "receiver deploy");
    assert!(paused.state_changed_at.is_some());
    for body in ["a2", "a3"] {
        publish(&mut client, "ops:a", body).await;
    }
    publish(&mut client, "ops:b", "b1").await;
    eventually(
        Duration::from_secs(10),
        "the witness gets all four events",
        || async { witness.delivered_count() == 4 },
    )
    .await;
    let status = partition(&mut client, &id, "ops:a").await;
    assert_eq!(state(&status), proto::PartitionState::Paused);
    assert_eq!(status.unwrap().pending_count, 2);
    assert_eq!(
        partition(&mut client, &id, "ops:b")
            .await
            .unwrap()
            .pending_count,
        1
    );
    assert_eq!(delivered_bodies(&receiver), ["a1"], "sent while paused");
    let listed = client
        .list_subscriptions(proto::ListSubscriptionsRequest {
            page_size: 0,
            page_token: String::new(),
            state: proto::SubscriptionState::Paused as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .subscriptions;
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    // Pausing again is a no-op.
    client
        .pause_subscription(proto::PauseSubscriptionRequest {
            subscription_id: id.clone(),
            topic: String::new(),
            reason: String::new(),
        })
        .await
        .expect("pause again");

    let resumed = client
        .resume_subscription(proto::ResumeSubscriptionRequest {
            subscription_id: id.clone(),
            topic: String::new(),
        })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(resumed.state, proto::SubscriptionState::Active as i32);
    eventually(
        Duration::from_secs(10),
        "the kept events arrive",
        || async { receiver.delivered_count() == 4 },
    )
    .await;
    let bodies = delivered_bodies(&receiver);
    let of_a: Vec<&String> = bodies.iter().filter(|body| body.starts_with('a')).collect();
    assert_eq!(of_a, ["a1", "a2", "a3"]);

    // One partition only: the other keeps sending.
    let wrong = client
        .pause_subscription(proto::PauseSubscriptionRequest {
            subscription_id: id.clone(),
            topic: "other:topic".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument, "{wrong:?}");
    let paused = client
        .pause_subscription(proto::PauseSubscriptionRequest {
            subscription_id: id.clone(),
            topic: "ops:b".into(),
            reason: String::new(),
        })
        .await
        .expect("pause one partition")
        .into_inner();
    assert_eq!(paused.state, proto::SubscriptionState::Active as i32);
    assert_eq!(paused.paused_topics, ["ops:b"]);
    publish(&mut client, "ops:b", "b2").await;
    publish(&mut client, "ops:a", "a4").await;
    eventually(Duration::from_secs(10), "a4 arrives", || async {
        delivered_bodies(&receiver).contains(&"a4".to_string())
    })
    .await;
    eventually(Duration::from_secs(10), "the witness gets b2", || async {
        witness.delivered_count() == 6
    })
    .await;
    assert!(!delivered_bodies(&receiver).contains(&"b2".to_string()));
    assert_eq!(
        state(&partition(&mut client, &id, "ops:b").await),
        proto::PartitionState::Paused
    );
    client
        .resume_subscription(proto::ResumeSubscriptionRequest {
            subscription_id: id.clone(),
            topic: "ops:b".into(),
        })
        .await
        .expect("resume one partition");
    eventually(Duration::from_secs(10), "b2 arrives", || async {
        receiver.delivered_count() == 6
    })
    .await;
    app.stop().await;
}

/// Retry-now makes a head that waits out a long `Retry-After` due at once.
async fn retry_now_cuts_a_long_backoff_short(backend: Backend) {
    let receiver = Receiver::scripted(|received| {
        if received.attempt == 1 {
            Reply::RetryAfter(503, 600)
        } else {
            Reply::Status(204)
        }
    })
    .await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["ops:retry"]);
    request.retry_policy.as_mut().unwrap().max_backoff = Some(millis(600_000));
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let id = subscription.id.as_str();
    let sequence = publish(&mut client, "ops:retry", "later").await;
    wait_for_state(&client, id, "ops:retry", proto::PartitionState::Retrying).await;
    let status = partition(&mut client, id, "ops:retry").await.unwrap();
    let next = status.head_next_attempt_at.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(next.seconds > now + 500, "Retry-After honoured: {status:?}");
    assert_eq!(status.last_http_status, 503);

    let response = client
        .retry_now(proto::RetryNowRequest {
            subscription_id: id.to_string(),
            topic: "ops:retry".into(),
        })
        .await
        .expect("retry now")
        .into_inner();
    assert_eq!(response.sequence, sequence);
    eventually(
        Duration::from_secs(10),
        "the event arrives after retry-now",
        || async { receiver.delivered_count() == 1 },
    )
    .await;
    // Nothing left: retry-now says so.
    wait_for_state(&client, id, "ops:retry", proto::PartitionState::Idle).await;
    let response = client
        .retry_now(proto::RetryNowRequest {
            subscription_id: id.to_string(),
            topic: "ops:retry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.sequence, 0);
    app.stop().await;
}

/// Dead letters are listed, redriven (named ones, then what is left is purged), and a
/// redriven event arrives marked as such, ahead of events published after the redrive.
async fn dead_letters_are_listed_redriven_and_purged(backend: Backend) {
    let healed = Arc::new(AtomicBool::new(false));
    let receiver = Receiver::scripted({
        let healed = healed.clone();
        move |received| {
            if received.body.starts_with(b"bad") && !healed.load(Ordering::SeqCst) {
                Reply::Status(500)
            } else {
                Reply::Status(204)
            }
        }
    })
    .await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["ops:dead"]);
    request.retry_policy.as_mut().unwrap().max_attempts = 2;
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let id = subscription.id.as_str();
    let mut sequences = std::collections::HashMap::new();
    for body in ["ok1", "bad1", "ok2", "bad2", "ok3"] {
        sequences.insert(body, publish(&mut client, "ops:dead", body).await);
    }
    eventually(
        Duration::from_secs(20),
        "the good events arrive and the bad ones are dead-lettered",
        || {
            let mut client = client.clone();
            async move {
                let status = partition(&mut client, id, "ops:dead").await;
                status.is_some_and(|status| status.dead_letter_count == 2)
                    && state(&partition(&mut client, id, "ops:dead").await)
                        == proto::PartitionState::Idle
            }
        },
    )
    .await;
    assert_eq!(delivered_bodies(&receiver), ["ok1", "ok2", "ok3"]);
    let dead = list_dead(&mut client, id).await;
    assert_eq!(
        dead.iter().map(|entry| entry.sequence).collect::<Vec<_>>(),
        [sequences["bad1"], sequences["bad2"]]
    );
    assert!(dead.iter().all(|entry| entry.dead_lettered));

    // A sequence that is not a dead letter: refused, nothing moves.
    let wrong = client
        .redrive_dead_letters(proto::RedriveDeadLettersRequest {
            subscription_id: id.to_string(),
            topic: "ops:dead".into(),
            sequences: vec![sequences["bad1"], sequences["ok2"]],
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::NotFound, "{wrong:?}");
    assert_eq!(list_dead(&mut client, id).await.len(), 2);

    healed.store(true, Ordering::SeqCst);
    let redriven = client
        .redrive_dead_letters(proto::RedriveDeadLettersRequest {
            subscription_id: id.to_string(),
            topic: "ops:dead".into(),
            sequences: vec![sequences["bad1"]],
        })
        .await
        .expect("redrive")
        .into_inner();
    assert_eq!(redriven.redriven_count, 1);
    publish(&mut client, "ops:dead", "ok4").await;
    eventually(
        Duration::from_secs(10),
        "the redriven event and the next one arrive",
        || async { receiver.delivered_count() == 5 },
    )
    .await;
    let delivered = receiver.delivered();
    let bodies: Vec<String> = delivered
        .iter()
        .map(|received| String::from_utf8_lossy(&received.body).into_owned())
        .collect();
    assert_eq!(bodies, ["ok1", "ok2", "ok3", "bad1", "ok4"]);
    let again = &delivered[3];
    assert_eq!(again.redelivery, "redrive");
    assert_eq!(again.sequence, sequences["bad1"]);
    assert_eq!(
        again.previous, sequences["ok1"],
        "its original place in the chain"
    );
    assert_eq!(
        delivered[4].redelivery, "",
        "first deliveries are not marked"
    );
    assert!(again.signature_valid(&subscription.secret));

    eventually(Duration::from_secs(10), "one dead letter is left", || {
        let mut client = client.clone();
        async move {
            partition(&mut client, id, "ops:dead")
                .await
                .is_some_and(|status| status.dead_letter_count == 1 && status.pending_count == 0)
        }
    })
    .await;
    let purged = client
        .purge_dead_letters(proto::PurgeDeadLettersRequest {
            subscription_id: id.to_string(),
            topic: "ops:dead".into(),
            sequences: Vec::new(),
        })
        .await
        .expect("purge")
        .into_inner();
    assert_eq!(purged.purged_count, 1);
    assert!(list_dead(&mut client, id).await.is_empty());
    assert!(all_pending(&mut client, id).await.is_empty());
    let status = partition(&mut client, id, "ops:dead").await.unwrap();
    assert_eq!((status.pending_count, status.dead_letter_count), (0, 0));
    let none = client
        .redrive_dead_letters(proto::RedriveDeadLettersRequest {
            subscription_id: id.to_string(),
            topic: "ops:dead".into(),
            sequences: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.redriven_count, 0);
    app.stop().await;
}

async fn list_dead(
    client: &mut BrokerServiceClient<Channel>,
    subscription_id: &str,
) -> Vec<proto::PendingDelivery> {
    client
        .list_pending(proto::ListPendingRequest {
            subscription_id: subscription_id.to_string(),
            topic: String::new(),
            page_size: 100,
            page_token: String::new(),
            dead_letters_only: true,
        })
        .await
        .expect("list dead letters")
        .into_inner()
        .deliveries
}

/// A subscription whose endpoint fails every attempt for longer than the configured time is
/// disabled, says why, sends nothing more, and delivers in order once resumed.
async fn a_subscription_failing_too_long_is_disabled_until_resumed(backend: Backend) {
    let healed = Arc::new(AtomicBool::new(false));
    let receiver = Receiver::scripted({
        let healed = healed.clone();
        move |_| {
            if healed.load(Ordering::SeqCst) {
                Reply::Status(204)
            } else {
                Reply::Status(502)
            }
        }
    })
    .await;
    let app = spawn_app(backend, |config| {
        config.auto_disable_after = Duration::from_millis(600);
    })
    .await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["ops:down"]);
    request.on_exhausted = proto::OnExhausted::Block as i32;
    request.retry_policy.as_mut().unwrap().max_backoff = Some(millis(50));
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let id = subscription.id.clone();
    publish(&mut client, "ops:down", "one").await;
    publish(&mut client, "ops:down", "two").await;
    eventually(
        Duration::from_secs(20),
        "the subscription is disabled",
        || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let subscription = client
                    .get_subscription(proto::GetSubscriptionRequest { id })
                    .await
                    .unwrap()
                    .into_inner();
                subscription.state == proto::SubscriptionState::Disabled as i32
            }
        },
    )
    .await;
    let disabled = client
        .get_subscription(proto::GetSubscriptionRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        disabled.state_reason.contains("every attempt failed")
            && disabled.state_reason.contains("502"),
        "{disabled:?}"
    );
    let status = partition(&mut client, &id, "ops:down").await;
    assert_eq!(state(&status), proto::PartitionState::Paused);
    // Nothing is sent any more: the attempt count stops growing once in-flight ones end.
    let settled = receiver.received().len();
    eventually(Duration::from_secs(10), "attempts stop", || async {
        let before = receiver.received().len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        receiver.received().len() == before
    })
    .await;
    assert!(receiver.received().len() <= settled + 2, "stopped sending");
    assert_eq!(receiver.delivered_count(), 0);

    healed.store(true, Ordering::SeqCst);
    let resumed = client
        .resume_subscription(proto::ResumeSubscriptionRequest {
            subscription_id: id.clone(),
            topic: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state, proto::SubscriptionState::Active as i32);
    assert!(resumed.state_reason.is_empty());
    eventually(Duration::from_secs(10), "both arrive in order", || async {
        receiver.delivered_count() == 2
    })
    .await;
    assert_eq!(delivered_bodies(&receiver), ["one", "two"]);
    app.stop().await;
}

/// Replay re-sends exactly the asked range of one partition, in order, marked as replays
/// with their original chain; other partitions get nothing.
async fn replay_sends_exactly_the_range_in_order(backend: Backend) {
    let receiver = Receiver::start().await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let subscription = client
        .subscribe(subscribe_request(
            &receiver.url(),
            &["ops:replay", "ops:other"],
        ))
        .await
        .unwrap()
        .into_inner();
    let id = subscription.id.as_str();
    let mut events = Vec::new();
    for index in 1..=6 {
        let response = client
            .publish(publish_request(
                "ops:replay",
                format!("e{index}").into_bytes(),
            ))
            .await
            .unwrap()
            .into_inner();
        events.push(response);
    }
    publish(&mut client, "ops:other", "o1").await;
    eventually(Duration::from_secs(10), "first deliveries", || async {
        receiver.delivered_count() == 7
    })
    .await;
    let first_pass = receiver.received().len();
    let replays = || {
        receiver
            .received()
            .into_iter()
            .filter(|received| received.redelivery == "replay")
            .collect::<Vec<_>>()
    };
    let request = |start, end, limit| proto::ReplayRequest {
        subscription_id: id.to_string(),
        topic: "ops:replay".into(),
        start,
        end,
        limit,
    };
    use proto::replay_request::{End, Start};

    // By sequence: e2..e4.
    let response = client
        .replay(request(
            Some(Start::FromSequence(events[1].sequence)),
            Some(End::ToSequence(events[3].sequence)),
            0,
        ))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(
        (
            response.replayed_count,
            response.skipped_count,
            response.next_sequence
        ),
        (3, 0, 0)
    );
    eventually(
        Duration::from_secs(10),
        "the replayed range arrives",
        || async { replays().len() == 3 },
    )
    .await;
    let got = replays();
    assert_eq!(
        got.iter()
            .map(|received| received.sequence)
            .collect::<Vec<_>>(),
        events[1..4]
            .iter()
            .map(|event| event.sequence)
            .collect::<Vec<_>>(),
        "exactly the range, in order"
    );
    assert_eq!(
        got.iter()
            .map(|received| received.previous)
            .collect::<Vec<_>>(),
        events[0..3]
            .iter()
            .map(|event| event.sequence)
            .collect::<Vec<_>>(),
        "each with its original previous sequence"
    );
    assert!(
        got.iter()
            .all(|received| received.signature_valid(&subscription.secret))
    );

    // By time: everything published at or after e5's time (a millisecond may hold more).
    let from = events[4].published_at.unwrap();
    let from_millis = from.seconds as u64 * 1000 + from.nanos as u64 / 1_000_000;
    let expected: Vec<u64> = events
        .iter()
        .filter(|event| {
            let at = event.published_at.unwrap();
            at.seconds as u64 * 1000 + at.nanos as u64 / 1_000_000 >= from_millis
        })
        .map(|event| event.sequence)
        .collect();
    let response = client
        .replay(request(Some(Start::FromTime(from)), None, 0))
        .await
        .expect("replay by time")
        .into_inner();
    assert_eq!(response.replayed_count, expected.len() as u64);
    eventually(
        Duration::from_secs(10),
        "the time range arrives",
        || async { replays().len() == 3 + expected.len() },
    )
    .await;
    let by_time: Vec<u64> = replays()[3..]
        .iter()
        .map(|received| received.sequence)
        .collect();
    assert_eq!(by_time, expected);

    // A limit: the response says where to go on.
    let response = client
        .replay(request(
            Some(Start::FromSequence(events[0].sequence)),
            None,
            2,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.replayed_count, 2);
    assert_eq!(response.next_sequence, events[2].sequence);
    eventually(
        Duration::from_secs(10),
        "the limited replay arrives",
        || async { replays().len() == 5 + expected.len() },
    )
    .await;
    // Nothing else was sent: no other partition, no first delivery again.
    assert_eq!(receiver.received().len(), first_pass + 5 + expected.len());
    assert!(
        receiver
            .received()
            .iter()
            .filter(|received| received.topic == "ops:other")
            .count()
            == 1
    );

    // A topic the subscription does not receive is refused: nothing of it may be sent there.
    let mut elsewhere = request(Some(Start::FromSequence(1)), None, 0);
    elsewhere.topic = "ops:secret".into();
    let error = client.replay(elsewhere).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");

    // Bad ranges are refused.
    for (start, end) in [
        (None, None),
        (
            Some(Start::FromSequence(events[3].sequence)),
            Some(End::ToSequence(events[1].sequence)),
        ),
    ] {
        let error = client.replay(request(start, end, 0)).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    }
    app.stop().await;
}

crate::on_both_backends!(
    replay_sends_exactly_the_range_in_order,
    a_subscription_failing_too_long_is_disabled_until_resumed,
    dead_letters_are_listed_redriven_and_purged,
    a_blocked_partition_shows_its_error_and_skip_moves_it_on,
    nothing_is_sent_while_paused_and_order_holds_after_resume,
    retry_now_cuts_a_long_backoff_short,
);

/// On DynamoDB, a pause through one instance holds on another that delivers the partition:
/// once PauseSubscription returns, the other instance starts no attempt; a resume through the
/// first gets the other going again, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_through_one_instance_holds_on_another() {
    use crate::support::{Deployment, HeraldProcess, connect};
    let receiver = Receiver::start().await;
    let witness = Receiver::start().await;
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let first = HeraldProcess::start(&deployment).await;
    let second = HeraldProcess::start(&deployment).await;
    let mut through_first = connect(first.address).await;
    let mut through_second = connect(second.address).await;
    let subscription = through_first
        .subscribe(subscribe_request(&receiver.url(), &["ops:shared"]))
        .await
        .unwrap()
        .into_inner();
    through_first
        .subscribe(subscribe_request(&witness.url(), &["ops:shared"]))
        .await
        .unwrap();
    // Published through the second instance: its worker takes the partition and keeps it.
    publish(&mut through_second, "ops:shared", "e1").await;
    eventually(Duration::from_secs(10), "e1 arrives", || async {
        receiver.delivered_count() == 1
    })
    .await;
    through_first
        .pause_subscription(proto::PauseSubscriptionRequest {
            subscription_id: subscription.id.clone(),
            topic: String::new(),
            reason: String::new(),
        })
        .await
        .expect("pause through the first instance");
    for body in ["e2", "e3"] {
        publish(&mut through_second, "ops:shared", body).await;
    }
    eventually(
        Duration::from_secs(10),
        "the witness gets all three",
        || async { witness.delivered_count() == 3 },
    )
    .await;
    assert_eq!(delivered_bodies(&receiver), ["e1"], "sent while paused");
    through_first
        .resume_subscription(proto::ResumeSubscriptionRequest {
            subscription_id: subscription.id.clone(),
            topic: String::new(),
        })
        .await
        .expect("resume through the first instance");
    eventually(
        Duration::from_secs(15),
        "the kept events arrive",
        || async { receiver.delivered_count() == 3 },
    )
    .await;
    assert_eq!(delivered_bodies(&receiver), ["e1", "e2", "e3"]);
    first.terminate(Duration::from_secs(10)).await;
    second.terminate(Duration::from_secs(10)).await;
}
