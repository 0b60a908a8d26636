//! Client subcommands: one gRPC call each, printed for people.

use std::time::Duration;

use anyhow::Context;

use crate::config::parse_duration;
use crate::proto;
use tonic::service::interceptor::InterceptedService;

use crate::proto::broker_service_client::BrokerServiceClient;

/// Where the server is.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The server's gRPC address.
    #[arg(long, env = "HERALD_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// API key, sent as `authorization: Bearer <key>` (needed when the server has keys).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate to trust for an `https://` server (default: the system's roots).
    #[arg(long, env = "HERALD_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a server that asks for one (mTLS); with `--tls-key`.
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

/// Adds the API key to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = BrokerServiceClient<InterceptedService<tonic::transport::Channel, Bearer>>;

/// `herald publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Topic to publish on.
    #[arg(long)]
    topic: String,
    /// The payload, as text.
    #[arg(long, default_value = "")]
    data: String,
    /// Content type of the payload.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Idempotency key.
    #[arg(long, default_value = "")]
    idempotency_key: String,
    /// An attribute `key=value`; repeatable.
    #[arg(long = "attribute", value_parser = parse_attribute)]
    attributes: Vec<(String, String)>,
}

/// `herald subscribe`.
#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Endpoint URL that receives the POSTs.
    #[arg(long)]
    endpoint: String,
    /// Topic, `prefix*` pattern or `*`; repeatable.
    #[arg(long = "topic", required = true)]
    topics: Vec<String>,
    /// Signing secret `whsec_...`; generated if omitted.
    #[arg(long, default_value = "")]
    secret: String,
    /// First backoff cap (e.g. `500ms`); server default if omitted.
    #[arg(long, value_parser = parse_duration)]
    initial_backoff: Option<Duration>,
    /// Largest backoff; server default if omitted.
    #[arg(long, value_parser = parse_duration)]
    max_backoff: Option<Duration>,
    /// Attempts before an event is exhausted; server default if omitted.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Per-request timeout; server default if omitted.
    #[arg(long, value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// `dead-letter` (park and continue) or `block` (stop the partition).
    #[arg(long, default_value = "dead-letter", value_parser = ["dead-letter", "block"])]
    on_exhausted: String,
    /// Requests per second to the endpoint at most (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_requests_per_second: u32,
    /// Requests in flight to the endpoint at most (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_in_flight: u32,
    /// CEL filter over `topic` and `attributes`, e.g. `attributes.region == "eu"`.
    #[arg(long, default_value = "")]
    filter: String,
}

/// `herald unsubscribe`.
#[derive(Debug, clap::Args)]
pub struct UnsubscribeArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    id: String,
}

/// `herald pending`.
#[derive(Debug, clap::Args)]
pub struct PendingArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// Only this topic.
    #[arg(long, default_value = "")]
    topic: String,
    /// Entries per page.
    #[arg(long, default_value_t = 50)]
    page_size: i32,
    /// Token of the page to show.
    #[arg(long, default_value = "")]
    page_token: String,
    /// Only dead letters.
    #[arg(long)]
    dead_letters: bool,
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("`{text}` is not key=value"))
}

pub(super) async fn connect(server: &ServerArgs) -> anyhow::Result<Client> {
    let bearer = match &server.api_key {
        Some(key) => Some(
            format!("Bearer {key}")
                .parse()
                .context("the API key is not valid header text")?,
        ),
        None => None,
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(server.server.clone())
        .with_context(|| format!("`{}` is not a server address", server.server))?;
    if server.server.starts_with("https://") {
        endpoint = endpoint.tls_config(client_tls(server)?)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", server.server))?;
    Ok(BrokerServiceClient::with_interceptor(
        channel,
        Bearer(bearer),
    ))
}

/// The TLS settings of an `https://` connection.
fn client_tls(server: &ServerArgs) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &server.tls_ca {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read(path)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&server.tls_cert, &server.tls_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// `herald keys generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateKeyArgs {
    /// Who the key is for (shown in logs and error messages).
    #[arg(long)]
    name: String,
    /// Roles: publish, subscribe, read, operate; repeatable or comma-separated.
    #[arg(long = "role", required = true, value_delimiter = ',',
          value_parser = ["publish", "subscribe", "read", "operate"])]
    roles: Vec<String>,
    /// Topic patterns the key is limited to; repeatable (default: every topic).
    #[arg(long = "topic")]
    topics: Vec<String>,
}

/// Prints a new API key (once) and the entry to add to the key file.
pub fn generate_key(args: GenerateKeyArgs) -> anyhow::Result<()> {
    // No topic means every topic; the ones given must be valid patterns.
    if !args.topics.is_empty() {
        crate::validate::patterns(&args.topics).map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    let (key, hash) = crate::auth::generate_key();
    let entry = serde_json::json!({
        "name": args.name,
        "roles": args.roles,
        "topics": args.topics,
        "sha256": hash,
    });
    println!("API key (shown once; give it to the client as HERALD_API_KEY):");
    println!("{key}");
    println!();
    println!("Entry for the \"keys\" list of the server's --api-keys-file:");
    println!("{entry}");
    Ok(())
}

pub(super) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn to_proto_duration(duration: Option<Duration>) -> Option<prost_types::Duration> {
    duration.map(|duration| prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    })
}

fn show_duration(duration: Option<prost_types::Duration>) -> String {
    let duration = duration.unwrap_or_default();
    format!(
        "{}ms",
        duration.seconds * 1000 + i64::from(duration.nanos) / 1_000_000
    )
}

/// Publishes one event and prints its id and sequence.
pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let response = client
        .publish(proto::PublishRequest {
            topic: args.topic,
            payload: args.data.into_bytes(),
            content_type: args.content_type,
            idempotency_key: args.idempotency_key,
            attributes: args.attributes.into_iter().collect(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "event_id={} sequence={} subscriptions={}{}",
        response.event_id,
        response.sequence,
        response.subscription_count,
        if response.duplicate { " duplicate" } else { "" }
    );
    Ok(())
}

/// Creates a subscription and prints it with its secret.
pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let on_exhausted = match args.on_exhausted.as_str() {
        "block" => proto::OnExhausted::Block,
        _ => proto::OnExhausted::DeadLetter,
    };
    let subscription = client
        .subscribe(proto::SubscribeRequest {
            endpoint: args.endpoint,
            topics: args.topics,
            secret: args.secret,
            retry_policy: Some(proto::RetryPolicy {
                initial_backoff: to_proto_duration(args.initial_backoff),
                max_backoff: to_proto_duration(args.max_backoff),
                max_attempts: args.max_attempts.unwrap_or(0),
                request_timeout: to_proto_duration(args.request_timeout),
            }),
            on_exhausted: on_exhausted as i32,
            max_requests_per_second: args.max_requests_per_second,
            max_in_flight: args.max_in_flight,
            filter: args.filter,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print_subscription(&subscription);
    println!("secret={}", subscription.secret);
    Ok(())
}

pub(super) fn print_subscription(subscription: &proto::Subscription) {
    let policy = subscription.retry_policy.unwrap_or_default();
    println!(
        "{} endpoint={} topics={} initial_backoff={} max_backoff={} max_attempts={} request_timeout={} on_exhausted={:?}",
        subscription.id,
        subscription.endpoint,
        subscription.topics.join(","),
        show_duration(policy.initial_backoff),
        show_duration(policy.max_backoff),
        policy.max_attempts,
        show_duration(policy.request_timeout),
        proto::OnExhausted::try_from(subscription.on_exhausted).unwrap_or_default(),
    );
    if !subscription.filter.is_empty() {
        println!("  filter={}", subscription.filter);
    }
    let state = proto::SubscriptionState::try_from(subscription.state).unwrap_or_default();
    if state != proto::SubscriptionState::Active || !subscription.paused_topics.is_empty() {
        println!(
            "  state={} reason={:?} paused_topics={}",
            state
                .as_str_name()
                .trim_start_matches("SUBSCRIPTION_STATE_"),
            subscription.state_reason,
            subscription.paused_topics.join(","),
        );
    }
}

/// `herald subscriptions`.
#[derive(Debug, clap::Args)]
pub struct SubscriptionsArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Only subscriptions in this state.
    #[arg(long, value_parser = ["active", "paused", "disabled"])]
    state: Option<String>,
}

/// Prints every subscription, following pages.
pub async fn subscriptions(args: SubscriptionsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let state = match args.state.as_deref() {
        Some("active") => proto::SubscriptionState::Active,
        Some("paused") => proto::SubscriptionState::Paused,
        Some("disabled") => proto::SubscriptionState::Disabled,
        _ => proto::SubscriptionState::Unspecified,
    };
    let mut page_token = String::new();
    loop {
        let page = client
            .list_subscriptions(proto::ListSubscriptionsRequest {
                page_size: 100,
                page_token,
                state: state as i32,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        page.subscriptions.iter().for_each(print_subscription);
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}

/// Deletes a subscription.
pub async fn unsubscribe(args: UnsubscribeArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let response = client
        .unsubscribe(proto::UnsubscribeRequest { id: args.id })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("dropped_deliveries={}", response.dropped_deliveries);
    Ok(())
}

/// Prints one page of pending deliveries.
pub async fn pending(args: PendingArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let page = client
        .list_pending(proto::ListPendingRequest {
            subscription_id: args.subscription_id,
            topic: args.topic,
            page_size: args.page_size,
            page_token: args.page_token,
            dead_letters_only: args.dead_letters,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    for delivery in &page.deliveries {
        println!(
            "{} topic={} sequence={} attempts={} {}{} last_error={:?}",
            delivery.event_id,
            delivery.topic,
            delivery.sequence,
            delivery.attempts,
            if delivery.dead_lettered {
                "dead_lettered".to_string()
            } else {
                let due = delivery.next_attempt_at.unwrap_or_default();
                format!("next_attempt_at={}", due.seconds)
            },
            if delivery.redelivery.is_empty() {
                String::new()
            } else {
                format!(" redelivery={}", delivery.redelivery)
            },
            delivery.last_error,
        );
    }
    if page.deliveries.is_empty() {
        println!("no pending deliveries");
    }
    if !page.next_page_token.is_empty() {
        println!("next_page_token={}", page.next_page_token);
    }
    Ok(())
}
