//! Behaviours the README documents, each checked with real processes and receivers: graceful
//! shutdown and its bounds, one server per data directory, sequences across restarts, how
//! attempts fail (timeouts, redirects, `Retry-After` only where it applies), the delivery
//! concurrency bound, and the request limits.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald::proto;
use tonic::Code;

use crate::support::{
    Backend, Deployment, HeraldProcess, Receiver, Reply, all_pending, connect, eventually, millis,
    publish_request, spawn_app, spawn_app_on, subscribe_request,
};

/// Sends `signal` and waits for the process to exit; returns its status and how long that took
/// from just before the signal was sent (the process cannot react earlier).
async fn signal_and_wait(
    process: &mut HeraldProcess,
    signal: &str,
    within: Duration,
) -> (std::process::ExitStatus, Duration) {
    let signalled = Instant::now();
    process.signal(signal);
    let status = tokio::time::timeout(within, process.child.wait())
        .await
        .unwrap_or_else(|_| panic!("no exit within {within:?} of SIG{signal}"))
        .expect("wait");
    (status, signalled.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_delivery_finish_and_records_it() {
    let deployment = Deployment::new(Backend::Embedded).await;
    let mut server = HeraldProcess::start_with(&deployment, &["--shutdown-grace", "10s"]).await;
    let receiver = Receiver::scripted(|_| Reply::Slow(1500)).await;
    let mut client = connect(server.address).await;
    // Far above the answer's 1.5 s: a loaded machine must not turn it into a timeout.
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    request.retry_policy.as_mut().unwrap().request_timeout = Some(millis(10_000));
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    client.publish(publish_request("t", "slow")).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the delivery in flight",
        || async { !receiver.received().is_empty() },
    )
    .await;
    let (status, _) = signal_and_wait(&mut server, "TERM", Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    let answered = receiver.received()[0].at + Duration::from_millis(1500);
    assert!(Instant::now() >= answered, "exited before the answer");

    // Recorded: after a restart nothing is pending and nothing is sent again.
    let server = HeraldProcess::start(&deployment).await;
    let mut client = connect(server.address).await;
    assert!(all_pending(&mut client, &subscription.id).await.is_empty());
    // A marker published now is the next delivery the receiver sees.
    client
        .publish(publish_request("t", "marker"))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the marker delivered", || async {
        receiver.received().len() >= 2
    })
    .await;
    let bodies: Vec<_> = receiver
        .received()
        .iter()
        .map(|received| received.body.clone())
        .collect();
    assert_eq!(bodies, ["slow", "marker"]);
    server.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_at_most_the_grace_and_a_second_signal_exits_at_once() {
    let deployment = Deployment::new(Backend::Embedded).await;
    let receiver = Receiver::scripted(|_| Reply::Hang).await;

    // A hanging delivery: the process waits the grace (1 s), then exits; the event stays.
    let mut server = HeraldProcess::start_with(&deployment, &["--shutdown-grace", "1s"]).await;
    let mut client = connect(server.address).await;
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    request.retry_policy.as_mut().unwrap().request_timeout = Some(millis(60_000));
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    client.publish(publish_request("t", "x")).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the delivery in flight",
        || async { !receiver.received().is_empty() },
    )
    .await;
    let (status, took) = signal_and_wait(&mut server, "TERM", Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Still pending after a restart; now a long grace, and a second signal cuts it short.
    let mut server = HeraldProcess::start_with(&deployment, &["--shutdown-grace", "60s"]).await;
    let mut client = connect(server.address).await;
    assert_eq!(all_pending(&mut client, &subscription.id).await.len(), 1);
    eventually(
        Duration::from_secs(10),
        "delivery in flight again",
        || async { receiver.received().len() >= 2 },
    )
    .await;
    server.signal("TERM");
    // The first signal is being handled (the server stops taking calls) before the second.
    eventually(Duration::from_secs(10), "the server stops serving", || {
        let address = server.address;
        async move { tokio::net::TcpStream::connect(address).await.is_err() }
    })
    .await;
    let (status, took) = signal_and_wait(&mut server, "TERM", Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    let deployment = Deployment::new(Backend::Embedded).await;
    let first = HeraldProcess::start(&deployment).await;
    // The first answers a call, so it has opened (and locked) its store: the "listening" line
    // comes before that.
    connect(first.address)
        .await
        .list_subscriptions(proto::ListSubscriptionsRequest::default())
        .await
        .unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(deployment.serve_args())
            .output(),
    )
    .await
    .expect("the second server exits")
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
    first.kill_9().await;
}

async fn sequences_keep_increasing_after_a_restart(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client().await;
    let before = client
        .publish(publish_request("t", "before"))
        .await
        .unwrap()
        .into_inner();
    let deployment = app.stop().await;
    let app = spawn_app_on(deployment, |_| {}).await;
    let mut client = app.client().await;
    let after = client
        .publish(publish_request("t", "after"))
        .await
        .unwrap()
        .into_inner();
    assert!(after.sequence > before.sequence);
    app.stop().await;
}

/// Attempts that time out, redirect, or fail with a `Retry-After` on a status other than 429
/// and 503: each is a failure, retried on the backoff schedule.
async fn timeouts_and_redirects_fail_and_retry_after_applies_only_to_429_and_503(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let receiver =
        Receiver::scripted(
            |received| match (received.path.as_str(), received.attempt) {
                ("/hook/timeout", 1) => Reply::Hang,
                ("/hook/redirect", 1) => Reply::Status(302),
                ("/hook/retry-after", 1) => Reply::RetryAfter(500, 30),
                _ => Reply::Status(200),
            },
        )
        .await;
    let mut client = app.client().await;
    for (path, topic) in [("timeout", "a"), ("redirect", "b"), ("retry-after", "c")] {
        let mut request = subscribe_request(&format!("{}/{path}", receiver.url()), &[topic]);
        let policy = request.retry_policy.as_mut().unwrap();
        // Only the hanging attempt should time out; the answered ones get room on a busy
        // machine, since a late answer would mean a third attempt.
        policy.request_timeout = Some(millis(if path == "timeout" { 1000 } else { 10_000 }));
        policy.initial_backoff = Some(millis(10));
        policy.max_backoff = Some(millis(10_000));
        client.subscribe(request).await.unwrap();
        client.publish(publish_request(topic, path)).await.unwrap();
    }
    eventually(
        Duration::from_secs(20),
        "each delivered on a retry",
        || async { receiver.delivered_count() >= 3 },
    )
    .await;
    let mut attempts: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    for received in receiver.received() {
        attempts.entry(received.path).or_default().push(received.at);
    }
    for (path, times) in &attempts {
        assert_eq!(times.len(), 2, "{path}: one failure, then a success");
    }
    let gap = |path: &str| attempts[path][1] - attempts[path][0];
    // The timeout took its 1 s (counted from before the request reached the receiver, so the
    // gap seen there can be a little shorter); the retry followed within the backoff cap.
    assert!(gap("/hook/timeout") >= Duration::from_millis(850));
    assert!(gap("/hook/timeout") < Duration::from_secs(4));
    assert!(gap("/hook/redirect") < Duration::from_secs(3));
    // A Retry-After of 30 s on a 500 is ignored (honoured, it would mean 10 s here).
    assert!(gap("/hook/retry-after") < Duration::from_secs(3));
    app.stop().await;
}

/// `--delivery-concurrency 2` with six partitions answered slowly: never more than two
/// requests in flight at the receiver, and two at times.
async fn delivery_concurrency_bounds_requests_in_flight(backend: Backend) {
    const ANSWER: Duration = Duration::from_millis(300);
    let app = spawn_app(backend, |config| config.delivery_concurrency = 2).await;
    let receiver = Receiver::scripted(|_| Reply::Slow(ANSWER.as_millis() as u64)).await;
    let mut client = app.client().await;
    for index in 0..6 {
        client
            .subscribe(subscribe_request(
                &format!("{}/{index}", receiver.url()),
                &["t"],
            ))
            .await
            .unwrap();
    }
    for index in 0..2 {
        client
            .publish(publish_request("t", format!("{index}")))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(20), "12 deliveries", || async {
        receiver.delivered_count() >= 12
    })
    .await;
    let received = receiver.received();
    let most = received
        .iter()
        .map(|request| {
            received
                .iter()
                .filter(|other| other.at <= request.at && request.at < other.at + ANSWER)
                .count()
        })
        .max()
        .unwrap();
    assert_eq!(most, 2, "requests in flight at once");
    app.stop().await;
}

async fn the_documented_limits_hold_at_their_edges(backend: Backend) {
    let app = spawn_app(backend, |_| {}).await;
    let mut client = app.client().await;
    let patterns =
        |count: usize| -> Vec<String> { (0..count).map(|index| format!("topic{index}")).collect() };
    let subscribe = |topics: Vec<String>, secret: String| proto::SubscribeRequest {
        topics,
        secret,
        ..subscribe_request("http://127.0.0.1:9/", &[])
    };
    // 32 topic patterns, not 33.
    client
        .subscribe(subscribe(patterns(32), String::new()))
        .await
        .unwrap();
    let status = client
        .subscribe(subscribe(patterns(33), String::new()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 32"), "{status:?}");
    // Secrets of 24 to 64 bytes (base64 after `whsec_`).
    use base64::Engine;
    let secret = |bytes: usize| {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(vec![7u8; bytes])
        )
    };
    for bytes in [24, 64] {
        client
            .subscribe(subscribe(patterns(1), secret(bytes)))
            .await
            .unwrap();
    }
    for bytes in [23, 65] {
        let status = client
            .subscribe(subscribe(patterns(1), secret(bytes)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bytes} bytes");
        assert!(status.message().starts_with("secret"), "{status:?}");
    }
    // 64 attributes, not 65.
    let attributes = |count: usize| -> std::collections::HashMap<String, String> {
        (0..count)
            .map(|index| (format!("key{index}"), "value".to_string()))
            .collect()
    };
    client
        .publish(proto::PublishRequest {
            attributes: attributes(64),
            ..publish_request("t", "x")
        })
        .await
        .unwrap();
    let status = client
        .publish(proto::PublishRequest {
            attributes: attributes(65),
            ..publish_request("t", "x")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 64"), "{status:?}");
    app.stop().await;
}

crate::on_both_backends!(
    sequences_keep_increasing_after_a_restart,
    timeouts_and_redirects_fail_and_retry_after_applies_only_to_429_and_503,
    delivery_concurrency_bounds_requests_in_flight,
    the_documented_limits_hold_at_their_edges,
);

/// A valid value for each documented variable, distinct enough to find in `--help`.
fn sample_value(variable: &str) -> &'static str {
    match variable {
        "HERALD_LISTEN" => "127.0.0.1:7",
        "HERALD_DATA_DIR" => "/tmp/herald-sample-dir",
        "HERALD_STORE" => "dynamodb",
        "HERALD_DYNAMODB_TABLE" => "sample-table",
        "HERALD_DYNAMODB_REGION" => "eu-west-3",
        "HERALD_DYNAMODB_ENDPOINT" => "http://127.0.0.1:7",
        "HERALD_CREATE_TABLE" => "true",
        variable
            if variable.contains("BACKOFF")
                || variable.contains("TIMEOUT")
                || variable.contains("WINDOW")
                || variable.contains("GRACE")
                || variable.contains("LEASE")
                || variable.contains("INTERVAL")
                || variable.contains("AFTER") =>
        {
            "7s"
        }
        _ => "7",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_variable_is_read_and_flags_win() {
    // The README's configuration table is the list.
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n## Configuration")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a configuration section");
    let rows: Vec<(String, String)> = section
        .lines()
        .filter(|line| line.starts_with("| `--"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (
                cells[1].trim_matches('`').into(),
                cells[2].trim_matches('`').into(),
            )
        })
        .collect();
    assert!(rows.len() >= 19, "{rows:?}");

    // Each variable is read by its flag: `--help` shows the value it took from the environment.
    let mut help = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    help.args(["serve", "--help"]);
    for (_, variable) in &rows {
        help.env(variable, sample_value(variable));
    }
    let output = help.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    for (flag, variable) in &rows {
        assert!(text.contains(flag.as_str()), "{flag} missing from --help");
        // Secrets are read without their value being shown.
        let shown = if variable == "HERALD_API_KEYS" {
            format!("[env: {variable}]")
        } else {
            format!("[env: {variable}={}]", sample_value(variable))
        };
        assert!(text.contains(&shown), "{variable} is not read by {flag}");
    }

    // Variables apply, and flags win over them: the data directory comes from the variable,
    // the address from the flag (the variable names port 7).
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("HERALD_LISTEN", "127.0.0.1:7")
        .env("HERALD_DATA_DIR", data_dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("listening in time")
        .unwrap()
        .expect("a first line");
    let address: std::net::SocketAddr = line
        .strip_prefix("herald listening on ")
        .expect("the listening line")
        .parse()
        .unwrap();
    assert_ne!(address.port(), 7);
    let file = data_dir.path().join("herald.redb");
    eventually(
        Duration::from_secs(10),
        "the store in HERALD_DATA_DIR",
        || {
            let exists = file.exists();
            async move { exists }
        },
    )
    .await;
    child.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_created_by_the_command_or_at_start() {
    let endpoint = crate::support::dynamo::endpoint();
    let name = |suffix: &str| {
        format!(
            "{}-{suffix}",
            herald::ids::new_id("created").replace('_', "-")
        )
    };
    // `herald dynamodb create-table`, then again: the second says it exists.
    let table = name("command");
    let create = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .args(["dynamodb", "create-table", "--table", &table])
            .args(["--endpoint", &endpoint])
            .envs(crate::support::dynamo::child_env());
        command.output().unwrap()
    };
    let first = create();
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("created table"));
    let second = create();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already exists"));

    // `herald serve --create-table` on a table that does not exist yet serves on it.
    let deployment = Deployment {
        backend: Backend::Dynamodb,
        data_dir: tempfile::tempdir().unwrap(),
        endpoint: Some(endpoint.clone()),
        table: Some(name("serve")),

        partition_lease: crate::support::TEST_LEASE,
    };
    let server = HeraldProcess::start_with(&deployment, &["--create-table"]).await;
    let receiver = Receiver::start().await;
    let mut client = connect(server.address).await;
    client
        .subscribe(subscribe_request(&receiver.url(), &["t"]))
        .await
        .unwrap();
    client.publish(publish_request("t", "x")).await.unwrap();
    eventually(Duration::from_secs(10), "delivered", || async {
        receiver.delivered_count() == 1
    })
    .await;
    server.kill_9().await;
}
