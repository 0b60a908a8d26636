//! Server configuration: every setting is a flag and a `HERALD_*` environment variable
//! (flags win), validated at load.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::auth::KeySource;
use crate::delivery::endpoint_policy::{AddressRules, EndpointPolicy};
use crate::model::RetryPolicy;
use crate::tls::TlsFiles;

/// Every default setting, in one place: the flags, [`ServeConfig::with_data_dir`] (tests and
/// embedding programs) and [`RetryPolicy::default`] all read them from here.
pub mod defaults {
    use crate::model::RetryPolicy;

    /// `--listen`.
    pub const LISTEN: &str = "127.0.0.1:50051";
    /// `--data-dir`.
    pub const DATA_DIR: &str = "./herald-data";
    /// `--store-cache-mib`: enough for the hot part of a large backlog, far below redb's 1 GiB.
    pub const STORE_CACHE_MIB: usize = 64;
    /// `--table`.
    pub const TABLE: &str = "herald";
    /// `--partition-lease`.
    pub const PARTITION_LEASE: &str = "10s";
    /// `--rescan-interval`.
    pub const RESCAN_INTERVAL: &str = "5s";
    /// `--fanout-repair-after`.
    pub const FANOUT_REPAIR_AFTER: &str = "10s";
    /// `--max-payload-bytes`.
    pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
    /// `--idempotency-window`.
    pub const IDEMPOTENCY_WINDOW: &str = "24h";
    /// `--delivery-concurrency`.
    pub const DELIVERY_CONCURRENCY: usize = 256;
    /// `--default-initial-backoff`.
    pub const INITIAL_BACKOFF: &str = "1s";
    /// `--default-max-backoff`.
    pub const MAX_BACKOFF: &str = "10m";
    /// `--default-max-attempts`.
    pub const MAX_ATTEMPTS: u32 = 12;
    /// `--default-request-timeout`.
    pub const REQUEST_TIMEOUT: &str = "10s";
    /// `--shutdown-grace`.
    pub const SHUTDOWN_GRACE: &str = "10s";
    /// `--retention`: a week of delivered events can be replayed.
    pub const RETENTION: &str = "7d";
    /// `--log-format`.
    pub const LOG_FORMAT: &str = "text";
    /// `--max-subscriptions`.
    pub const MAX_SUBSCRIPTIONS: usize = 10_000;
    /// `--max-subscriptions-per-pattern`.
    pub const MAX_SUBSCRIPTIONS_PER_PATTERN: usize = 1_000;
    /// `--rate-limit-publish` (0: no limit).
    pub const RATE_LIMIT_PUBLISH: u32 = 0;
    /// `--rate-limit-manage` (0: no limit).
    pub const RATE_LIMIT_MANAGE: u32 = 0;
    /// `--endpoint-policy`.
    pub const ENDPOINT_POLICY: &str = "allow-private";

    /// The retry policy new subscriptions get unless the flags or the request say otherwise.
    pub fn retry_policy() -> RetryPolicy {
        let duration = |text| super::parse_duration(text).expect("default durations parse");
        RetryPolicy {
            initial_backoff: duration(INITIAL_BACKOFF),
            max_backoff: duration(MAX_BACKOFF),
            max_attempts: MAX_ATTEMPTS,
            request_timeout: duration(REQUEST_TIMEOUT),
        }
    }

    /// `--store-cache-mib` in bytes.
    pub const fn store_cache_bytes() -> usize {
        STORE_CACHE_MIB * 1024 * 1024
    }

    /// The cores this process may use (1 if unknown).
    pub fn cores() -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    /// `--store-readers`: one per core, at least two. Reads of cached pages are CPU work, so
    /// more threads than cores only add hand-offs (eight against two on two cores: 0–6 % more
    /// CPU per delivery over six interleaved pairs, BENCHMARKS.md, tenth session).
    pub fn store_readers() -> usize {
        cores().max(2)
    }

    /// `--worker-threads`: one per core, as tokio starts. One worker on two shared cores cost
    /// about a quarter less CPU per delivery but had a much longer latency tail in some runs
    /// (BENCHMARKS.md, tenth session), so fewer workers is the operator's choice.
    pub fn worker_threads() -> usize {
        cores()
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the event's fields (partition, sequence, ...) as keys.
    Json,
}

/// Which backend holds the broker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// The embedded single-node store in `--data-dir`.
    Embedded,
    /// A DynamoDB table shared by any number of instances.
    Dynamodb,
}

/// `herald serve` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address for the gRPC server. Port 0 picks a free port (printed at start).
    #[arg(long, env = "HERALD_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,

    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "HERALD_DATA_DIR", default_value = defaults::DATA_DIR)]
    pub data_dir: PathBuf,

    /// Page cache of the embedded store, in MiB.
    #[arg(long, env = "HERALD_STORE_CACHE_MIB", default_value_t = defaults::STORE_CACHE_MIB)]
    pub store_cache_mib: usize,

    /// Where state lives: `embedded` (default) or `dynamodb`.
    #[arg(long, env = "HERALD_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,

    /// DynamoDB connection settings.
    #[command(flatten)]
    pub dynamodb: DynamoArgs,

    /// Create the DynamoDB table at start if it does not exist.
    #[arg(long, env = "HERALD_CREATE_TABLE")]
    pub create_table: bool,

    /// How long an instance's claim on a partition lasts without renewal (DynamoDB: how soon
    /// another instance takes over the partitions of one that died). Renewed every third of
    /// it; a worker starts no request with less than a third left.
    #[arg(long, env = "HERALD_PARTITION_LEASE", default_value = defaults::PARTITION_LEASE, value_parser = parse_duration)]
    pub partition_lease: Duration,

    /// DynamoDB: how often to look for pending partitions this instance was not told about.
    #[arg(long, env = "HERALD_RESCAN_INTERVAL", default_value = defaults::RESCAN_INTERVAL, value_parser = parse_duration)]
    pub rescan_interval: Duration,

    /// DynamoDB: age after which another instance finishes a fan-out its publisher left.
    #[arg(long, env = "HERALD_FANOUT_REPAIR_AFTER", default_value = defaults::FANOUT_REPAIR_AFTER, value_parser = parse_duration)]
    pub fanout_repair_after: Duration,

    /// Largest accepted event payload, in bytes.
    #[arg(long, env = "HERALD_MAX_PAYLOAD_BYTES", default_value_t = defaults::MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,

    /// How long idempotency keys are remembered (e.g. `24h`, `90m`, `30s`).
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = defaults::IDEMPOTENCY_WINDOW, value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// Most HTTP deliveries in flight at once, over all partitions.
    #[arg(long, env = "HERALD_DELIVERY_CONCURRENCY", default_value_t = defaults::DELIVERY_CONCURRENCY)]
    pub delivery_concurrency: usize,

    /// Threads that serve the API and make the deliveries (the async runtime's workers).
    /// Default: one per core.
    #[arg(long, env = "HERALD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Threads that run the embedded store's reads (reads in flight at once). Default: one per
    /// core, at least two.
    #[arg(long, env = "HERALD_STORE_READERS")]
    pub store_readers: Option<usize>,

    /// Default first backoff cap of new subscriptions.
    #[arg(long, env = "HERALD_DEFAULT_INITIAL_BACKOFF", default_value = defaults::INITIAL_BACKOFF, value_parser = parse_duration)]
    pub default_initial_backoff: Duration,

    /// Default largest backoff of new subscriptions.
    #[arg(long, env = "HERALD_DEFAULT_MAX_BACKOFF", default_value = defaults::MAX_BACKOFF, value_parser = parse_duration)]
    pub default_max_backoff: Duration,

    /// Default attempts before an event is exhausted.
    #[arg(long, env = "HERALD_DEFAULT_MAX_ATTEMPTS", default_value_t = defaults::MAX_ATTEMPTS)]
    pub default_max_attempts: u32,

    /// Default per-request timeout of new subscriptions.
    #[arg(long, env = "HERALD_DEFAULT_REQUEST_TIMEOUT", default_value = defaults::REQUEST_TIMEOUT, value_parser = parse_duration)]
    pub default_request_timeout: Duration,

    /// Address of the Prometheus metrics page (`/metrics`); off unless given. Port 0 picks a
    /// free port (printed as `herald metrics on ...`).
    #[arg(long, env = "HERALD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How often the backlog gauges (per subscription, partitions by state) are read from
    /// the store, when metrics are served.
    #[arg(long, env = "HERALD_METRICS_BACKLOG_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub metrics_backlog_interval: Duration,

    /// Subscriptions that get their own label in the backlog gauges (the largest backlogs);
    /// the rest are summed under `subscription="_other"`.
    #[arg(long, env = "HERALD_METRICS_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub metrics_max_subscriptions: usize,

    /// Address of the admin listener: the status page at `/` and the metrics at `/metrics`,
    /// behind the API keys when there are some (role `read`); off unless given. Port 0 picks
    /// a free port (printed as `herald admin on ...`).
    #[arg(long, env = "HERALD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Export Herald's spans (publish, store calls, delivery attempts) over OTLP/gRPC to this
    /// collector, e.g. `http://127.0.0.1:4317`; off unless given.
    #[arg(long, env = "HERALD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Log lines as `text` (default) or `json` (one object per line), on stderr.
    #[arg(long, env = "HERALD_LOG_FORMAT", value_enum, default_value = defaults::LOG_FORMAT)]
    pub log_format: LogFormat,

    /// Most subscriptions in total; Subscribe beyond it is RESOURCE_EXHAUSTED.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = defaults::MAX_SUBSCRIPTIONS)]
    pub max_subscriptions: usize,

    /// Most subscriptions with any one topic pattern (such as `*`).
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS_PER_PATTERN", default_value_t = defaults::MAX_SUBSCRIPTIONS_PER_PATTERN)]
    pub max_subscriptions_per_pattern: usize,

    /// Publish calls per second per API key (bursts of as many); 0 is no limit.
    #[arg(long, env = "HERALD_RATE_LIMIT_PUBLISH", default_value_t = defaults::RATE_LIMIT_PUBLISH)]
    pub rate_limit_publish: u32,

    /// Subscribe and Unsubscribe calls per second per API key; 0 is no limit.
    #[arg(long, env = "HERALD_RATE_LIMIT_MANAGE", default_value_t = defaults::RATE_LIMIT_MANAGE)]
    pub rate_limit_manage: u32,

    /// Which webhook endpoint addresses are refused: `allow-private` (default: loopback and
    /// private ranges allowed) or `public-only`. Link-local and cloud metadata addresses,
    /// unspecified, multicast and broadcast addresses are refused under both.
    #[arg(long, env = "HERALD_ENDPOINT_POLICY", value_enum, default_value = defaults::ENDPOINT_POLICY)]
    pub endpoint_policy: EndpointPolicy,

    /// CIDR ranges webhook endpoints may use whatever the policy says, comma-separated
    /// (e.g. `10.1.0.0/16,169.254.169.254/32`).
    #[arg(long, env = "HERALD_ENDPOINT_ALLOW", value_delimiter = ',')]
    pub endpoint_allow: Vec<IpNet>,

    /// A JSON file of API keys (hashed; see `herald keys generate`), reloaded when it changes.
    /// With keys, every Broker call needs `authorization: Bearer <key>`.
    #[arg(long, env = "HERALD_API_KEYS_FILE", conflicts_with = "api_keys")]
    pub api_keys_file: Option<PathBuf>,

    /// The API key set as JSON text, instead of a file.
    #[arg(long, env = "HERALD_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,

    /// Serve without API keys on a non-loopback address (refused otherwise).
    #[arg(long, env = "HERALD_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// PEM certificate chain for TLS on the gRPC listener (with `--tls-key`); reloaded when
    /// it changes.
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: clients must present a certificate that chains to one (mTLS).
    #[arg(long, env = "HERALD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// How long shutdown waits for in-flight deliveries before leaving them pending.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = defaults::SHUTDOWN_GRACE, value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How long events are kept after their last delivery, so that operators can replay
    /// them (`herald replay`); `0s` deletes them as soon as every subscription has them.
    #[arg(long, env = "HERALD_RETENTION", default_value = defaults::RETENTION, value_parser = parse_duration)]
    pub retention: Duration,

    /// Disable a subscription whose endpoint has failed every attempt for this long (no
    /// success in between, as this instance saw it): it stops sending, keeps receiving events,
    /// and says why, until an operator resumes it. `0s` (the default) never disables.
    #[arg(long, env = "HERALD_AUTO_DISABLE_AFTER", default_value = "0s", value_parser = parse_duration)]
    pub auto_disable_after: Duration,
}

/// How to reach DynamoDB.
#[derive(Debug, Clone, clap::Args)]
pub struct DynamoArgs {
    /// DynamoDB table name.
    #[arg(
        long = "table",
        env = "HERALD_DYNAMODB_TABLE",
        default_value = defaults::TABLE
    )]
    pub table: String,

    /// AWS region (else the standard chain: `AWS_REGION`, profile, ...).
    #[arg(long = "region", env = "HERALD_DYNAMODB_REGION")]
    pub region: Option<String>,

    /// Endpoint URL of a DynamoDB-compatible server (`AWS_ENDPOINT_URL_DYNAMODB` and
    /// `AWS_ENDPOINT_URL` work too).
    #[arg(long = "endpoint", env = "HERALD_DYNAMODB_ENDPOINT")]
    pub endpoint: Option<String>,
}

impl DynamoArgs {
    /// As the store's configuration.
    pub fn to_config(&self) -> crate::store::dynamodb::DynamoConfig {
        crate::store::dynamodb::DynamoConfig {
            table: self.table.clone(),
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
        }
    }
}

/// Most threads `--worker-threads` and `--store-readers` accept.
const MAX_THREADS: usize = 1024;

impl ServeConfig {
    /// The configuration a test or embedding program starts from: every default, with the
    /// given data directory and listen address.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let duration = |text| parse_duration(text).expect("default durations parse");
        let retry = defaults::retry_policy();
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            store_cache_mib: defaults::STORE_CACHE_MIB,
            store: StoreKind::Embedded,
            dynamodb: DynamoArgs {
                table: defaults::TABLE.into(),
                region: None,
                endpoint: None,
            },
            create_table: false,
            partition_lease: duration(defaults::PARTITION_LEASE),
            rescan_interval: duration(defaults::RESCAN_INTERVAL),
            fanout_repair_after: duration(defaults::FANOUT_REPAIR_AFTER),
            max_payload_bytes: defaults::MAX_PAYLOAD_BYTES,
            idempotency_window: duration(defaults::IDEMPOTENCY_WINDOW),
            delivery_concurrency: defaults::DELIVERY_CONCURRENCY,
            worker_threads: None,
            store_readers: None,
            default_initial_backoff: retry.initial_backoff,
            default_max_backoff: retry.max_backoff,
            default_max_attempts: retry.max_attempts,
            default_request_timeout: retry.request_timeout,
            shutdown_grace: duration(defaults::SHUTDOWN_GRACE),
            auto_disable_after: Duration::ZERO,
            retention: duration(defaults::RETENTION),
            metrics_listen: None,
            admin_listen: None,
            metrics_backlog_interval: Duration::from_secs(15),
            metrics_max_subscriptions: 100,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            max_subscriptions: defaults::MAX_SUBSCRIPTIONS,
            max_subscriptions_per_pattern: defaults::MAX_SUBSCRIPTIONS_PER_PATTERN,
            rate_limit_publish: defaults::RATE_LIMIT_PUBLISH,
            rate_limit_manage: defaults::RATE_LIMIT_MANAGE,
            endpoint_policy: EndpointPolicy::AllowPrivate,
            endpoint_allow: Vec::new(),
            api_keys_file: None,
            api_keys: None,
            insecure_no_auth: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }

    /// The TLS files, if TLS is on.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// Where the API keys come from.
    pub fn key_source(&self) -> KeySource {
        match (&self.api_keys_file, &self.api_keys) {
            (Some(path), _) => KeySource::File(path.clone()),
            (None, Some(text)) => KeySource::Inline(text.clone()),
            (None, None) => KeySource::None,
        }
    }

    /// The endpoint address rules deliveries and Subscribe enforce.
    pub fn endpoint_rules(&self) -> AddressRules {
        AddressRules {
            policy: self.endpoint_policy,
            allow: self.endpoint_allow.clone(),
        }
    }

    /// The async runtime's worker threads: `--worker-threads`, else
    /// [`defaults::worker_threads`].
    pub fn worker_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(defaults::worker_threads)
    }

    /// The embedded store's reader threads: `--store-readers`, else
    /// [`defaults::store_readers`].
    pub fn store_readers(&self) -> usize {
        self.store_readers.unwrap_or_else(defaults::store_readers)
    }

    /// The retry policy that new subscriptions start from.
    pub fn default_retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: self.default_initial_backoff,
            max_backoff: self.default_max_backoff,
            max_attempts: self.default_max_attempts,
            request_timeout: self.default_request_timeout,
        }
    }

    /// Checks the settings that flags alone cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 64 * 1024 * 1024 {
            return Err("--max-payload-bytes must be between 1 and 67108864".into());
        }
        if self.delivery_concurrency == 0 {
            return Err("--delivery-concurrency must be at least 1".into());
        }
        for (flag, threads) in [
            ("--worker-threads", self.worker_threads),
            ("--store-readers", self.store_readers),
        ] {
            if threads.is_some_and(|threads| !(1..=MAX_THREADS).contains(&threads)) {
                return Err(format!("{flag} must be between 1 and {MAX_THREADS}"));
            }
        }
        // A DynamoDB item holds at most 400 KB; keep room for the event's other attributes.
        if self.store == StoreKind::Dynamodb && self.max_payload_bytes > 350 * 1024 {
            return Err(
                "--max-payload-bytes must be at most 358400 with --store dynamodb (400 KB items)"
                    .into(),
            );
        }
        let table = &self.dynamodb.table;
        if !(3..=255).contains(&table.len())
            || !table
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || "_.-".contains(character))
        {
            return Err(format!(
                "--table `{table}`: DynamoDB table names are 3 to 255 characters of [a-zA-Z0-9_.-]"
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some()
            || (self.tls_client_ca.is_some() && self.tls_cert.is_none())
        {
            return Err(
                "--tls-cert and --tls-key go together (and --tls-client-ca needs them)".into(),
            );
        }
        // Client certificates (mTLS) authenticate callers too.
        if !self.listen.ip().is_loopback()
            && matches!(self.key_source(), KeySource::None)
            && self.tls_client_ca.is_none()
            && !self.insecure_no_auth
        {
            return Err(format!(
                "refusing to serve on {} without API keys: anyone who can reach it could \
                 subscribe to every event. Give keys (--api-keys-file, HERALD_API_KEYS), or pass \
                 --insecure-no-auth to accept unauthenticated calls from the network",
                self.listen
            ));
        }
        if self.partition_lease < Duration::from_secs(1) {
            return Err("--partition-lease must be at least 1s".into());
        }
        if self.rescan_interval < Duration::from_millis(100) {
            return Err("--rescan-interval must be at least 100ms".into());
        }
        crate::validate::retry_policy(&self.default_retry_policy())
            .map_err(|error| format!("default retry policy: {error}"))
    }
}

/// Parses durations such as `250ms`, `10s`, `5m`, `24h`, `7d`, or a combination like `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|character: char| !character.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration `{text}`: expected a number"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration `{text}`"))?;
        rest = &rest[digits..];
        let unit_end = rest
            .find(|character: char| character.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            other => {
                return Err(format!(
                    "invalid duration `{text}`: unknown unit `{other}` (use ms, s, m, h or d)"
                ));
            }
        };
        rest = &rest[unit_end..];
        total += unit
            .checked_mul(u32::try_from(value).map_err(|_| format!("duration `{text}` too large"))?)
            .ok_or_else(|| format!("duration `{text}` too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_flags_and_with_data_dir_share_every_default() {
        use clap::{Args, FromArgMatches};
        let command = ServeConfig::augment_args(clap::Command::new("serve"));
        let parsed = ServeConfig::from_arg_matches(&command.get_matches_from(["serve"])).unwrap();
        let mut built = ServeConfig::with_data_dir(defaults::DATA_DIR);
        built.listen = defaults::LISTEN.parse().unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
        assert_eq!(RetryPolicy::default(), parsed.default_retry_policy());
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(ServeConfig::with_data_dir("x").validate(), Ok(()));
        let mut config = ServeConfig::with_data_dir("x");
        config.delivery_concurrency = 0;
        assert!(config.validate().is_err());
        let mut config = ServeConfig::with_data_dir("x");
        config.store = StoreKind::Dynamodb;
        config.max_payload_bytes = 400 * 1024;
        assert!(config.validate().unwrap_err().contains("400 KB items"));
        config.dynamodb.table = "x".into();
        config.max_payload_bytes = 1024;
        assert!(config.validate().unwrap_err().contains("--table"));
        let mut config = ServeConfig::with_data_dir("x");
        config.listen = "0.0.0.0:50051".parse().unwrap();
        assert!(config.validate().unwrap_err().contains("without API keys"));
        config.insecure_no_auth = true;
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn thread_counts_default_to_the_cores_and_refuse_zero() {
        let cores = defaults::cores();
        let mut config = ServeConfig::with_data_dir("x");
        assert_eq!(config.worker_threads(), cores);
        assert_eq!(config.store_readers(), cores.max(2));
        config.worker_threads = Some(3);
        config.store_readers = Some(5);
        assert_eq!((config.worker_threads(), config.store_readers()), (3, 5));
        config.worker_threads = Some(0);
        assert!(config.validate().unwrap_err().contains("--worker-threads"));
        config.worker_threads = None;
        config.store_readers = Some(0);
        assert!(config.validate().unwrap_err().contains("--store-readers"));
    }
}
