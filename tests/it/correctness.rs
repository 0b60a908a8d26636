//! Regression tests of the correctness round: each sequence here once broke a promise the
//! README makes (authorization failing open, deleted or removed subscriptions still sent to,
//! attempts started after SIGTERM, attempts counted twice).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use herald::proto;
use herald::proto::broker_service_client::BrokerServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::faulty::FaultyStore;
use crate::support::receiver::Reply;
use crate::support::{
    Backend, Deployment, HeraldProcess, Receiver, connect, eventually, millis, publish_request,
    spawn_app, spawn_app_with_store, subscribe_request,
};

use crate::support::{api_key as key, with_key};

/// A key limited to `fin:*` must not rotate the secret of, or delete, another team's
/// subscription while that subscription cannot be read: the check fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_limited_key_is_refused_while_the_subscription_cannot_be_read() {
    let (limited, limited_entry) = key("fin-team", &["subscribe", "read"], &["fin:*"]);
    let (admin, admin_entry) = key("platform", &["subscribe", "read"], &[]);
    let deployment = Deployment::new(Backend::Embedded).await;
    let mut config = deployment.config();
    config.api_keys = Some(serde_json::json!({ "keys": [limited_entry, admin_entry] }).to_string());
    let store = FaultyStore::new(deployment.open_store(&config).await);
    let app = spawn_app_with_store(deployment, config, store.clone()).await;
    let mut client = app.client.clone();
    let other_team = client
        .subscribe(with_key(
            subscribe_request("http://127.0.0.1:9/hook", &["ops:*"]),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();

    // Readable: refused for the topics.
    let refused = client
        .unsubscribe(with_key(
            proto::UnsubscribeRequest {
                id: other_team.id.clone(),
            },
            &limited,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Unreadable for one read: the call fails with the store's error, and nothing changes.
    store.fail_subscription_reads(1);
    let unsubscribe = client
        .unsubscribe(with_key(
            proto::UnsubscribeRequest {
                id: other_team.id.clone(),
            },
            &limited,
        ))
        .await
        .unwrap_err();
    assert_eq!(unsubscribe.code(), Code::Unavailable, "{unsubscribe:?}");
    store.fail_subscription_reads(1);
    let rotate = client
        .rotate_secret(with_key(
            proto::RotateSecretRequest {
                subscription_id: other_team.id.clone(),
                ..Default::default()
            },
            &limited,
        ))
        .await
        .unwrap_err();
    assert_eq!(rotate.code(), Code::Unavailable, "{rotate:?}");
    let after = client
        .get_subscription(with_key(
            proto::GetSubscriptionRequest {
                id: other_team.id.clone(),
            },
            &admin,
        ))
        .await
        .expect("the other team's subscription still exists")
        .into_inner();
    assert_eq!(after.etag, other_team.etag, "nothing was changed");

    // Unknown: NotFound, as for any key.
    let unknown = client
        .unsubscribe(with_key(
            proto::UnsubscribeRequest {
                id: "sub_unknown".into(),
            },
            &limited,
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    app.stop().await;
}

/// A subscription whose Retry-After answers are kept at exactly `backoff` (its initial and
/// maximum backoff), so its retries come at known times.
fn exact_backoff(endpoint: &str, topics: &[&str], backoff: u64) -> proto::SubscribeRequest {
    let mut request = subscribe_request(endpoint, topics);
    let policy = request.retry_policy.as_mut().unwrap();
    policy.initial_backoff = Some(millis(backoff));
    policy.max_backoff = Some(millis(backoff));
    request
}

/// How a subscription stops receiving topic `t` in [`nothing_is_sent_after_the_call_returns`].
#[derive(Debug, Clone, Copy)]
enum Removal {
    Unsubscribe,
    /// UpdateSubscription drops `t` and keeps `u`.
    DropTopic,
    /// As `DropTopic`, then `t` is added back at once: what was dropped stays dropped.
    DropTopicAndAddBack,
}

/// Once Unsubscribe (or an update that drops a topic) returns, the endpoint gets nothing more
/// of what was removed, though its partition task was waiting in backoff with a batch in hand.
/// A second subscription on the topic, retrying later than the removed one would have, shows
/// when that retry would have come.
async fn nothing_is_sent_after_the_call_returns(backend: Backend, removal: Removal) {
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    // Answers ask for a retry in 1 s, kept to the subscription's exact backoff; the later
    // subscription fails only its first request.
    let later_failed = AtomicBool::new(false);
    let receiver = Receiver::scripted(move |received| {
        if received.path.ends_with("/later") && later_failed.swap(true, Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::RetryAfter(503, 1)
        }
    })
    .await;
    let removed = client
        .subscribe(exact_backoff(
            &format!("{}/removed", receiver.url()),
            &["t", "u"],
            400,
        ))
        .await
        .unwrap()
        .into_inner();
    client
        .subscribe(exact_backoff(
            &format!("{}/later", receiver.url()),
            &["t"],
            1200,
        ))
        .await
        .unwrap();
    for index in 0..5 {
        client
            .publish(publish_request("t", format!("{index}")))
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "both subscriptions failed their first attempt",
        || async {
            let received = receiver.received();
            ["/removed", "/later"]
                .iter()
                .all(|path| received.iter().any(|request| request.path.ends_with(path)))
        },
    )
    .await;
    let (dropped, returned) = remove(&mut client, &removed.id, removal).await;
    assert_eq!(dropped, 5, "{removal:?}");
    eventually(
        Duration::from_secs(15),
        "the later subscription received all five events",
        || async { receiver.delivered_count() >= 5 },
    )
    .await;
    let after: Vec<String> = receiver
        .received()
        .into_iter()
        .filter(|request| request.path.ends_with("/removed") && request.at > returned)
        .map(|request| format!("sequence {} attempt {}", request.sequence, request.attempt))
        .collect();
    // An attempt that began before the call returned may arrive just after it.
    assert!(
        after.len() <= 1,
        "{removal:?}: sent to the removed endpoint after the call returned: {after:?}"
    );
    app.stop().await;
}

/// Removes topic `t` from subscription `id` as `removal` says; returns the dropped count and
/// when the removal returned.
async fn remove(
    client: &mut BrokerServiceClient<Channel>,
    id: &str,
    removal: Removal,
) -> (u64, Instant) {
    let set_topics = |topics: &[&str]| proto::UpdateSubscriptionRequest {
        subscription: Some(proto::Subscription {
            id: id.to_string(),
            topics: topics.iter().map(|topic| topic.to_string()).collect(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["topics".into()],
        }),
        etag: String::new(),
    };
    match removal {
        Removal::Unsubscribe => {
            let dropped = client
                .unsubscribe(proto::UnsubscribeRequest { id: id.to_string() })
                .await
                .unwrap()
                .into_inner()
                .dropped_deliveries;
            (dropped, Instant::now())
        }
        Removal::DropTopic | Removal::DropTopicAndAddBack => {
            let response = client
                .update_subscription(set_topics(&["u"]))
                .await
                .unwrap();
            let dropped = response
                .metadata()
                .get(herald::api::DROPPED_DELIVERIES_HEADER)
                .expect("the dropped count")
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let returned = Instant::now();
            if let Removal::DropTopicAndAddBack = removal {
                client
                    .update_subscription(set_topics(&["t", "u"]))
                    .await
                    .unwrap();
            }
            (dropped, returned)
        }
    }
}

/// As [`nothing_is_sent_after_the_call_returns`], for a partition busy sending a batch it has
/// in hand (a slow receiver, a long backlog): after the call returns at most the attempt in
/// flight then may reach the endpoint. A second subscription on the topic, at the same pace,
/// shows when the batch would have been sent.
async fn nothing_more_is_sent_from_a_batch_in_hand(backend: Backend, removal: Removal) {
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let receiver = Receiver::scripted(|_| Reply::Slow(50)).await;
    let removed = client
        .subscribe(subscribe_request(
            &format!("{}/removed", receiver.url()),
            &["t", "u"],
        ))
        .await
        .unwrap()
        .into_inner();
    client
        .subscribe(subscribe_request(
            &format!("{}/later", receiver.url()),
            &["t"],
        ))
        .await
        .unwrap();
    for index in 0..40 {
        client
            .publish(publish_request("t", format!("{index}")))
            .await
            .unwrap();
    }
    let sent_to = |path: &'static str| {
        let receiver = &receiver;
        move || {
            receiver
                .received()
                .iter()
                .filter(|request| request.path.ends_with(path))
                .count()
        }
    };
    let removed_count = sent_to("/removed");
    eventually(
        Duration::from_secs(10),
        "the partition is sending its batch",
        || async { removed_count() >= 2 },
    )
    .await;
    let (dropped, returned) = remove(&mut client, &removed.id, removal).await;
    let sent_before = removed_count() as u64;
    assert!(
        dropped + sent_before >= 40,
        "{removal:?}: {dropped} dropped, {sent_before} sent before the call returned"
    );
    let later_count = sent_to("/later");
    eventually(
        Duration::from_secs(20),
        "the later subscription received all forty events",
        || async { later_count() >= 40 },
    )
    .await;
    let after: Vec<u64> = receiver
        .received()
        .into_iter()
        .filter(|request| request.path.ends_with("/removed") && request.at > returned)
        .map(|request| request.sequence)
        .collect();
    assert!(
        after.len() <= 1,
        "{removal:?}: sent to the removed endpoint after the call returned: {after:?}"
    );
    app.stop().await;
}

async fn an_unsubscribed_batch_in_hand_is_not_sent(backend: Backend) {
    nothing_more_is_sent_from_a_batch_in_hand(backend, Removal::Unsubscribe).await;
}

async fn a_removed_topics_batch_in_hand_is_not_sent(backend: Backend) {
    nothing_more_is_sent_from_a_batch_in_hand(backend, Removal::DropTopic).await;
}

async fn a_batch_in_hand_dropped_then_added_back_is_not_sent(backend: Backend) {
    nothing_more_is_sent_from_a_batch_in_hand(backend, Removal::DropTopicAndAddBack).await;
}

async fn an_unsubscribed_endpoint_gets_nothing_after_the_call_returns(backend: Backend) {
    nothing_is_sent_after_the_call_returns(backend, Removal::Unsubscribe).await;
}

async fn a_removed_topic_is_not_sent_after_the_update_returns(backend: Backend) {
    nothing_is_sent_after_the_call_returns(backend, Removal::DropTopic).await;
}

crate::on_both_backends!(
    an_unsubscribed_endpoint_gets_nothing_after_the_call_returns,
    a_removed_topic_is_not_sent_after_the_update_returns,
    an_unsubscribed_batch_in_hand_is_not_sent,
    a_removed_topics_batch_in_hand_is_not_sent,
    a_batch_in_hand_dropped_then_added_back_is_not_sent,
);

/// Embedded store, real binary: event 1 is dead-lettered at its only attempt, event 2 is being
/// sent, and the server is killed (-9) at once, well within the interval in which lazily
/// committed records become durable. After the restart event 2 may come again (its success
/// was not recorded), but event 1 must not: sent after its successor, it would break the
/// receiver's chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_survives_a_crash_right_after_it() {
    let deployment = Deployment::new(Backend::Embedded).await;
    let receiver = Receiver::scripted(|received| match &received.body[..] {
        b"first" => Reply::Status(500),
        _ => Reply::Hang,
    })
    .await;
    let server = HeraldProcess::start(&deployment).await;
    let mut client = connect(server.address).await;
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    request.retry_policy.as_mut().unwrap().max_attempts = 1;
    client.subscribe(request).await.unwrap();
    for payload in ["first", "second"] {
        client.publish(publish_request("t", payload)).await.unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "the second event is being sent",
        || async {
            receiver
                .received()
                .iter()
                .any(|request| &request.body[..] == b"second")
        },
    )
    .await;
    server.kill_9().await;
    let killed = Instant::now();
    receiver.set_script(|_| Reply::Status(200));
    let _restarted = HeraldProcess::start(&deployment).await;
    eventually(
        Duration::from_secs(20),
        "the second event is delivered after the restart",
        || async {
            receiver
                .successes()
                .iter()
                .any(|request| &request.body[..] == b"second")
        },
    )
    .await;
    let first_again: Vec<u32> = receiver
        .received()
        .into_iter()
        .filter(|request| &request.body[..] == b"first" && request.at > killed)
        .map(|request| request.attempt)
        .collect();
    assert!(
        first_again.is_empty(),
        "the dead-lettered event was sent again after the crash: attempts {first_again:?}"
    );
}

/// Embedded store: a delivery record that does not decode (here a format version from the
/// future, as after a downgrade) fails only the command that read it. The other commands of
/// its writer batch commit, the store stays healthy, and the record becomes a dead letter
/// whose error names where its bytes are kept.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_delivery_record_fails_only_its_own_command() {
    use herald::model::{FailureOutcome, PartitionKey, now_millis};
    use herald::store::{DeliveryLog, EmbeddedStore, Store, StoreError, SubscriptionStore};

    use crate::store_conformance::{event, subscription};

    let directory = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(EmbeddedStore::open(directory.path()).unwrap());
    let day = Duration::from_secs(86400);
    for (id, topic) in [("sub_a", "t"), ("sub_b", "u")] {
        store
            .create_subscription(
                &subscription(id, &[topic]),
                &herald::store::SubscriptionLimits::NONE,
            )
            .await
            .unwrap();
    }
    let mut sequences = Vec::new();
    for index in 0..3 {
        let published = store
            .publish(&event(&format!("evt_t{index}"), "t", None), day)
            .await
            .unwrap();
        sequences.push(published.sequence);
    }
    let other = store
        .publish(&event("evt_u", "u", None), day)
        .await
        .unwrap()
        .sequence;
    let damaged = PartitionKey::new("t", "sub_a");
    let healthy = PartitionKey::new("u", "sub_b");
    store.damage_delivery(&damaged, sequences[0]).unwrap();

    // The stall holds the writer while both commands queue: they meet in one batch (counted
    // below, so the test cannot pass with two).
    let batches = store.batches_applied();
    store.inject_writer_stall(Duration::from_millis(500));
    let failure = {
        let store = store.clone();
        let damaged = damaged.clone();
        let head = sequences[0];
        tokio::spawn(async move {
            let at = now_millis() + 60_000;
            store
                .record_failure(
                    &damaged,
                    head,
                    1,
                    "HTTP 500",
                    FailureOutcome::RetryAt(at),
                    None,
                )
                .await
        })
    };
    let completion = {
        let store = store.clone();
        let healthy = healthy.clone();
        tokio::spawn(async move { store.complete_deliveries(&healthy, &[other], None).await })
    };
    let failure = failure.await.unwrap();
    assert!(
        matches!(failure, Err(StoreError::Corrupt(_))),
        "the command that read the damaged record: {failure:?}"
    );
    completion
        .await
        .unwrap()
        .expect("the other command of the batch commits");
    assert_eq!(
        store.batches_applied(),
        batches + 1,
        "both commands were applied in one batch"
    );
    assert!(*store.health().expect("health").borrow(), "still healthy");
    assert!(
        store
            .next_deliveries(&healthy, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The damaged delivery is a dead letter now; the partition goes on with the next one.
    let next: Vec<u64> = store
        .next_deliveries(&damaged, 10)
        .await
        .unwrap()
        .iter()
        .map(|delivery| delivery.event.sequence)
        .collect();
    assert_eq!(next, sequences[1..]);
    let pending = store
        .list_pending("sub_a", None, true, 10, None)
        .await
        .unwrap();
    assert_eq!(pending.items.len(), 1);
    assert_eq!(pending.items[0].event.sequence, sequences[0]);
    let error = pending.items[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("quarantine table"), "{error}");
}
