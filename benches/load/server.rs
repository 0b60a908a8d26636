//! The servers under test: Herald (a child process on the embedded store, so its RSS is its
//! own; in-process on DynamoDB, so its request counters can be read) and the empty handler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use herald::proto;
use herald::proto::broker_service_server::{BrokerService as BrokerApi, BrokerServiceServer};
use herald::store::dynamodb::RequestCounts;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// The store to benchmark.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StoreChoice {
    Embedded,
    Dynamodb,
}

/// A running Herald.
pub struct Herald {
    pub address: SocketAddr,
    child: Option<tokio::process::Child>,
    delivery_concurrency: usize,
    data_dir: tempfile::TempDir,
    counts: Option<Arc<RequestCounts>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Herald {
    pub async fn start(store: StoreChoice, delivery_concurrency: usize) -> Herald {
        let data_dir = tempfile::tempdir().expect("temp dir");
        match store {
            StoreChoice::Embedded => {
                let (child, address) = spawn_child(data_dir.path(), delivery_concurrency).await;
                Herald {
                    address,
                    child: Some(child),
                    delivery_concurrency,
                    data_dir,
                    counts: None,
                    stop: None,
                    task: None,
                }
            }
            StoreChoice::Dynamodb => {
                let endpoint = std::env::var("HERALD_BENCH_DYNAMODB_ENDPOINT").expect(
                    "HERALD_BENCH_DYNAMODB_ENDPOINT is not set: run `make bench ARGS='--store dynamodb'`",
                );
                let config = aws_sdk_dynamodb::Config::builder()
                    .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                    .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
                    .endpoint_url(&endpoint)
                    .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                        "bench",
                        "bench",
                        None,
                        None,
                        "herald-bench",
                    ))
                    .build();
                let client = aws_sdk_dynamodb::Client::from_conf(config);
                let table = herald::ids::new_id("herald-bench").replace('_', "-");
                herald::store::dynamodb::create_table(&client, &table)
                    .await
                    .expect("create table");
                let store = herald::store::DynamoStore::new(client, &table);
                let counts = store.request_counters();
                let mut config = herald::config::ServeConfig::with_data_dir(data_dir.path());
                config.store = herald::config::StoreKind::Dynamodb;
                config.dynamodb.table = table;
                config.delivery_concurrency = delivery_concurrency;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let address = listener.local_addr().unwrap();
                let (stop, stopped) = oneshot::channel::<()>();
                let task = tokio::spawn(async move {
                    herald::app::run_with_store(config, Arc::new(store), listener, async move {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("herald");
                });
                Herald {
                    address,
                    child: None,
                    delivery_concurrency,
                    data_dir,
                    counts: Some(counts),
                    stop: Some(stop),
                    task: Some(task),
                }
            }
        }
    }

    /// CPU time (user + system) the server process has used so far, in seconds (child
    /// process only: an in-process server shares its process with the load tool).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) close with ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / clock_ticks_per_second())
    }

    /// Peak resident set of the server process, in MiB (child process only).
    pub fn peak_rss_mib(&self) -> Option<f64> {
        self.status_mib("VmHWM:")
    }

    /// Current resident set of the server process, in MiB (child process only).
    pub fn rss_mib(&self) -> Option<f64> {
        self.status_mib("VmRSS:")
    }

    fn status_mib(&self, field: &str) -> Option<f64> {
        let pid = self.child.as_ref()?.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|line| line.starts_with(field))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// SIGKILLs the child and starts it again on the same data (embedded store only).
    pub async fn kill_and_restart(&mut self) {
        let mut child = self.child.take().expect("a child process");
        child.start_kill().expect("kill");
        child.wait().await.expect("wait");
        let (child, address) = spawn_child(self.data_dir.path(), self.delivery_concurrency).await;
        self.child = Some(child);
        self.address = address;
    }

    /// DynamoDB requests sent so far (0 on the embedded store).
    pub fn dynamodb_requests(&self) -> u64 {
        self.counts.as_ref().map_or(0, |counts| counts.total())
    }

    /// Requests per operation so far (empty on the embedded store).
    pub fn dynamodb_by_operation(&self) -> std::collections::BTreeMap<String, u64> {
        self.counts
            .as_ref()
            .map(|counts| counts.snapshot())
            .unwrap_or_default()
    }

    /// Transactions DynamoDB cancelled for a conflict so far.
    pub fn dynamodb_conflicts(&self) -> u64 {
        self.counts.as_ref().map_or(0, |counts| counts.conflicts())
    }

    /// Requests per operation, as text.
    pub fn dynamodb_breakdown(&self) -> Option<String> {
        let counts = self.counts.as_ref()?.snapshot();
        Some(
            counts
                .iter()
                .map(|(operation, count)| format!("{operation} {count}"))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }

    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

async fn spawn_child(
    data_dir: &std::path::Path,
    delivery_concurrency: usize,
) -> (tokio::process::Child, SocketAddr) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(["--delivery-concurrency", &delivery_concurrency.to_string()])
        .env("HERALD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald");
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .unwrap()
        .expect("herald printed its address");
    let address = line
        .strip_prefix("herald listening on ")
        .expect("listening line")
        .parse()
        .unwrap();
    (child, address)
}

/// A Broker whose Publish does nothing: the ceiling of the gRPC stack and the load tool.
struct EmptyBroker;

#[tonic::async_trait]
impl BrokerApi for EmptyBroker {
    async fn publish(
        &self,
        _request: Request<proto::PublishRequest>,
    ) -> Result<Response<proto::PublishResponse>, Status> {
        Ok(Response::new(proto::PublishResponse {
            event_id: "evt_empty".into(),
            sequence: 1,
            ..Default::default()
        }))
    }
    async fn subscribe(
        &self,
        _request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn get_subscription(
        &self,
        _request: Request<proto::GetSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn list_subscriptions(
        &self,
        _request: Request<proto::ListSubscriptionsRequest>,
    ) -> Result<Response<proto::ListSubscriptionsResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn unsubscribe(
        &self,
        _request: Request<proto::UnsubscribeRequest>,
    ) -> Result<Response<proto::UnsubscribeResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn list_pending(
        &self,
        _request: Request<proto::ListPendingRequest>,
    ) -> Result<Response<proto::ListPendingResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn get_subscription_status(
        &self,
        _request: Request<proto::GetSubscriptionStatusRequest>,
    ) -> Result<Response<proto::SubscriptionStatus>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn pause_subscription(
        &self,
        _request: Request<proto::PauseSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn resume_subscription(
        &self,
        _request: Request<proto::ResumeSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn retry_now(
        &self,
        _request: Request<proto::RetryNowRequest>,
    ) -> Result<Response<proto::RetryNowResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn skip_head(
        &self,
        _request: Request<proto::SkipHeadRequest>,
    ) -> Result<Response<proto::SkipHeadResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn update_subscription(
        &self,
        _request: Request<proto::UpdateSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn rotate_secret(
        &self,
        _request: Request<proto::RotateSecretRequest>,
    ) -> Result<Response<proto::RotateSecretResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn replay(
        &self,
        _request: Request<proto::ReplayRequest>,
    ) -> Result<Response<proto::ReplayResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn redrive_dead_letters(
        &self,
        _request: Request<proto::RedriveDeadLettersRequest>,
    ) -> Result<Response<proto::RedriveDeadLettersResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
    async fn purge_dead_letters(
        &self,
        _request: Request<proto::PurgeDeadLettersRequest>,
    ) -> Result<Response<proto::PurgeDeadLettersResponse>, Status> {
        Err(Status::unimplemented("empty broker"))
    }
}

/// Starts the empty broker in this process on a free port.
pub async fn start_empty_broker() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(BrokerServiceServer::new(EmptyBroker))
            // Like Herald's listener: TCP_NODELAY, so both sides of the comparison are alike.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("empty broker");
    });
    (address, stop)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 where it cannot be asked).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
