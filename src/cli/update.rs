//! `herald update` and `herald rotate-secret`: changing a subscription in place.

use std::time::Duration;

use super::client::{ServerArgs, connect, print_subscription, status_error};
use crate::config::parse_duration;
use crate::proto;

/// `herald update`: the fields given are changed, the others kept.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// New endpoint URL.
    #[arg(long)]
    endpoint: Option<String>,
    /// New first backoff cap.
    #[arg(long, value_parser = parse_duration)]
    initial_backoff: Option<Duration>,
    /// New largest backoff.
    #[arg(long, value_parser = parse_duration)]
    max_backoff: Option<Duration>,
    /// New number of attempts before an event is exhausted.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// New per-request timeout.
    #[arg(long, value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// New exhaustion policy: `dead-letter` or `block`.
    #[arg(long, value_parser = ["dead-letter", "block"])]
    on_exhausted: Option<String>,
    /// New limit of requests per second to the endpoint (0: no limit).
    #[arg(long)]
    max_requests_per_second: Option<u32>,
    /// New limit of requests in flight to the endpoint (0: no limit).
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// New topic list (replaces the whole list); repeat the flag or separate with commas.
    #[arg(long, value_delimiter = ',')]
    topics: Option<Vec<String>>,
    /// New CEL filter; `--filter ''` removes it.
    #[arg(long)]
    filter: Option<String>,
    /// Refuse the update if the subscription changed since this etag was read.
    #[arg(long, default_value = "")]
    etag: String,
}

/// `herald rotate-secret`.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// The new secret `whsec_...`; generated if omitted.
    #[arg(long, default_value = "")]
    secret: String,
    /// How long the old secret keeps signing too (default 24h; `0s`: stop at once).
    #[arg(long, value_parser = parse_duration)]
    grace: Option<Duration>,
}

fn to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

/// Changes the given fields.
pub async fn update(args: UpdateArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let mut paths = Vec::new();
    let mut policy = proto::RetryPolicy::default();
    if args.endpoint.is_some() {
        paths.push("endpoint".to_string());
    }
    if let Some(value) = args.initial_backoff {
        paths.push("retry_policy.initial_backoff".into());
        policy.initial_backoff = Some(to_proto(value));
    }
    if let Some(value) = args.max_backoff {
        paths.push("retry_policy.max_backoff".into());
        policy.max_backoff = Some(to_proto(value));
    }
    if let Some(value) = args.max_attempts {
        paths.push("retry_policy.max_attempts".into());
        policy.max_attempts = value;
    }
    if let Some(value) = args.request_timeout {
        paths.push("retry_policy.request_timeout".into());
        policy.request_timeout = Some(to_proto(value));
    }
    let on_exhausted = match args.on_exhausted.as_deref() {
        Some(value) => {
            paths.push("on_exhausted".into());
            if value == "block" {
                proto::OnExhausted::Block
            } else {
                proto::OnExhausted::DeadLetter
            }
        }
        None => proto::OnExhausted::Unspecified,
    };
    if args.max_requests_per_second.is_some() {
        paths.push("max_requests_per_second".into());
    }
    if args.max_in_flight.is_some() {
        paths.push("max_in_flight".into());
    }
    if args.topics.is_some() {
        paths.push("topics".into());
    }
    if args.filter.is_some() {
        paths.push("filter".into());
    }
    if paths.is_empty() {
        anyhow::bail!(
            "nothing to change: give --endpoint, --topics, --filter, a retry setting, \
             --on-exhausted or a limit"
        );
    }
    let response = client
        .update_subscription(proto::UpdateSubscriptionRequest {
            subscription: Some(proto::Subscription {
                id: args.subscription_id,
                endpoint: args.endpoint.unwrap_or_default(),
                retry_policy: Some(policy),
                on_exhausted: on_exhausted as i32,
                max_requests_per_second: args.max_requests_per_second.unwrap_or(0),
                max_in_flight: args.max_in_flight.unwrap_or(0),
                topics: args.topics.unwrap_or_default(),
                filter: args.filter.unwrap_or_default(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
            etag: args.etag,
        })
        .await
        .map_err(status_error)?;
    let dropped = response
        .metadata()
        .get(crate::api::DROPPED_DELIVERIES_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let subscription = response.into_inner();
    print_subscription(&subscription);
    println!("etag={}", subscription.etag);
    if let Some(dropped) = dropped {
        println!("dropped_deliveries={dropped}");
    }
    Ok(())
}

/// Replaces the signing secret and prints the new one.
pub async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let response = client
        .rotate_secret(proto::RotateSecretRequest {
            subscription_id: args.subscription_id,
            secret: args.secret,
            grace: args.grace.map(to_proto),
            etag: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("secret={}", response.secret);
    if let Some(until) = response
        .subscription
        .and_then(|subscription| subscription.previous_secret_expires_at)
    {
        println!(
            "the old secret signs too until {} (Unix seconds)",
            until.seconds
        );
    }
    Ok(())
}
