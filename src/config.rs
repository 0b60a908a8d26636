//! Server configuration: every setting is a flag and a `HERALD_*` environment variable
//! (flags win), validated at load.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::RetryPolicy;

/// `herald serve` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address for the gRPC server. Port 0 picks a free port (printed at start).
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "HERALD_DATA_DIR", default_value = "./herald-data")]
    pub data_dir: PathBuf,

    /// Largest accepted event payload, in bytes.
    #[arg(long, env = "HERALD_MAX_PAYLOAD_BYTES", default_value_t = 256 * 1024)]
    pub max_payload_bytes: usize,

    /// How long idempotency keys are remembered (e.g. `24h`, `90m`, `30s`).
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// Most HTTP deliveries in flight at once, over all partitions.
    #[arg(long, env = "HERALD_DELIVERY_CONCURRENCY", default_value_t = 256)]
    pub delivery_concurrency: usize,

    /// Default first backoff cap of new subscriptions.
    #[arg(long, env = "HERALD_DEFAULT_INITIAL_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub default_initial_backoff: Duration,

    /// Default largest backoff of new subscriptions.
    #[arg(long, env = "HERALD_DEFAULT_MAX_BACKOFF", default_value = "10m", value_parser = parse_duration)]
    pub default_max_backoff: Duration,

    /// Default attempts before an event is exhausted.
    #[arg(long, env = "HERALD_DEFAULT_MAX_ATTEMPTS", default_value_t = 12)]
    pub default_max_attempts: u32,

    /// Default per-request timeout of new subscriptions.
    #[arg(long, env = "HERALD_DEFAULT_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub default_request_timeout: Duration,

    /// How long shutdown waits for in-flight deliveries before leaving them pending.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

impl ServeConfig {
    /// The configuration a test or embedding program starts from: every default, with the
    /// given data directory and listen address.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            max_payload_bytes: 256 * 1024,
            idempotency_window: Duration::from_secs(24 * 3600),
            delivery_concurrency: 256,
            default_initial_backoff: Duration::from_secs(1),
            default_max_backoff: Duration::from_secs(600),
            default_max_attempts: 12,
            default_request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
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
    fn defaults_are_valid() {
        assert_eq!(ServeConfig::with_data_dir("x").validate(), Ok(()));
        let mut config = ServeConfig::with_data_dir("x");
        config.delivery_concurrency = 0;
        assert!(config.validate().is_err());
    }
}
