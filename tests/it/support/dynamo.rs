//! The DynamoDB-compatible server that `make test` starts, and fresh tables on it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use herald::store::DynamoStore;

/// The endpoint of the shared test server. Fails (never skips) when it is missing.
pub fn endpoint() -> String {
    std::env::var("HERALD_TEST_DYNAMODB_ENDPOINT").expect(
        "HERALD_TEST_DYNAMODB_ENDPOINT is not set: run the tests with `make test`, which starts a \
         DynamoDB-compatible server",
    )
}

/// A client with static test credentials.
pub fn client(endpoint: &str) -> Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "herald-tests"))
        .build();
    Client::from_conf(config)
}

/// How long a subscription-set copy stays usable on test tables: shorter than the default
/// (1 s), so the many Subscribe calls of the suite wait less.
pub const TEST_CACHE_VALIDITY: Duration = Duration::from_millis(300);

/// Creates a table with a unique name on `endpoint`.
pub async fn fresh_table(endpoint: &str) -> String {
    let name = herald::ids::new_id("herald-test").replace('_', "-");
    herald::store::dynamodb::create_table_with_cache_validity(
        &client(endpoint),
        &name,
        TEST_CACHE_VALIDITY,
    )
    .await
    .expect("create test table");
    name
}

/// A store on a fresh table of the shared server.
pub async fn fresh_store() -> (DynamoStore, String) {
    let endpoint = endpoint();
    let table = fresh_table(&endpoint).await;
    (DynamoStore::new(client(&endpoint), &table), table)
}

/// Environment for a `herald` child process talking to the test server.
pub fn child_env() -> [(&'static str, &'static str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ]
}

/// A private server process, for tests that stop and restart it.
pub struct PrivateServer {
    child: Option<Child>,
    pub port: u16,
    db_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateServer {
    /// Starts a private server with its data in a file, so a restart keeps the tables.
    pub fn start() -> PrivateServer {
        let dir = tempfile::tempdir().expect("temp dir");
        // Below the kernel's ephemeral range (32768 and up), so no test binding port 0 can take
        // it while the server is stopped for an outage.
        let port = (0..1000)
            .map(|_| rand::random_range(20_000..32_000))
            .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
            .expect("a free port below the ephemeral range");
        let mut server = PrivateServer {
            child: None,
            port,
            db_path: dir.path().join("dynamo.sqlite"),
            _dir: dir,
        };
        server.resume();
        server
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server: an outage.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn resume(&mut self) {
        let binary = std::env::var("HERALD_TEST_DYNOXIDE").expect(
            "HERALD_TEST_DYNOXIDE is not set: run the tests with `make test`, which installs the \
             DynamoDB-compatible server",
        );
        let child = Command::new(binary)
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
            ])
            .arg("--db-path")
            .arg(&self.db_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dynoxide");
        self.child = Some(child);
        // Ready once Dynoxide answers a request (not merely once something accepts connections).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_list_tables(self.port) {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            assert!(exited.is_none(), "dynoxide exited at start: {exited:?}");
            assert!(Instant::now() < deadline, "dynoxide did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True if a DynamoDB `ListTables` request on `port` is answered by Dynoxide.
fn answers_list_tables(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-amz-json-1.0\r\n\
         X-Amz-Target: DynamoDB_20120810.ListTables\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    // Unsigned, so it is refused, but by Dynoxide (another process on the port would not say so).
    response.starts_with("HTTP/1.1") && response.to_ascii_lowercase().contains("x-dynoxide-version")
}
