//! Hostile endpoints and receivers: the endpoint address policy (SSRF defence) at Subscribe and
//! at connect time, redirects, and endless response bodies.

use std::time::Duration;

use herald::delivery::endpoint_policy::EndpointPolicy;
use herald::proto;
use tonic::Code;

use crate::support::authority::{Authority, server_config};
use crate::support::receiver::{Receiver, Reply};
use crate::support::{
    Backend, Deployment, HeraldProcess, connect, eventually, eventually_pending, publish_request,
    spawn_app, spawn_app_on, subscribe_request,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_refuses_metadata_link_local_and_special_addresses_in_every_form() {
    let app = spawn_app(Backend::Embedded, |_| {}).await;
    let mut client = app.client.clone();
    for (endpoint, kind) in [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://[fe80::1]:8080/", "link-local"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://255.255.255.255/", "broadcast"),
    ] {
        let status = client
            .subscribe(subscribe_request(endpoint, &["t"]))
            .await
            .expect_err(endpoint);
        assert_eq!(status.code(), Code::InvalidArgument, "{endpoint}");
        assert!(
            status.message().starts_with("endpoint: endpoint policy:")
                && status.message().contains(kind),
            "{endpoint}: {}",
            status.message()
        );
    }
    let listed = client
        .list_subscriptions(proto::ListSubscriptionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.subscriptions.is_empty(), "nothing was stored");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_only_refuses_loopback_at_subscribe_and_at_every_connection() {
    let receiver = Receiver::start().await;
    let port = receiver
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let by_name = format!("http://localhost:{port}/by-name");
    let by_address = format!("http://127.0.0.1:{port}/by-address");

    // Subscribed while loopback was allowed (the default)...
    let app = spawn_app(Backend::Embedded, |_| {}).await;
    let mut client = app.client.clone();
    let mut ids = Vec::new();
    for endpoint in [&by_name, &by_address] {
        let subscription = client
            .subscribe(subscribe_request(endpoint, &["t"]))
            .await
            .unwrap()
            .into_inner();
        ids.push(subscription.id);
    }
    let deployment = app.stop().await;

    // ...then the operator turns public-only on: Subscribe refuses a name that resolves to
    // loopback, and the existing subscriptions' attempts are refused before connecting.
    let app = spawn_app_on(deployment, |config| {
        config.endpoint_policy = EndpointPolicy::PublicOnly;
    })
    .await;
    let mut client = app.client.clone();
    let status = client
        .subscribe(subscribe_request(&by_name, &["t"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("loopback"),
        "{}",
        status.message()
    );
    client.publish(publish_request("t", "x")).await.unwrap();
    for id in &ids {
        eventually_pending(
            &client,
            id,
            Duration::from_secs(10),
            "a refused attempt is recorded",
            |pending| {
                pending.len() == 1
                    && pending[0].attempts >= 1
                    && pending[0].last_error.contains("public-only refuses")
            },
        )
        .await;
    }
    assert!(receiver.received().is_empty(), "no connection was made");
    let deployment = app.stop().await;

    // An allow-list entry admits the address again.
    let app = spawn_app_on(deployment, |config| {
        config.endpoint_policy = EndpointPolicy::PublicOnly;
        config.endpoint_allow = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "both deliveries arrive",
        || async { receiver.delivered_count() == 2 },
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_the_metadata_service_is_a_failure_and_is_not_followed() {
    let receiver = Receiver::scripted(|_| Reply::RedirectToMetadata).await;
    let app = spawn_app(Backend::Embedded, |_| {}).await;
    let mut client = app.client.clone();
    let subscription = client
        .subscribe(subscribe_request(&receiver.url(), &["t"]))
        .await
        .unwrap()
        .into_inner();
    client.publish(publish_request("t", "x")).await.unwrap();
    eventually_pending(
        &client,
        &subscription.id,
        Duration::from_secs(10),
        "the 307 is recorded",
        |pending| pending.len() == 1 && pending[0].last_error.starts_with("HTTP 307"),
    )
    .await;
    app.stop().await;
}

/// An `https` endpoint is verified against the platform's roots (here a test CA given to the
/// real binary in `SSL_CERT_FILE`): a receiver with a certificate from that CA gets the event,
/// signed; one from an unknown CA gets no request, and the attempt records why, as it does for
/// a port that refuses the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_are_verified_against_the_platform_roots() {
    let trusted = Authority::new();
    let stranger = Authority::new();
    let good = Receiver::start_tls(server_config(&trusted.leaf(&["localhost"]))).await;
    let bad = Receiver::start_tls(server_config(&stranger.leaf(&["localhost"]))).await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let roots = deployment.data_dir.path().join("roots.pem");
    std::fs::write(&roots, trusted.pem()).unwrap();
    let roots = roots.to_str().unwrap().to_string();
    let server = HeraldProcess::start_with_env(&deployment, &[], &only_roots(&roots)).await;
    let mut client = connect(server.address).await;
    // And a port nobody listens on any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(listener);
    let mut subscriptions = Vec::new();
    for endpoint in [good.url(), bad.url(), closed] {
        let subscription = client
            .subscribe(subscribe_request(&endpoint, &["t"]))
            .await
            .unwrap()
            .into_inner();
        subscriptions.push(subscription);
    }
    client.publish(publish_request("t", "x")).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the trusted receiver gets the event",
        || async { good.delivered_count() == 1 },
    )
    .await;
    assert!(good.delivered()[0].signature_valid(&subscriptions[0].secret));
    for (subscription, reason) in [
        (
            &subscriptions[1],
            "connection failed: invalid peer certificate",
        ),
        (&subscriptions[2], "connection failed: Connection refused"),
    ] {
        eventually_pending(
            &client,
            &subscription.id,
            Duration::from_secs(10),
            reason,
            |pending| {
                pending.len() == 1
                    && pending[0].attempts >= 1
                    && pending[0].last_error.starts_with(reason)
            },
        )
        .await;
    }
    assert!(bad.received().is_empty(), "no request passed the handshake");
}

/// With no trusted roots at all (a container without a CA bundle), Herald still starts and
/// delivers to `http` endpoints; every `https` attempt fails, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_roots_http_works_and_https_fails_saying_why() {
    let authority = Authority::new();
    let secure = Receiver::start_tls(server_config(&authority.leaf(&["localhost"]))).await;
    let plain = Receiver::start().await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let empty = deployment.data_dir.path().join("no-roots.pem");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap().to_string();
    let server = HeraldProcess::start_with_env(&deployment, &[], &only_roots(&empty)).await;
    let mut client = connect(server.address).await;
    let mut ids = Vec::new();
    for receiver in [&plain, &secure] {
        let subscription = client
            .subscribe(subscribe_request(&receiver.url(), &["t"]))
            .await
            .unwrap()
            .into_inner();
        ids.push(subscription.id);
    }
    client.publish(publish_request("t", "x")).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the http receiver gets the event",
        || async { plain.delivered_count() == 1 },
    )
    .await;
    eventually_pending(
        &client,
        &ids[1],
        Duration::from_secs(10),
        "the https attempt names the missing roots",
        |pending| {
            pending.len() == 1
                && pending[0].attempts >= 1
                && pending[0].last_error.starts_with("connection failed: ")
                && pending[0].last_error.contains("no trusted TLS roots")
        },
    )
    .await;
    assert!(secure.received().is_empty());
}

/// The environment that makes `file` the only trusted roots (a `SSL_CERT_DIR` set outside
/// would add to it).
fn only_roots(file: &str) -> [(&'static str, &str); 2] {
    [("SSL_CERT_FILE", file), ("SSL_CERT_DIR", "")]
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_response_bodies_are_cut_and_memory_stays_bounded() {
    // One receiver accepts with an endless body, one refuses with an endless body.
    let accepting = Receiver::scripted(|_| Reply::Endless(200)).await;
    let refusing = Receiver::scripted(|_| Reply::Endless(500)).await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let server = HeraldProcess::start(&deployment).await;
    let pid = server.child.id().expect("running");
    let mut client = connect(server.address).await;
    client
        .subscribe(subscribe_request(&accepting.url(), &["t"]))
        .await
        .unwrap();
    let failing = client
        .subscribe(subscribe_request(&refusing.url(), &["t"]))
        .await
        .unwrap()
        .into_inner();
    for index in 0..32 {
        client
            .publish(publish_request("t", format!("event {index}")))
            .await
            .unwrap();
    }
    // Without a cap, reading an endless body never ends: nothing would be delivered.
    eventually(
        Duration::from_secs(30),
        "every event is delivered",
        || async { accepting.delivered_count() == 32 },
    )
    .await;
    eventually_pending(
        &client,
        &failing.id,
        Duration::from_secs(10),
        "the 500 is recorded with an excerpt",
        |pending| {
            pending.first().is_some_and(|head| {
                head.last_error.starts_with("HTTP 500")
                    && head.last_error.contains("xxxx")
                    && head.last_error.len() < 300
            })
        },
    )
    .await;
    let rss = rss_bytes(pid);
    assert!(
        rss < 200 * 1024 * 1024,
        "server RSS {} MiB",
        rss / (1024 * 1024)
    );
    server.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_beyond_the_limits_is_resource_exhausted_naming_the_flag() {
    let app = spawn_app(Backend::Embedded, |config| {
        config.max_subscriptions = 2;
        config.max_subscriptions_per_pattern = 1;
    })
    .await;
    let mut client = app.client.clone();
    let request = |topic: &str| subscribe_request("http://127.0.0.1:9/", &[topic]);
    client.subscribe(request("*")).await.unwrap();
    let status = client.subscribe(request("*")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("--max-subscriptions-per-pattern 1"),
        "{}",
        status.message()
    );
    client.subscribe(request("t")).await.unwrap();
    let status = client.subscribe(request("u")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("--max-subscriptions 2"),
        "{}",
        status.message()
    );
    app.stop().await;
}
