//! Test harness: an in-process server on port 0, the real binary as a child process, a
//! scriptable webhook receiver, and a bounded poll.

#![allow(dead_code)]

pub mod receiver;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herald::config::ServeConfig;
use herald::proto;
use herald::proto::broker_client::BrokerClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub use receiver::{Receiver, Reply};

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server running inside the test process.
pub struct TestApp {
    pub address: SocketAddr,
    pub client: BrokerClient<Channel>,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), herald::error::Error>>>,
}

/// Starts a server on 127.0.0.1:0 with a fresh data directory; `configure` adjusts defaults.
pub async fn spawn_app(configure: impl FnOnce(&mut ServeConfig)) -> TestApp {
    spawn_app_in(tempfile::tempdir().expect("temp dir"), configure).await
}

/// Starts a server on an existing data directory.
pub async fn spawn_app_in(
    data_dir: tempfile::TempDir,
    configure: impl FnOnce(&mut ServeConfig),
) -> TestApp {
    let mut config = ServeConfig::with_data_dir(data_dir.path());
    config.shutdown_grace = Duration::from_secs(2);
    configure(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (shutdown, shutdown_receiver) = oneshot::channel::<()>();
    let task = tokio::spawn(herald::app::run(config, listener, async move {
        let _ = shutdown_receiver.await;
    }));
    let client = connect(address).await;
    TestApp {
        address,
        client,
        data_dir,
        shutdown: Some(shutdown),
        task: Some(task),
    }
}

impl TestApp {
    /// A new client connection.
    pub async fn client(&self) -> BrokerClient<Channel> {
        connect(self.address).await
    }

    /// Shuts down gracefully and returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
        self.data_dir
    }
}

/// Connects a client, retrying briefly while the server starts.
pub async fn connect(address: SocketAddr) -> BrokerClient<Channel> {
    let url = format!("http://{address}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match BrokerClient::connect(url.clone()).await {
            Ok(client) => return client,
            Err(error) if Instant::now() >= deadline => panic!("cannot connect to {url}: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The real `herald` binary as a child process.
pub struct HeraldProcess {
    pub child: tokio::process::Child,
    pub address: SocketAddr,
}

impl HeraldProcess {
    /// Starts `herald serve --listen 127.0.0.1:0 --data-dir DIR` plus `extra` arguments and
    /// waits for its "listening" line.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> HeraldProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("HERALD_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start herald");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("herald printed its address in time")
            .expect("read stdout")
            .expect("herald exited before listening");
        let address = line
            .strip_prefix("herald listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        HeraldProcess { child, address }
    }

    /// SIGKILL, then wait for the process to be gone.
    pub async fn kill_9(mut self) {
        self.child.start_kill().expect("kill");
        self.child.wait().await.expect("wait");
    }
}

/// A temp directory path that outlives a child process.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// Subscribe request with the given endpoint and topics and a fast retry policy.
pub fn subscribe_request(endpoint: &str, topics: &[&str]) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        endpoint: endpoint.to_string(),
        topics: topics.iter().map(|topic| topic.to_string()).collect(),
        secret: String::new(),
        retry_policy: Some(proto::RetryPolicy {
            initial_backoff: Some(millis(10)),
            max_backoff: Some(millis(200)),
            max_attempts: 20,
            request_timeout: Some(millis(2000)),
        }),
        on_exhausted: 0,
    }
}

/// A proto duration of `value` milliseconds.
pub fn millis(value: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (value / 1000) as i64,
        nanos: ((value % 1000) * 1_000_000) as i32,
    }
}

/// Publish request with a payload.
pub fn publish_request(topic: &str, payload: impl Into<Vec<u8>>) -> proto::PublishRequest {
    proto::PublishRequest {
        topic: topic.to_string(),
        payload: payload.into(),
        ..Default::default()
    }
}

/// Every pending delivery of a subscription (all pages).
pub async fn all_pending(
    client: &mut BrokerClient<Channel>,
    subscription_id: &str,
) -> Vec<proto::PendingDelivery> {
    let mut page_token = String::new();
    let mut all = Vec::new();
    loop {
        let page = client
            .list_pending(proto::ListPendingRequest {
                subscription_id: subscription_id.to_string(),
                topic: String::new(),
                page_size: 100,
                page_token,
            })
            .await
            .expect("list pending")
            .into_inner();
        all.extend(page.deliveries);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}
