//! The README walk-through with the real binary: serve, sink, subscribe, publish, pending.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{Backend, Deployment, HeraldProcess};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn herald(server: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("HERALD_SERVER", server)
        .output()
        .await
        .expect("run herald");
    assert!(
        output.status.success(),
        "herald {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walk_through_works_with_the_cli_and_the_sink() {
    let deployment = Deployment::new(Backend::Embedded).await;
    let server = HeraldProcess::start(&deployment).await;
    let url = format!("http://{}", server.address);

    let mut sink = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["sink", "--listen", "127.0.0.1:0", "--secret", SECRET])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start sink");
    let mut lines = BufReader::new(sink.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the sink prints its address in time")
        .unwrap()
        .expect("sink address");
    let sink_url = first
        .strip_prefix("sink listening on ")
        .expect("sink prints its address")
        .to_string();

    let subscribed = herald(
        &url,
        &[
            "subscribe",
            "--endpoint",
            &sink_url,
            "--topic",
            "user:*",
            "--secret",
            SECRET,
        ],
    )
    .await;
    let subscription_id = subscribed.split_whitespace().next().unwrap().to_string();
    assert!(subscription_id.starts_with("sub_"), "{subscribed}");
    assert!(subscribed.contains(&format!("secret={SECRET}")));

    let first_publish = herald(
        &url,
        &["publish", "--topic", "user:new", "--data", r#"{"id": 1}"#],
    )
    .await;
    assert!(first_publish.contains("subscriptions=1"), "{first_publish}");
    herald(
        &url,
        &[
            "publish",
            "--topic",
            "user:new",
            "--data",
            r#"{"id": 2}"#,
            "--idempotency-key",
            "k2",
        ],
    )
    .await;
    let repeat = herald(
        &url,
        &[
            "publish",
            "--topic",
            "user:new",
            "--data",
            r#"{"id": 2}"#,
            "--idempotency-key",
            "k2",
        ],
    )
    .await;
    assert!(repeat.contains("duplicate"), "{repeat}");

    let mut printed = Vec::new();
    while printed.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the sink prints each delivery")
            .unwrap()
            .expect("sink output");
        printed.push(line);
    }
    assert!(
        printed[0].contains("signature=ok") && printed[0].contains("chain=first seen"),
        "{printed:?}"
    );
    assert!(printed[0].contains(r#"body={"id": 1}"#), "{printed:?}");
    assert!(
        printed[1].contains("signature=ok") && printed[1].contains("chain=ok"),
        "{printed:?}"
    );

    let listed = herald(&url, &["subscriptions"]).await;
    assert!(
        listed.contains(&subscription_id) && listed.contains("topics=user:*"),
        "{listed}"
    );
    let pending = herald(&url, &["pending", &subscription_id]).await;
    assert!(pending.contains("no pending deliveries"), "{pending}");
    let dropped = herald(&url, &["unsubscribe", &subscription_id]).await;
    assert!(dropped.contains("dropped_deliveries=0"), "{dropped}");

    // Errors are one clear line and a failing exit status.
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["publish", "--topic", "Bad Topic"])
        .env("HERALD_SERVER", &url)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("topic"),
        "{stderr}"
    );
    server.kill_9().await;
}

/// `herald keys generate` without `--topic` makes a key for every topic, as its help says, and
/// the entry it prints is accepted by a server; a bad pattern is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_generate_defaults_to_every_topic() {
    let output = herald("", &["keys", "generate", "--name", "ops", "--role", "read"]).await;
    let mut lines = output.lines().filter(|line| !line.is_empty());
    let key = lines.nth(1).expect("the key").to_string();
    let entry: serde_json::Value =
        serde_json::from_str(lines.next_back().expect("the entry")).expect("JSON entry");
    assert_eq!(entry["topics"], serde_json::json!([]), "{entry}");
    assert!(key.starts_with("hrld_"), "{key}");
    let keys = serde_json::json!({ "keys": [entry] }).to_string();
    let app =
        crate::support::spawn_app(Backend::Embedded, |config| config.api_keys = Some(keys)).await;
    let mut request = tonic::Request::new(herald::proto::ListSubscriptionsRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    app.client
        .clone()
        .list_subscriptions(request)
        .await
        .expect("the generated key reads");
    app.stop().await;

    let refused = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["keys", "generate", "--name", "ops", "--role", "read"])
        .args(["--topic", "bad pattern"])
        .output()
        .await
        .expect("run herald");
    assert!(!refused.status.success());
}
