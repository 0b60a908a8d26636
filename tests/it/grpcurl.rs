//! The README's grpcurl examples, run as written with the stock grpcurl (1.8.6, installed by
//! `scripts/grpcurl.sh`; `make test` names it in `HERALD_TEST_GRPCURL`) against a real server.
//! Placeholders are filled in: the address, `sub_...` (a fresh subscription for each example,
//! since one of them deletes it), its etag, and `hrld_Zk3...` (a key with every role, on a
//! server that requires keys). The TLS example needs certificates and is left to `tls`.

use std::path::PathBuf;

use crate::support::{Backend, spawn_app, subscribe_request};

/// Every `grpcurl` command in the README's shell blocks, continuation lines joined.
fn readme_grpcurl_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut commands = Vec::new();
    let mut in_shell = false;
    let mut current: Option<String> = None;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_shell = line == "```sh";
            continue;
        }
        if !in_shell {
            continue;
        }
        let line = line.trim();
        let command = match current.take() {
            Some(mut command) => {
                command.push(' ');
                command.push_str(line);
                command
            }
            None if line.starts_with("grpcurl ") => line.to_string(),
            None => continue,
        };
        // A line ends the command unless it continues it: a trailing backslash or an open
        // single quote.
        let open_quote = command.matches('\'').count() % 2 == 1;
        if let Some(stripped) = command.strip_suffix('\\') {
            current = Some(stripped.trim_end().to_string());
        } else if open_quote {
            current = Some(command);
        } else {
            commands.push(command);
        }
    }
    commands
}

fn grpcurl() -> PathBuf {
    let path = std::env::var("HERALD_TEST_GRPCURL")
        .expect("HERALD_TEST_GRPCURL names grpcurl (make test installs it: scripts/grpcurl.sh)");
    PathBuf::from(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_grpcurl_examples_work_with_stock_grpcurl() {
    let commands = readme_grpcurl_commands();
    assert!(commands.len() >= 10, "found only {commands:?}");
    let (key, hash) = herald::auth::generate_key();
    let keys = serde_json::json!({"keys": [{
        "name": "readme",
        "roles": ["publish", "subscribe", "read", "operate"],
        "topics": [],
        "sha256": hash,
    }]})
    .to_string();
    let open = spawn_app(Backend::Embedded, |_| {}).await;
    let keyed = spawn_app(Backend::Embedded, |config| config.api_keys = Some(keys)).await;
    let grpcurl = grpcurl();
    let grpcurl_dir = grpcurl.parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        grpcurl_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for command in commands {
        if command.contains("-cacert") {
            continue;
        }
        let app = if command.contains("authorization: Bearer") {
            &keyed
        } else {
            &open
        };
        let mut client = app.client.clone();
        let mut request = tonic::Request::new(subscribe_request("http://127.0.0.1:9/hook", &["*"]));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        let subscription = client.subscribe(request).await.unwrap().into_inner();
        let filled = command
            .replace("127.0.0.1:50051", &app.address.to_string())
            .replace("sub_...", &subscription.id)
            .replace("5c1e0a9b7d3f2e41", &subscription.etag)
            .replace("hrld_Zk3...", &key);
        let output = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&filled)
            .env("PATH", &path)
            .output()
            .await
            .expect("run sh");
        assert!(
            output.status.success(),
            "{command}\nfailed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        ran += 1;
    }
    println!("ran {ran} README grpcurl examples");
    keyed.stop().await;
    open.stop().await;
}
