//! Test harness: an in-process server on port 0, the real binary as a child process, a
//! scriptable webhook receiver, and a bounded poll.

#![allow(dead_code)]

pub mod authority;
pub mod browser;
pub mod dynamo;
pub mod faulty;
pub mod metrics;
pub mod receiver;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::config::ServeConfig;
use herald::proto;
use herald::proto::broker_service_client::BrokerServiceClient;
use herald::store::Store;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub use receiver::{Receiver, Reply};

/// Runs each listed `async fn case(backend: Backend)` as one test per backend, in modules
/// `embedded` and `dynamodb`.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case($crate::support::Backend::Embedded).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case($crate::support::Backend::Dynamodb).await;
                }
            )*
        }
    };
}

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

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store in a temporary directory.
    Embedded,
    /// A fresh table on the DynamoDB-compatible test server.
    Dynamodb,
}

/// Where a server keeps its state: a data directory or a table, reusable across restarts.
/// The partition lease of test deployments on DynamoDB.
pub const TEST_LEASE: Duration = Duration::from_secs(2);

pub struct Deployment {
    pub backend: Backend,
    pub data_dir: tempfile::TempDir,
    pub endpoint: Option<String>,
    pub table: Option<String>,
    /// `--partition-lease` on DynamoDB (2 s unless a test needs another).
    pub partition_lease: Duration,
}

impl Deployment {
    /// Fresh state on `backend`.
    pub async fn new(backend: Backend) -> Deployment {
        let data_dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Embedded => Deployment {
                backend,
                data_dir,
                endpoint: None,
                table: None,
                partition_lease: TEST_LEASE,
            },
            Backend::Dynamodb => {
                let endpoint = dynamo::endpoint();
                let table = dynamo::fresh_table(&endpoint).await;
                Deployment {
                    backend,
                    data_dir,
                    endpoint: Some(endpoint),
                    table: Some(table),
                    partition_lease: TEST_LEASE,
                }
            }
        }
    }

    /// The serve configuration for this state, with test-friendly timings.
    pub fn config(&self) -> ServeConfig {
        let mut config = ServeConfig::with_data_dir(self.data_dir.path());
        config.shutdown_grace = Duration::from_secs(2);
        if self.backend == Backend::Dynamodb {
            config.store = herald::config::StoreKind::Dynamodb;
            config.dynamodb.table = self.table.clone().expect("table");
            config.dynamodb.endpoint = self.endpoint.clone();
            config.dynamodb.region = Some("us-east-1".into());
            config.partition_lease = self.partition_lease;
            config.rescan_interval = Duration::from_millis(500);
            config.fanout_repair_after = Duration::from_secs(1);
        }
        config
    }

    /// `herald serve` arguments for this state.
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = vec![
            "--data-dir".to_string(),
            self.data_dir.path().display().to_string(),
        ];
        if self.backend == Backend::Dynamodb {
            let lease = format!("{}ms", self.partition_lease.as_millis());
            args.extend(
                [
                    "--store",
                    "dynamodb",
                    "--table",
                    self.table.as_deref().unwrap(),
                    "--endpoint",
                    self.endpoint.as_deref().unwrap(),
                    "--partition-lease",
                    lease.as_str(),
                    "--rescan-interval",
                    "500ms",
                    "--fanout-repair-after",
                    "1s",
                ]
                .map(str::to_string),
            );
        }
        args
    }

    /// Opens the store this deployment names, as the server would.
    pub async fn open_store(&self, config: &ServeConfig) -> Arc<dyn Store> {
        match self.backend {
            Backend::Embedded => herald::app::open_store(config).await.expect("open store"),
            Backend::Dynamodb => {
                let endpoint = self.endpoint.as_deref().unwrap();
                Arc::new(
                    herald::store::DynamoStore::new(
                        dynamo::client(endpoint),
                        self.table.as_deref().unwrap(),
                    )
                    .with_repair_after(config.fanout_repair_after)
                    .with_retention(config.retention),
                )
            }
        }
    }
}

/// A server running inside the test process.
pub struct TestApp {
    pub address: SocketAddr,
    pub client: BrokerServiceClient<Channel>,
    pub deployment: Deployment,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), herald::error::Error>>>,
}

/// Starts a server on 127.0.0.1:0 with fresh state on `backend`; `configure` adjusts defaults.
pub async fn spawn_app(backend: Backend, configure: impl FnOnce(&mut ServeConfig)) -> TestApp {
    spawn_app_on(Deployment::new(backend).await, configure).await
}

/// Starts a server on existing state.
pub async fn spawn_app_on(
    deployment: Deployment,
    configure: impl FnOnce(&mut ServeConfig),
) -> TestApp {
    let mut config = deployment.config();
    configure(&mut config);
    let store = deployment.open_store(&config).await;
    spawn_app_with_store(deployment, config, store).await
}

/// Starts a server on a store the test opened itself.
pub async fn spawn_app_with_store(
    deployment: Deployment,
    config: ServeConfig,
    store: Arc<dyn Store>,
) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (shutdown, shutdown_receiver) = oneshot::channel::<()>();
    let task = tokio::spawn(herald::app::run_with_store(
        config,
        store,
        listener,
        async move {
            let _ = shutdown_receiver.await;
        },
    ));
    let client = connect(address).await;
    TestApp {
        address,
        client,
        deployment,
        shutdown: Some(shutdown),
        task: Some(task),
    }
}

impl TestApp {
    /// A new client connection.
    pub async fn client(&self) -> BrokerServiceClient<Channel> {
        connect(self.address).await
    }

    /// Shuts down gracefully and returns the state for a restart.
    pub async fn stop(mut self) -> Deployment {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
        self.deployment
    }
}

/// Connects a client, retrying briefly while the server starts.
pub async fn connect(address: SocketAddr) -> BrokerServiceClient<Channel> {
    let url = format!("http://{address}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match BrokerServiceClient::connect(url.clone()).await {
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
    /// The metrics page, when started with `--metrics-listen`.
    pub metrics_url: Option<String>,
    /// The admin listener's root (`http://.../`), when started with `--admin-listen`.
    pub admin_url: Option<String>,
    /// The rest of its stdout.
    pub stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl HeraldProcess {
    /// Starts `herald serve --listen 127.0.0.1:0` on the deployment's state and waits for its
    /// "listening" line.
    pub async fn start(deployment: &Deployment) -> HeraldProcess {
        HeraldProcess::start_with(deployment, &[]).await
    }

    /// [`HeraldProcess::start`] with extra `serve` arguments.
    pub async fn start_with(deployment: &Deployment, extra: &[&str]) -> HeraldProcess {
        HeraldProcess::start_with_env(deployment, extra, &[]).await
    }

    /// [`HeraldProcess::start_with`] with extra environment variables.
    pub async fn start_with_env(
        deployment: &Deployment,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> HeraldProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(deployment.serve_args())
            .args(extra)
            .envs(dynamo::child_env())
            .env("HERALD_LOG", "warn")
            .envs(env.iter().copied())
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
        let mut metrics_url = None;
        if extra.contains(&"--metrics-listen") {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .expect("herald printed its metrics address in time")
                .expect("read stdout")
                .expect("a metrics line");
            metrics_url = Some(
                line.strip_prefix("herald metrics on ")
                    .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                    .to_string(),
            );
        }
        let mut admin_url = None;
        if extra.contains(&"--admin-listen") {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .expect("herald printed its admin address in time")
                .expect("read stdout")
                .expect("an admin line");
            admin_url = Some(
                line.strip_prefix("herald admin on ")
                    .unwrap_or_else(|| panic!("unexpected admin line {line:?}"))
                    .to_string(),
            );
        }
        HeraldProcess {
            child,
            address,
            metrics_url,
            admin_url,
            stdout: lines,
        }
    }

    /// SIGKILL, then wait for the process to be gone.
    pub async fn kill_9(mut self) {
        self.child.start_kill().expect("kill");
        self.child.wait().await.expect("wait");
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// SIGTERM, then waits (at most `within`) for a successful exit.
    pub async fn terminate(mut self, within: Duration) {
        self.signal("TERM");
        let exit = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("exits within the grace")
            .expect("wait");
        assert!(exit.success(), "graceful exit: {exit:?}");
    }
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
        max_requests_per_second: 0,
        max_in_flight: 0,
        filter: String::new(),
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

/// Waits up to `timeout` until `check` holds for the subscription's pending deliveries (all
/// pages, oldest first): typically, that an attempt failed with the expected `last_error`.
pub async fn eventually_pending(
    client: &BrokerServiceClient<Channel>,
    subscription_id: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[proto::PendingDelivery]) -> bool,
) {
    eventually(timeout, what, || {
        let mut client = client.clone();
        let check = &check;
        async move { check(&all_pending(&mut client, subscription_id).await) }
    })
    .await;
}

/// Every pending delivery of a subscription (all pages).
pub async fn all_pending(
    client: &mut BrokerServiceClient<Channel>,
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
                dead_letters_only: false,
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

/// A new API key and its key-set entry.
pub fn api_key(name: &str, roles: &[&str], topics: &[&str]) -> (String, serde_json::Value) {
    let (key, hash) = herald::auth::generate_key();
    let entry = serde_json::json!({"name": name, "roles": roles, "topics": topics, "sha256": hash});
    (key, entry)
}

/// `message` with `key` as its bearer token.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}
