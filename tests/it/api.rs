//! The gRPC API: idempotency, validation, lookups, paging, reflection and health.

use std::time::Duration;

use herald::proto;
use tonic::Code;

use crate::support::{
    Backend, Receiver, Reply, all_pending, eventually, millis, publish_request, spawn_app,
    subscribe_request,
};

async fn repeated_idempotency_key_returns_the_original_event(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let receiver = Receiver::start().await;
    let mut client = app.client().await;
    client
        .subscribe(subscribe_request(&receiver.url(), &["*"]))
        .await
        .unwrap();
    let request = proto::PublishRequest {
        idempotency_key: "order-17".into(),
        ..publish_request("fin:purchase", "first")
    };
    let original = client.publish(request.clone()).await.unwrap().into_inner();
    assert!(!original.duplicate);
    let other = client
        .publish(publish_request("fin:purchase", "other"))
        .await
        .unwrap()
        .into_inner();
    let repeat = client
        .publish(proto::PublishRequest {
            payload: b"changed".to_vec(),
            ..request.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(repeat.duplicate);
    assert_eq!(repeat.event_id, original.event_id);
    assert_eq!(repeat.sequence, original.sequence);
    assert_eq!(repeat.published_at, original.published_at);
    assert_eq!(repeat.subscription_count, original.subscription_count);
    // The same key on another topic is another event.
    let elsewhere = client
        .publish(proto::PublishRequest {
            topic: "user:new".into(),
            ..request
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!elsewhere.duplicate);
    assert_ne!(elsewhere.event_id, original.event_id);
    // A marker after the repeat on the same topic: once it is delivered, anything the repeat
    // had stored (a lower sequence of the same partition) would have been delivered before it.
    client
        .publish(publish_request("fin:purchase", "marker"))
        .await
        .unwrap();

    // And the event on the other topic (its own partition, unordered with the marker).
    eventually(
        Duration::from_secs(10),
        "the marker and the other topic's event delivered",
        || async {
            let delivered = receiver.delivered();
            delivered
                .iter()
                .any(|received| received.body.as_ref() == b"marker")
                && delivered
                    .iter()
                    .any(|received| received.topic == "user:new")
        },
    )
    .await;
    let bodies: Vec<Vec<u8>> = receiver
        .delivered()
        .iter()
        .map(|received| received.body.to_vec())
        .collect();
    assert_eq!(
        bodies
            .iter()
            .filter(|body| body.as_slice() == b"first")
            .count(),
        2
    );
    assert!(!bodies.iter().any(|body| body.as_slice() == b"changed"));
    assert!(other.sequence > original.sequence);
    app.stop().await;
}

async fn idempotency_keys_expire_after_the_window(backend: Backend) {
    const WINDOW: Duration = Duration::from_secs(1);
    let app = spawn_app(backend, |config| config.idempotency_window = WINDOW).await;
    let mut client = app.client().await;
    // The repeat must reach the store within the window; on a busy machine it may not, and
    // then the round proves nothing and is tried again with a new key.
    let mut round = 0;
    let (request, first) = loop {
        round += 1;
        assert!(
            round <= 5,
            "no repeat made it within {WINDOW:?} in 5 rounds"
        );
        let request = proto::PublishRequest {
            idempotency_key: format!("k{round}"),
            ..publish_request("t", "x")
        };
        let sent = std::time::Instant::now();
        let first = client.publish(request.clone()).await.unwrap().into_inner();
        let second = client.publish(request.clone()).await.unwrap().into_inner();
        if sent.elapsed() < WINDOW {
            assert_eq!(second.event_id, first.event_id);
            assert!(second.duplicate);
            break (request, first);
        }
    };
    eventually(
        Duration::from_secs(5),
        "key forgotten after the window",
        || {
            let mut client = client.clone();
            let request = request.clone();
            let first_id = first.event_id.clone();
            async move { client.publish(request).await.unwrap().into_inner().event_id != first_id }
        },
    )
    .await;
    app.stop().await;
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, fragment: &str) {
    let status = result.expect_err("request must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(fragment),
        "message {:?} should contain {fragment:?}",
        status.message()
    );
    if code == Code::InvalidArgument {
        // Every INVALID_ARGUMENT names its field in google.rpc.BadRequest details too.
        use tonic_types::StatusExt;
        let violations = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("no BadRequest details in {status:?}"))
            .field_violations;
        assert_eq!(violations.len(), 1, "{status:?}");
        let violation = &violations[0];
        assert_eq!(
            status.message(),
            format!("{}: {}", violation.field, violation.description)
        );
    }
}

async fn invalid_input_gets_a_precise_status_and_stores_nothing(backend: Backend) {
    let app = spawn_app(backend, |config| config.max_payload_bytes = 1024).await;
    let receiver = Receiver::scripted(|_| Reply::Status(200)).await;
    let mut client = app.client().await;
    let subscription = client
        .subscribe(subscribe_request(&receiver.url(), &["*"]))
        .await
        .unwrap()
        .into_inner();

    // Publishes.
    let bad_publishes = [
        (publish_request("", "x"), "topic: must not be empty"),
        (
            publish_request("Fin:Purchase", "x"),
            "topic: `Fin:Purchase` is not a valid topic",
        ),
        (
            publish_request("a b", "x"),
            "topic: `a b` is not a valid topic",
        ),
        (
            publish_request(&"a".repeat(129), "x"),
            "topic: must be at most 128 characters",
        ),
        (
            publish_request("ok", vec![0u8; 1025]),
            "payload: 1025 bytes exceeds the limit of 1024 bytes",
        ),
        (
            proto::PublishRequest {
                content_type: "text/\n".into(),
                ..publish_request("ok", "x")
            },
            "content_type",
        ),
        (
            proto::PublishRequest {
                idempotency_key: "k".repeat(300),
                ..publish_request("ok", "x")
            },
            "idempotency_key",
        ),
    ];
    for (request, fragment) in bad_publishes {
        assert_status(
            client.publish(request).await,
            Code::InvalidArgument,
            fragment,
        );
    }
    // A payload far above the limit still gets our message, not a transport error.
    assert_status(
        client
            .publish(publish_request("ok", vec![0u8; 2 * 1024 * 1024]))
            .await,
        Code::InvalidArgument,
        "payload",
    );

    // Subscriptions.
    let with = |change: &dyn Fn(&mut proto::SubscribeRequest)| {
        let mut request = subscribe_request("http://127.0.0.1:9/hook", &["ok"]);
        change(&mut request);
        request
    };
    let bad_subscribes = [
        (
            with(&|request| request.endpoint = String::new()),
            "endpoint: must not be empty",
        ),
        (
            with(&|request| request.endpoint = "not a url".into()),
            "endpoint: `not a url` is not a URL",
        ),
        (
            with(&|request| request.endpoint = "ftp://host/x".into()),
            "endpoint: scheme must be http or https",
        ),
        (
            with(&|request| request.topics.clear()),
            "topics: at least one",
        ),
        (
            with(&|request| request.topics = vec!["user:**".into()]),
            "topics: `user:**`",
        ),
        (
            with(&|request| request.topics = vec!["Bad".into()]),
            "topics: `Bad` is not a valid topic",
        ),
        (
            with(&|request| request.secret = "hunter2".into()),
            "secret: secret must be `whsec_`",
        ),
        (
            with(&|request| request.on_exhausted = 7),
            "on_exhausted: unknown value 7",
        ),
        (
            with(&|request| request.retry_policy.as_mut().unwrap().max_attempts = 5000),
            "retry_policy.max_attempts: must be between 1 and 1000",
        ),
        (
            with(&|request| request.retry_policy.as_mut().unwrap().max_backoff = Some(millis(1))),
            "retry_policy.max_backoff: must be at least initial_backoff",
        ),
        (
            with(&|request| {
                request.retry_policy.as_mut().unwrap().request_timeout =
                    Some(prost_types::Duration {
                        seconds: -1,
                        nanos: 0,
                    })
            }),
            "retry_policy.request_timeout: must be a non-negative duration",
        ),
    ];
    for (request, fragment) in bad_subscribes {
        assert_status(
            client.subscribe(request).await,
            Code::InvalidArgument,
            fragment,
        );
    }

    // Listings and lookups.
    let list = |page_size: i32, page_token: &str| proto::ListSubscriptionsRequest {
        page_size,
        page_token: page_token.into(),
        state: 0,
    };
    assert_status(
        client.list_subscriptions(list(-1, "")).await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        client.list_subscriptions(list(5000, "")).await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        client.list_subscriptions(list(10, "%%%")).await,
        Code::InvalidArgument,
        "page_token",
    );
    let pending =
        |subscription_id: &str, topic: &str, page_token: &str| proto::ListPendingRequest {
            subscription_id: subscription_id.into(),
            topic: topic.into(),
            page_size: 10,
            page_token: page_token.into(),
            dead_letters_only: false,
        };
    assert_status(
        client.list_pending(pending("", "", "")).await,
        Code::InvalidArgument,
        "subscription_id",
    );
    assert_status(
        client.list_pending(pending("sub_nope", "", "")).await,
        Code::NotFound,
        "subscription sub_nope not found",
    );
    assert_status(
        client
            .list_pending(pending(&subscription.id, "B A D", ""))
            .await,
        Code::InvalidArgument,
        "topic",
    );
    assert_status(
        client
            .list_pending(pending(&subscription.id, "", "garbage!"))
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_status(
        client
            .get_subscription(proto::GetSubscriptionRequest {
                id: "sub_nope".into(),
            })
            .await,
        Code::NotFound,
        "sub_nope",
    );
    assert_status(
        client
            .unsubscribe(proto::UnsubscribeRequest {
                id: "sub_nope".into(),
            })
            .await,
        Code::NotFound,
        "sub_nope",
    );
    assert_status(
        client
            .get_subscription(proto::GetSubscriptionRequest { id: String::new() })
            .await,
        Code::InvalidArgument,
        "id",
    );

    // Nothing was stored: one subscription, no pending deliveries, nothing delivered, and the
    // next valid publish is the topic's first event.
    let subscriptions = client
        .list_subscriptions(list(100, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(subscriptions.subscriptions.len(), 1);
    assert!(all_pending(&mut client, &subscription.id).await.is_empty());
    client
        .publish(publish_request("ok", "valid"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the valid event arrives",
        || async { receiver.delivered_count() == 1 },
    )
    .await;
    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].body.as_ref(), b"valid");
    assert_eq!(
        delivered[0].previous, 0,
        "no earlier event was stored on the topic"
    );
    app.stop().await;
}

async fn subscriptions_are_listed_paged_and_deleted_with_their_backlog(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for index in 0..5 {
        let mut request = subscribe_request("http://127.0.0.1:9/unreachable", &["a", "b:*"]);
        request.secret = if index == 0 {
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()
        } else {
            String::new()
        };
        request.retry_policy.as_mut().unwrap().initial_backoff = Some(millis(60_000));
        request.retry_policy.as_mut().unwrap().max_backoff = Some(millis(60_000));
        let subscription = client.subscribe(request).await.unwrap().into_inner();
        if index == 0 {
            assert_eq!(
                subscription.secret,
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            );
        }
        ids.push(subscription.id);
    }
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_subscriptions(proto::ListSubscriptionsRequest {
                page_size: 2,
                page_token,
                state: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.subscriptions.len() <= 2);
        assert!(
            page.subscriptions
                .iter()
                .all(|subscription| subscription.secret.is_empty())
        );
        listed.extend(
            page.subscriptions
                .into_iter()
                .map(|subscription| subscription.id),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, ids);

    let fetched = client
        .get_subscription(proto::GetSubscriptionRequest { id: ids[1].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.topics, ["a", "b:*"]);
    assert_eq!(fetched.on_exhausted, proto::OnExhausted::DeadLetter as i32);
    assert_eq!(fetched.retry_policy.unwrap().max_attempts, 20);
    assert!(fetched.secret.is_empty());

    for topic in ["a", "b:x", "b:y", "c"] {
        client.publish(publish_request(topic, "x")).await.unwrap();
    }
    // Pending across topics, in (topic, sequence) order, paged.
    let mut page_token = String::new();
    let mut topics = Vec::new();
    loop {
        let page = client
            .list_pending(proto::ListPendingRequest {
                subscription_id: ids[0].clone(),
                topic: String::new(),
                page_size: 1,
                page_token,
                dead_letters_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        topics.extend(page.deliveries.into_iter().map(|delivery| delivery.topic));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(topics, ["a", "b:x", "b:y"]);
    let only_b = client
        .list_pending(proto::ListPendingRequest {
            subscription_id: ids[0].clone(),
            topic: "b:y".into(),
            page_size: 10,
            page_token: String::new(),
            dead_letters_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_b.deliveries.len(), 1);

    let dropped = client
        .unsubscribe(proto::UnsubscribeRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dropped.dropped_deliveries, 3);
    let status = client
        .get_subscription(proto::GetSubscriptionRequest { id: ids[0].clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}

async fn a_subscription_receives_only_events_published_after_it(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let receiver = Receiver::start().await;
    let mut client = app.client().await;
    let before = client
        .publish(publish_request("news", "before"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.subscription_count, 0);
    client
        .subscribe(subscribe_request(&receiver.url(), &["news"]))
        .await
        .unwrap();
    let after = client
        .publish(publish_request("news", "after"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.subscription_count, 1);
    assert!(after.sequence > before.sequence);
    eventually(Duration::from_secs(10), "delivered", || async {
        receiver.delivered_count() == 1
    })
    .await;
    let delivered = receiver.delivered();
    assert_eq!(delivered[0].body.as_ref(), b"after");
    assert_eq!(delivered[0].previous, 0);
    app.stop().await;
}

async fn reflection_lists_the_services_and_health_reports_serving(backend: Backend) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let app = spawn_app(backend, |_| {}).await;
    let url = format!("http://{}", app.address);
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "herald.v1.BrokerService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("herald.v1.BrokerService".into()),
    ];
    let request_stream =
        tokio_stream::iter(requests.into_iter().map(|message| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        }));
    let mut responses = reflection
        .server_reflection_info(request_stream)
        .await
        .unwrap()
        .into_inner();
    let listed = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(listed)) = listed.message_response else {
        panic!("expected a service list, got {listed:?}");
    };
    let names: Vec<String> = listed
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert!(
        names.contains(&"herald.v1.BrokerService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    let file = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(file)) = file.message_response else {
        panic!("expected a file descriptor, got {file:?}");
    };
    assert!(!file.file_descriptor_proto.is_empty());

    // grpcurl before 1.9 speaks only v1alpha.
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest as AlphaReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    let mut alpha = AlphaClient::new(channel);
    let request_stream = tokio_stream::iter([AlphaReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    }]);
    let mut responses = alpha
        .server_reflection_info(request_stream)
        .await
        .unwrap()
        .into_inner();
    assert!(
        responses
            .message()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .is_some()
    );
    app.stop().await;
}

crate::on_both_backends!(
    repeated_idempotency_key_returns_the_original_event,
    idempotency_keys_expire_after_the_window,
    invalid_input_gets_a_precise_status_and_stores_nothing,
    subscriptions_are_listed_paged_and_deleted_with_their_backlog,
    a_subscription_receives_only_events_published_after_it,
    reflection_lists_the_services_and_health_reports_serving,
);
