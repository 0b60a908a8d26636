//! API keys: unauthenticated and forbidden calls, topic limits, reloading the key file, the
//! CLI's `--api-key`, and the refusal to serve on the network without keys.

use std::time::Duration;

use herald::proto;
use herald::proto::broker_service_client::BrokerServiceClient;
use tonic::Code;

use crate::support::{
    Backend, Deployment, HeraldProcess, connect, eventually, publish_request, spawn_app,
    subscribe_request,
};

use crate::support::{api_key as key, with_key};

fn key_set(entries: &[&serde_json::Value]) -> String {
    serde_json::json!({ "keys": entries }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_a_known_key_while_health_and_reflection_stay_open() {
    let (publisher, entry) = key("billing", &["publish"], &[]);
    let keys = key_set(&[&entry]);
    let app = spawn_app(Backend::Embedded, |config| config.api_keys = Some(keys)).await;
    let mut client = app.client.clone();

    let missing = client.publish(publish_request("t", "x")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("missing"),
        "{}",
        missing.message()
    );
    let (stranger, _) = herald::auth::generate_key();
    let unknown = client
        .publish(with_key(publish_request("t", "x"), &stranger))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(unknown.message(), "unknown API key");
    client
        .publish(with_key(publish_request("t", "x"), &publisher))
        .await
        .expect("a known key publishes");

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "herald.v1.BrokerService".into(),
        })
        .await
        .expect("health needs no key");
    assert_eq!(health.into_inner().status, 1);

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request_stream = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]);
    let listed = ServerReflectionClient::new(channel)
        .server_reflection_info(request_stream)
        .await
        .expect("reflection needs no key")
        .into_inner()
        .message()
        .await
        .expect("a reflection answer")
        .expect("one message");
    assert!(
        matches!(
            listed.message_response,
            Some(MessageResponse::ListServicesResponse(_))
        ),
        "{listed:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_topic_limits_are_enforced_with_messages_naming_the_key() {
    let (publisher, publisher_entry) = key("billing", &["publish"], &["fin:*"]);
    let (manager, manager_entry) = key("fin-team", &["subscribe"], &["fin:*"]);
    let (admin, admin_entry) = key("platform", &["subscribe", "publish"], &[]);
    let (reader, reader_entry) = key("dashboard", &["read"], &[]);
    let keys = key_set(&[
        &publisher_entry,
        &manager_entry,
        &admin_entry,
        &reader_entry,
    ]);
    let app = spawn_app(Backend::Embedded, |config| config.api_keys = Some(keys)).await;
    let mut client = app.client.clone();

    client
        .publish(with_key(publish_request("fin:purchase", "x"), &publisher))
        .await
        .expect("within its topics");
    let outside = client
        .publish(with_key(publish_request("user:new", "x"), &publisher))
        .await
        .unwrap_err();
    assert_eq!(outside.code(), Code::PermissionDenied);
    assert!(
        outside.message().contains("`billing`") && outside.message().contains("user:new"),
        "{}",
        outside.message()
    );
    let wrong_role = client
        .subscribe(with_key(
            subscribe_request("http://127.0.0.1:9/", &["fin:*"]),
            &publisher,
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong_role.code(), Code::PermissionDenied);
    assert_eq!(
        wrong_role.message(),
        "API key `billing` (roles: publish) may not call Subscribe: it needs role `subscribe`"
    );

    // A manager limited to fin:* cannot subscribe beyond it, nor touch others' subscriptions.
    let too_wide = client
        .subscribe(with_key(
            subscribe_request("http://127.0.0.1:9/", &["*"]),
            &manager,
        ))
        .await
        .unwrap_err();
    assert_eq!(too_wide.code(), Code::PermissionDenied);
    let fin = client
        .subscribe(with_key(
            subscribe_request("http://127.0.0.1:9/", &["fin:eu:*"]),
            &manager,
        ))
        .await
        .expect("within its topics")
        .into_inner();
    let user = client
        .subscribe(with_key(
            subscribe_request("http://127.0.0.1:9/", &["user:*"]),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let denied = client
        .unsubscribe(with_key(
            proto::UnsubscribeRequest {
                id: user.id.clone(),
            },
            &manager,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let seen = client
        .list_subscriptions(with_key(
            proto::ListSubscriptionsRequest::default(),
            &manager,
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = seen.subscriptions.into_iter().map(|sub| sub.id).collect();
    assert_eq!(ids, [fin.id], "a limited key sees only its subscriptions");

    // A reader reads everything and changes nothing.
    let all = client
        .list_subscriptions(with_key(
            proto::ListSubscriptionsRequest::default(),
            &reader,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.subscriptions.len(), 2);
    client
        .list_pending(with_key(
            proto::ListPendingRequest {
                subscription_id: user.id.clone(),
                ..Default::default()
            },
            &reader,
        ))
        .await
        .expect("read");
    let read_only = client
        .unsubscribe(with_key(proto::UnsubscribeRequest { id: user.id }, &reader))
        .await
        .unwrap_err();
    assert_eq!(read_only.code(), Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_file_is_reloaded_without_a_restart_and_the_cli_sends_its_key() {
    let (old, old_entry) = key("old", &["publish"], &[]);
    let (new, new_entry) = key("new", &["publish"], &[]);
    let deployment = Deployment::new(Backend::Embedded).await;
    let file = deployment.data_dir.path().join("keys.json");
    std::fs::write(&file, key_set(&[&old_entry])).unwrap();
    let server =
        HeraldProcess::start_with(&deployment, &["--api-keys-file", file.to_str().unwrap()]).await;
    let cli_publish = |key: String| {
        let address = server.address;
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
                .args(["publish", "--topic", "t", "--data", "{}"])
                .args(["--server", &format!("http://{address}")])
                .env("HERALD_API_KEY", key)
                .output()
                .await
                .expect("run herald publish")
        }
    };
    let output = cli_publish(old.clone()).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = cli_publish(new.clone()).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown API key"));

    // Rotate: the file now holds only the new key. Written whole, then renamed into place.
    let staged = deployment.data_dir.path().join("keys.json.new");
    std::fs::write(&staged, key_set(&[&new_entry])).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    let mut client = connect(server.address).await;
    eventually(Duration::from_secs(10), "the new key is accepted", || {
        let mut client = client.clone();
        let new = new.clone();
        async move {
            client
                .publish(with_key(publish_request("t", "x"), &new))
                .await
                .is_ok()
        }
    })
    .await;
    let refused = client
        .publish(with_key(publish_request("t", "x"), &old))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // A broken file is reported and the keys in force stay, through several reloads.
    std::fs::write(&file, "{not json").unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        client
            .publish(with_key(publish_request("t", "x"), &new))
            .await
            .expect("the previous keys stay in force");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_on_the_network_without_keys_is_refused_unless_insecure_is_explicit() {
    let data_dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data_dir.path())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("without API keys") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );
    assert!(
        !data_dir.path().join("herald.redb").exists(),
        "refused before opening the store"
    );

    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--insecure-no-auth",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("started in time")
        .unwrap()
        .expect("a listening line");
    let port = line.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let mut client = connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    client
        .publish(publish_request("t", "x"))
        .await
        .expect("open");
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_has_its_own_publish_and_subscribe_rate() {
    use tonic_types::StatusExt;
    let (first, first_entry) = key("first", &["publish", "subscribe"], &[]);
    let (second, second_entry) = key("second", &["publish"], &[]);
    let keys = key_set(&[&first_entry, &second_entry]);
    let app = spawn_app(Backend::Embedded, |config| {
        config.api_keys = Some(keys);
        config.rate_limit_publish = 5;
        config.rate_limit_manage = 1;
    })
    .await;
    let mut client = app.client.clone();
    // A burst of the rate goes through at once; calls beyond it are refused with when to
    // return. Twenty at once: the burst of 5, and at most what refills meanwhile, succeed.
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut client = client.clone();
            let request = with_key(publish_request("t", "x"), &first);
            tokio::spawn(async move { client.publish(request).await })
        })
        .collect();
    let mut refused = None;
    let mut accepted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(status) => refused = Some(status),
        }
    }
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (5..=5 + refilled).contains(&accepted),
        "{accepted} of 20 accepted, burst 5, {refilled} refilled meanwhile"
    );
    let refused = refused.expect("the rate is enforced");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("`first`"),
        "{}",
        refused.message()
    );
    let wait = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    // Another key has its own budget.
    client
        .publish(with_key(publish_request("t", "x"), &second))
        .await
        .expect("a separate budget");
    // After the wait, the first key publishes again.
    eventually(Duration::from_secs(5), "the budget refills", || {
        let mut client = client.clone();
        let first = first.clone();
        async move {
            client
                .publish(with_key(publish_request("t", "x"), &first))
                .await
                .is_ok()
        }
    })
    .await;

    // Subscription changes have their own, smaller budget.
    let subscribe = |client: &mut BrokerServiceClient<tonic::transport::Channel>| {
        let request = with_key(subscribe_request("http://127.0.0.1:9/", &["t"]), &first);
        let mut client = client.clone();
        async move { client.subscribe(request).await }
    };
    // A burst of 1: the first call goes through, and of the next two (one after the other,
    // well within the second it takes to refill) at most one more.
    let started = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(
            subscribe(&mut client)
                .await
                .map(|_| ())
                .map_err(|status| status.code()),
        );
    }
    let refilled = started.elapsed().as_secs_f64().ceil() as usize;
    assert_eq!(outcomes[0], Ok(()), "{outcomes:?}");
    let accepted = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    assert!(accepted <= 1 + refilled, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Ok(()) | Err(Code::ResourceExhausted))),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&Err(Code::ResourceExhausted)),
        "{outcomes:?}"
    );
    app.stop().await;
}

/// Every operator control, called with `key`: the status of each call, by RPC name.
async fn operator_controls(
    client: &mut BrokerServiceClient<tonic::transport::Channel>,
    key: &str,
    id: &str,
    head: u64,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let id = id.to_string();
    let topic = "t".to_string();
    vec![
        (
            "PauseSubscription",
            client
                .pause_subscription(with_key(
                    proto::PauseSubscriptionRequest {
                        subscription_id: id.clone(),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map(drop),
        ),
        (
            "ResumeSubscription",
            client
                .resume_subscription(with_key(
                    proto::ResumeSubscriptionRequest {
                        subscription_id: id.clone(),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map(drop),
        ),
        (
            "RetryNow",
            client
                .retry_now(with_key(
                    proto::RetryNowRequest {
                        subscription_id: id.clone(),
                        topic: topic.clone(),
                    },
                    key,
                ))
                .await
                .map(drop),
        ),
        (
            "SkipHead",
            client
                .skip_head(with_key(
                    proto::SkipHeadRequest {
                        subscription_id: id.clone(),
                        topic: topic.clone(),
                        sequence: head,
                    },
                    key,
                ))
                .await
                .map(drop),
        ),
        (
            "RedriveDeadLetters",
            client
                .redrive_dead_letters(with_key(
                    proto::RedriveDeadLettersRequest {
                        subscription_id: id.clone(),
                        topic: topic.clone(),
                        sequences: Vec::new(),
                    },
                    key,
                ))
                .await
                .map(drop),
        ),
        (
            "PurgeDeadLetters",
            client
                .purge_dead_letters(with_key(
                    proto::PurgeDeadLettersRequest {
                        subscription_id: id.clone(),
                        topic: topic.clone(),
                        sequences: Vec::new(),
                    },
                    key,
                ))
                .await
                .map(drop),
        ),
        (
            "Replay",
            client
                .replay(with_key(
                    proto::ReplayRequest {
                        subscription_id: id.clone(),
                        topic: topic.clone(),
                        start: Some(proto::replay_request::Start::FromSequence(1)),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map(drop),
        ),
    ]
}

/// The operator controls need the `operate` role: read and subscribe keys (even unlimited
/// ones) are refused naming the role, an operate key is let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_controls_need_the_operate_role() {
    let (reader, reader_entry) = key("dashboard", &["read"], &[]);
    let (manager, manager_entry) = key("platform", &["subscribe", "publish", "read"], &[]);
    let (operator, operator_entry) = key("on-call", &["operate"], &[]);
    let keys = key_set(&[&reader_entry, &manager_entry, &operator_entry]);
    let app = spawn_app(Backend::Embedded, |config| config.api_keys = Some(keys)).await;
    let mut client = app.client.clone();
    let subscription = client
        .subscribe(with_key(
            subscribe_request("http://127.0.0.1:9/hook", &["t"]),
            &manager,
        ))
        .await
        .unwrap()
        .into_inner();
    let head = client
        .publish(with_key(publish_request("t", "x"), &manager))
        .await
        .unwrap()
        .into_inner()
        .sequence;
    for (name, key) in [("dashboard", &reader), ("platform", &manager)] {
        for (call, result) in operator_controls(&mut client, key, &subscription.id, head).await {
            let status = result.expect_err(call);
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{name} {call}: {status:?}"
            );
            assert!(
                status.message().contains(name) && status.message().contains("operate"),
                "{call}: {}",
                status.message()
            );
        }
    }
    for (call, result) in operator_controls(&mut client, &operator, &subscription.id, head).await {
        if let Err(status) = result {
            assert!(
                !matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "operate key {call}: {status:?}"
            );
        }
    }
    app.stop().await;
}
