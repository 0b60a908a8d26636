//! The admin listener's status page, loaded in a real headless Chromium while a partition is
//! blocked; and its authentication.

use std::time::Duration;

use herald::proto;

use crate::support::browser::Browser;
use crate::support::with_key;
use crate::support::{
    Backend, Deployment, HeraldProcess, Receiver, Reply, connect, eventually, publish_request,
    subscribe_request,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_partition_is_shown_first_on_the_status_page() {
    let failing = Receiver::scripted(|_| Reply::Status(503)).await;
    let healthy = Receiver::start().await;
    let deployment = Deployment::new(Backend::Embedded).await;
    let server = HeraldProcess::start_with(&deployment, &["--admin-listen", "127.0.0.1:0"]).await;
    let url = server.admin_url.clone().expect("admin url");
    let mut client = connect(server.address).await;
    // The healthy one is created first, so ids alone would list it first.
    let fine = client
        .subscribe(subscribe_request(&healthy.url(), &["pay:*"]))
        .await
        .unwrap()
        .into_inner();
    let mut request = subscribe_request(&failing.url(), &["pay:card"]);
    request.on_exhausted = proto::OnExhausted::Block as i32;
    request.retry_policy.as_mut().unwrap().max_attempts = 2;
    let stuck = client.subscribe(request).await.unwrap().into_inner();
    client
        .publish(publish_request("pay:card", "order 1"))
        .await
        .unwrap();
    client
        .publish(publish_request("pay:card", "order 2"))
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the partition is blocked", || {
        let mut client = client.clone();
        let id = stuck.id.clone();
        async move {
            let status = client
                .get_subscription_status(proto::GetSubscriptionStatusRequest {
                    subscription_id: id,
                    page_size: 0,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            status
                .partitions
                .first()
                .is_some_and(|partition| partition.state == proto::PartitionState::Blocked as i32)
        }
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the healthy one got both",
        || async { healthy.delivered_count() == 2 },
    )
    .await;

    let browser = Browser::start().await;
    browser.open(&url).await;
    let blocked = browser
        .find_all(&format!(
            "tr.partition[data-state=\"BLOCKED\"][data-subscription=\"{}\"]",
            stuck.id
        ))
        .await;
    assert_eq!(blocked.len(), 1, "one blocked partition in the DOM");
    let row = browser.text(&blocked[0]).await;
    assert!(row.contains("pay:card"), "{row}");
    assert!(row.contains("BLOCKED"), "{row}");
    assert!(row.contains("HTTP 503"), "the last error is shown: {row}");
    assert!(row.contains(" 2 "), "two pending: {row}");
    let subscriptions = browser.find_all("tr.subscription").await;
    assert_eq!(subscriptions.len(), 2);
    assert_eq!(
        browser
            .attribute(&subscriptions[0], "data-subscription")
            .await,
        stuck.id,
        "the blocked subscription comes first"
    );
    assert_eq!(
        browser
            .attribute(&subscriptions[1], "data-subscription")
            .await,
        fine.id
    );
    let summary = browser.find_all("#summary").await;
    let summary = browser.text(&summary[0]).await;
    assert!(summary.contains("1 blocked"), "{summary}");

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    assert!(png.len() > 10_000, "a real rendering, {} bytes", png.len());
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &png).expect("save the screenshot");
    eprintln!("status page screenshot: {}", path.display());
    browser.close().await;
    server.terminate(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_listener_takes_the_api_keys() {
    let deployment = Deployment::new(Backend::Embedded).await;
    let key = "hrld_statuspagetestkeystatuspagetestkeystatuspag";
    let hash = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        digest
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    };
    let publisher = "hrld_publisheronlypublisheronlypublisheronlypubl";
    let publisher_hash = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(publisher.as_bytes());
        digest
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    };
    let keys = format!(
        r#"{{"keys": [{{"name": "ops", "roles": ["read"], "sha256": "{hash}"}},
                      {{"name": "app", "roles": ["publish"], "sha256": "{publisher_hash}"}}]}}"#
    );
    let file = deployment.data_dir.path().join("keys.json");
    std::fs::write(&file, keys).unwrap();
    let server = HeraldProcess::start_with(
        &deployment,
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--api-keys-file",
            file.to_str().unwrap(),
        ],
    )
    .await;
    let url = server.admin_url.clone().expect("admin url");
    let http = reqwest::Client::new();
    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(
        anonymous
            .headers()
            .get("www-authenticate")
            .is_some_and(|value| value.to_str().unwrap().starts_with("Basic")),
        "a browser is asked to log in"
    );
    let wrong = http
        .get(&url)
        .bearer_auth("hrld_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let publish_only = http.get(&url).bearer_auth(publisher).send().await.unwrap();
    assert_eq!(publish_only.status(), 403);
    let page = http.get(&url).bearer_auth(key).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Herald status"));
    let basic = http
        .get(&url)
        .basic_auth("anyone", Some(key))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    let metrics = http
        .get(format!("{url}metrics"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("herald_"));
    server.terminate(Duration::from_secs(10)).await;
}

/// Text that receivers and operators choose (a receiver's response excerpt, a pause reason)
/// is shown escaped, never as markup; a key limited to some topics sees only the
/// subscriptions within them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chosen_text_is_escaped_and_a_limited_key_sees_only_its_subscriptions() {
    let deployment = Deployment::new(Backend::Embedded).await;
    let (reader, reader_hash) = herald::auth::generate_key();
    let (fin_reader, fin_hash) = herald::auth::generate_key();
    let (admin, admin_hash) = herald::auth::generate_key();
    let keys = serde_json::json!({"keys": [
        {"name": "ops", "roles": ["read"], "sha256": reader_hash},
        {"name": "fin", "roles": ["read"], "topics": ["fin:*"], "sha256": fin_hash},
        {"name": "admin", "roles": ["subscribe", "publish", "operate", "read"], "sha256": admin_hash},
    ]});
    let file = deployment.data_dir.path().join("keys.json");
    std::fs::write(&file, keys.to_string()).unwrap();
    let server = HeraldProcess::start_with(
        &deployment,
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--api-keys-file",
            file.to_str().unwrap(),
        ],
    )
    .await;
    let hostile = Receiver::scripted(|_| Reply::Body(500, "<script>alert('hi')</script>")).await;
    let mut client = connect(server.address).await;
    let fin = client
        .subscribe(with_key(
            subscribe_request(&hostile.url(), &["fin:x"]),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let ops = client
        .subscribe(with_key(
            subscribe_request(&hostile.url(), &["ops:y"]),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    client
        .pause_subscription(with_key(
            proto::PauseSubscriptionRequest {
                subscription_id: ops.id.clone(),
                topic: String::new(),
                reason: "<img src=x onerror=alert(1)>".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    client
        .publish(with_key(publish_request("fin:x", "x"), &admin))
        .await
        .unwrap();
    let url = server.admin_url.clone().expect("admin url");
    let http = reqwest::Client::new();
    let page = |key: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http.get(&url).bearer_auth(key).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    eventually(
        Duration::from_secs(20),
        "the receiver's answer is on the page",
        || async {
            let html = page(reader.clone()).await;
            // Escaped or not: the assertions below tell.
            html.contains("script&gt;") || html.contains("<script>")
        },
    )
    .await;
    let html = page(reader.clone()).await;
    assert!(html.contains("&lt;script&gt;"), "{html}");
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(html.contains("&lt;img src=x"), "{html}");
    assert!(!html.contains("<img src=x"), "{html}");
    let limited = page(fin_reader.clone()).await;
    assert!(limited.contains(&fin.id), "{limited}");
    assert!(!limited.contains(&ops.id), "{limited}");
    server.terminate(Duration::from_secs(10)).await;
}
