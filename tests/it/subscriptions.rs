//! Subscriptions changed in place, through the gRPC API with real receivers, on both stores:
//! a new endpoint while a backlog waits, etags, and secret rotation checked with the Standard
//! Webhooks project's own verifier.

use std::time::Duration;

use herald::proto;

use crate::support::receiver::Received;
use crate::support::{
    Backend, Receiver, Reply, eventually, millis, publish_request, spawn_app, subscribe_request,
};

fn update(
    id: &str,
    paths: &[&str],
    subscription: proto::Subscription,
    etag: &str,
) -> proto::UpdateSubscriptionRequest {
    proto::UpdateSubscriptionRequest {
        subscription: Some(proto::Subscription {
            id: id.to_string(),
            ..subscription
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|path| path.to_string()).collect(),
        }),
        etag: etag.to_string(),
    }
}

/// A new endpoint while a backlog waits at a failing one: everything arrives at the new
/// URL, in order, with the partition's chain whole; a stale etag is refused.
async fn a_new_endpoint_takes_the_waiting_backlog_in_order(backend: Backend) {
    let broken = Receiver::scripted(|_| Reply::Status(500)).await;
    let fixed = Receiver::start().await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&broken.url(), &["upd:orders"]);
    request.retry_policy.as_mut().unwrap().max_attempts = 1000;
    request.retry_policy.as_mut().unwrap().max_backoff = Some(millis(50));
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let id = subscription.id.clone();
    let mut sequences = Vec::new();
    for index in 0..5 {
        let response = client
            .publish(publish_request("upd:orders", format!("e{index}")))
            .await
            .unwrap()
            .into_inner();
        sequences.push(response.sequence);
    }
    eventually(
        Duration::from_secs(10),
        "the broken endpoint is tried",
        || async { broken.received().len() >= 3 },
    )
    .await;
    let read = client
        .get_subscription(proto::GetSubscriptionRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!read.etag.is_empty());
    let updated = client
        .update_subscription(update(
            &id,
            &["endpoint", "retry_policy.max_backoff"],
            proto::Subscription {
                endpoint: fixed.url(),
                retry_policy: Some(proto::RetryPolicy {
                    max_backoff: Some(millis(100)),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &read.etag,
        ))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.endpoint, fixed.url());
    let policy = updated.retry_policy.unwrap();
    assert_eq!(policy.max_backoff, Some(millis(100)));
    assert_eq!(policy.max_attempts, 1000, "fields not named are kept");
    assert_ne!(updated.etag, read.etag);
    eventually(
        Duration::from_secs(15),
        "the backlog arrives at the new URL",
        || async { fixed.delivered_count() == 5 },
    )
    .await;
    let delivered = fixed.delivered();
    assert_eq!(
        delivered
            .iter()
            .map(|received| received.sequence)
            .collect::<Vec<_>>(),
        sequences,
        "in order, nothing lost"
    );
    for pair in delivered.windows(2) {
        assert_eq!(pair[1].previous, pair[0].sequence, "the chain is whole");
    }
    assert_eq!(delivered[0].previous, 0);

    // The etag read before the update is stale now.
    let stale = client
        .update_subscription(update(
            &id,
            &["retry_policy.max_attempts"],
            proto::Subscription {
                retry_policy: Some(proto::RetryPolicy {
                    max_attempts: 5,
                    ..Default::default()
                }),
                ..Default::default()
            },
            &read.etag,
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Aborted, "{stale:?}");
    assert!(stale.message().contains("etag"), "{}", stale.message());
    // Refused with the field at fault, nothing written.
    for (paths, subscription, field) in [
        (vec!["topics"], proto::Subscription::default(), "topics"),
        (
            vec!["filter"],
            proto::Subscription {
                filter: "attributes.region ==".into(),
                ..Default::default()
            },
            "filter",
        ),
        (vec!["colour"], proto::Subscription::default(), "colour"),
        (vec![], proto::Subscription::default(), "update_mask"),
        (
            vec!["endpoint"],
            proto::Subscription {
                endpoint: "ftp://nowhere".into(),
                ..Default::default()
            },
            "endpoint",
        ),
        (
            vec!["retry_policy.initial_backoff"],
            proto::Subscription {
                retry_policy: Some(proto::RetryPolicy {
                    initial_backoff: Some(millis(3_600_000)),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "backoff",
        ),
    ] {
        let error = client
            .update_subscription(update(&id, &paths, subscription, ""))
            .await
            .unwrap_err();
        assert_eq!(
            error.code(),
            tonic::Code::InvalidArgument,
            "{paths:?}: {error:?}"
        );
        assert!(
            error.message().contains(field),
            "{paths:?}: {}",
            error.message()
        );
    }
    let unchanged = client
        .get_subscription(proto::GetSubscriptionRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.etag, updated.etag);
    app.stop().await;
}

/// Checks a received request with the Standard Webhooks project's own verifier.
fn verifies(received: &Received, secret: &str) -> bool {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("webhook-id", received.id.parse().unwrap());
    headers.insert(
        "webhook-timestamp",
        received.timestamp.to_string().parse().unwrap(),
    );
    headers.insert("webhook-signature", received.signature.parse().unwrap());
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .verify(&received.body, &headers)
        .is_ok()
}

/// After a rotation every delivery carries both signatures for the grace window, each
/// verifying with its secret; after it only the new one.
async fn a_rotated_secret_signs_beside_the_old_one_for_its_grace(backend: Backend) {
    let receiver = Receiver::start().await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let first = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut request = subscribe_request(&receiver.url(), &["rot:t"]);
    request.secret = first.into();
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let id = subscription.id.clone();
    client
        .publish(publish_request("rot:t", "before"))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the first delivery", || async {
        receiver.delivered_count() == 1
    })
    .await;
    assert!(verifies(&receiver.delivered()[0], first));

    let rotated = client
        .rotate_secret(proto::RotateSecretRequest {
            subscription_id: id.clone(),
            secret: String::new(),
            grace: Some(millis(3_600_000)),
            etag: String::new(),
        })
        .await
        .expect("rotate")
        .into_inner();
    let second = rotated.secret.clone();
    assert!(second.starts_with("whsec_") && second != first);
    assert!(
        rotated
            .subscription
            .unwrap()
            .previous_secret_expires_at
            .is_some()
    );
    client
        .publish(publish_request("rot:t", "during"))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the second delivery", || async {
        receiver.delivered_count() == 2
    })
    .await;
    let during = receiver.delivered()[1].clone();
    assert_eq!(
        during.signature.split(' ').count(),
        2,
        "{}",
        during.signature
    );
    assert!(verifies(&during, &second), "the new secret verifies");
    assert!(verifies(&during, first), "the old secret still verifies");

    // A retried rotation to the same secret changes nothing; another rotation while the old
    // secret still signs would drop it early, and is refused unless its grace is zero.
    let again = client
        .rotate_secret(proto::RotateSecretRequest {
            subscription_id: id.clone(),
            secret: second.clone(),
            grace: Some(millis(3_600_000)),
            etag: String::new(),
        })
        .await
        .expect("a retried rotation")
        .into_inner();
    assert!(
        again
            .subscription
            .unwrap()
            .previous_secret_expires_at
            .is_some()
    );
    let early = client
        .rotate_secret(proto::RotateSecretRequest {
            subscription_id: id.clone(),
            secret: String::new(),
            grace: Some(millis(3_600_000)),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(early.code(), tonic::Code::FailedPrecondition, "{early:?}");

    // A rotation with no grace: only the newest secret signs.
    let third = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    client
        .rotate_secret(proto::RotateSecretRequest {
            subscription_id: id.clone(),
            secret: third.into(),
            grace: Some(millis(0)),
            etag: String::new(),
        })
        .await
        .expect("rotate again");
    client
        .publish(publish_request("rot:t", "after"))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the third delivery", || async {
        receiver.delivered_count() == 3
    })
    .await;
    let after = receiver.delivered()[2].clone();
    assert_eq!(after.signature.split(' ').count(), 1);
    assert!(verifies(&after, third));
    assert!(!verifies(&after, &second));
    assert!(!verifies(&after, first));
    let bad = client
        .rotate_secret(proto::RotateSecretRequest {
            subscription_id: id.clone(),
            secret: "not-a-secret".into(),
            grace: None,
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    app.stop().await;
}

/// A rate limit of 50 requests per second, over four partitions, measured at the receiver
/// within ±10 %; with a limit in flight, no more requests overlap than allowed. Paced events
/// just wait: nothing counts as a failure.
async fn pacing_holds_the_rate_and_the_requests_in_flight(backend: Backend) {
    let receiver = Receiver::start().await;
    let slow = Receiver::scripted(|_| Reply::Slow(150)).await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["pace:*"]);
    request.max_requests_per_second = 50;
    let paced = client.subscribe(request).await.unwrap().into_inner();
    assert_eq!(paced.max_requests_per_second, 50);
    let mut request = subscribe_request(&slow.url(), &["pace:*"]);
    request.max_in_flight = 2;
    let narrow = client.subscribe(request).await.unwrap().into_inner();
    // The backlog is made while paused, so the limiter, not the publishes, sets the pace.
    for id in [&paced.id, &narrow.id] {
        client
            .pause_subscription(proto::PauseSubscriptionRequest {
                subscription_id: id.clone(),
                topic: String::new(),
                reason: String::new(),
            })
            .await
            .unwrap();
    }
    for index in 0..100 {
        client
            .publish(publish_request(
                &format!("pace:{}", index % 4),
                format!("{index}"),
            ))
            .await
            .unwrap();
    }
    for id in [&paced.id, &narrow.id] {
        client
            .resume_subscription(proto::ResumeSubscriptionRequest {
                subscription_id: id.clone(),
                topic: String::new(),
            })
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(20), "all paced deliveries", || async {
        receiver.delivered_count() == 100
    })
    .await;
    let arrivals: Vec<_> = receiver
        .received()
        .iter()
        .map(|received| received.at)
        .collect();
    assert_eq!(arrivals.len(), 100, "no retries: pacing is not failing");
    // Never faster than the limit, in any second (one more for arrival jitter): a limiter
    // without bursts allows at most 51 starts in a 1 s window. A loaded machine can only make
    // it slower, and late turns are not made up, so the floor only shows the limiter does not
    // hold deliveries back far below the limit.
    let busiest = (0..arrivals.len())
        .map(|first| {
            arrivals[first..]
                .iter()
                .take_while(|at| at.duration_since(arrivals[first]) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(busiest <= 52, "{busiest} requests within one second");
    let span = arrivals[99].duration_since(arrivals[0]).as_secs_f64();
    let rate = 99.0 / span;
    assert!(
        (25.0..=52.0).contains(&rate),
        "{rate:.1} requests per second"
    );

    eventually(Duration::from_secs(30), "all narrow deliveries", || async {
        slow.delivered_count() == 100
    })
    .await;
    let starts: Vec<_> = slow.received().iter().map(|received| received.at).collect();
    for (index, start) in starts.iter().enumerate() {
        let overlapping = starts[index + 1..]
            .iter()
            .filter(|later| later.duration_since(*start) < Duration::from_millis(140))
            .count();
        assert!(
            overlapping <= 1,
            "request {index} overlapped {overlapping} others"
        );
    }
    let status = client
        .get_subscription_status(proto::GetSubscriptionStatusRequest {
            subscription_id: narrow.id.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .partitions
            .iter()
            .all(|partition| partition.consecutive_failures == 0)
    );
    app.stop().await;
}

fn in_region(topic: &str, payload: String, region: &str) -> proto::PublishRequest {
    proto::PublishRequest {
        attributes: [("region".to_string(), region.to_string())].into(),
        ..publish_request(topic, payload)
    }
}

/// A filter delivers the events it matches and no others, with a chain at the receiver
/// that links exactly those; one that does not parse is refused with its position.
async fn a_filter_delivers_what_it_matches_with_a_whole_chain(backend: Backend) {
    let receiver = Receiver::start().await;
    let everything = Receiver::start().await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["flt:*"]);
    request.filter = r#"attributes.region == "eu" && topic != "flt:ignored""#.into();
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    assert_eq!(
        subscription.filter,
        r#"attributes.region == "eu" && topic != "flt:ignored""#
    );
    client
        .subscribe(subscribe_request(&everything.url(), &["flt:*"]))
        .await
        .unwrap();
    let mut expected = Vec::new();
    for index in 0..40 {
        let topic = if index % 5 == 4 {
            "flt:ignored"
        } else {
            "flt:orders"
        };
        let region = if index % 3 == 0 { "us" } else { "eu" };
        let mut request = in_region(topic, format!("{index}"), region);
        if index == 7 {
            // No region at all: an evaluation error, so no match.
            request.attributes.clear();
        }
        let published = client.publish(request).await.unwrap().into_inner();
        let matches = region == "eu" && topic == "flt:orders" && index != 7;
        assert_eq!(
            published.subscription_count,
            if matches { 2 } else { 1 },
            "event {index}"
        );
        if matches {
            expected.push(published.sequence);
        }
    }
    eventually(Duration::from_secs(15), "every event", || async {
        everything.delivered_count() == 40
    })
    .await;
    eventually(Duration::from_secs(15), "the matching events", || async {
        receiver.delivered_count() == expected.len()
    })
    .await;
    let delivered = receiver.delivered();
    assert_eq!(
        delivered.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(delivered[0].previous, 0);
    for pair in delivered.windows(2) {
        assert_eq!(
            pair[1].previous, pair[0].sequence,
            "the chain links what it received"
        );
    }
    for bad in [
        (r#"attributes.region == "#, "line 1 column"),
        ("payload.size() > 0", "`payload`"),
    ] {
        let mut request = subscribe_request(&receiver.url(), &["flt:*"]);
        request.filter = bad.0.into();
        let error = client.subscribe(request).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
        assert!(
            error.message().contains("filter") && error.message().contains(bad.1),
            "{}",
            error.message()
        );
    }
    app.stop().await;
}

/// Changing topics: the removed topic's backlog is dropped and counted in the response's
/// header, an added topic receives what is published after the update.
async fn updated_topics_drop_and_add_partitions(backend: Backend) {
    let receiver = Receiver::scripted(|_| Reply::Status(503)).await;
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["tpc:a", "tpc:b"]);
    request.retry_policy.as_mut().unwrap().max_attempts = 1000;
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let id = subscription.id.clone();
    for index in 0..3 {
        client
            .publish(publish_request("tpc:b", format!("b{index}")))
            .await
            .unwrap();
    }
    client
        .publish(publish_request("tpc:a", "a0"))
        .await
        .unwrap();
    let response = client
        .update_subscription(update(
            &id,
            &["topics"],
            proto::Subscription {
                topics: vec!["tpc:a".into(), "tpc:c".into()],
                ..Default::default()
            },
            "",
        ))
        .await
        .expect("update topics");
    let dropped = response
        .metadata()
        .get(herald::api::DROPPED_DELIVERIES_HEADER)
        .expect("the dropped count")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(dropped, "3");
    assert_eq!(response.into_inner().topics, ["tpc:a", "tpc:c"]);
    let pending = crate::support::all_pending(&mut client, &id).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].topic, "tpc:a");
    let later_b = client
        .publish(publish_request("tpc:b", "b9"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(later_b.subscription_count, 0);
    let c = client
        .publish(publish_request("tpc:c", "c0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.subscription_count, 1);
    // Another update that leaves the topics alone names no count.
    let response = client
        .update_subscription(update(
            &id,
            &["max_in_flight"],
            proto::Subscription {
                max_in_flight: 3,
                ..Default::default()
            },
            "",
        ))
        .await
        .unwrap();
    assert!(
        response
            .metadata()
            .get(herald::api::DROPPED_DELIVERIES_HEADER)
            .is_none()
    );
    app.stop().await;
}

crate::on_both_backends!(
    a_filter_delivers_what_it_matches_with_a_whole_chain,
    updated_topics_drop_and_add_partitions,
    a_new_endpoint_takes_the_waiting_backlog_in_order,
    a_rotated_secret_signs_beside_the_old_one_for_its_grace,
    pacing_holds_the_rate_and_the_requests_in_flight,
);
