//! The `herald` command line: the server, a client for each RPC, and a verifying sink.

mod client;
mod operate;
mod sink;
mod update;

use clap::{Parser, Subcommand};

use crate::config::ServeConfig;

pub use client::{PendingArgs, PublishArgs, SubscribeArgs};
pub use sink::SinkArgs;

/// Herald: ordered, retried, signed webhook delivery over gRPC.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(Box<ServeConfig>),
    /// Publish one event.
    Publish(PublishArgs),
    /// Create a subscription.
    Subscribe(SubscribeArgs),
    /// List subscriptions.
    Subscriptions(client::SubscriptionsArgs),
    /// Change a subscription in place (endpoint, retry policy): its backlog is kept.
    Update(update::UpdateArgs),
    /// Replace a subscription's signing secret; the old one keeps signing for a grace time.
    RotateSecret(update::RotateArgs),
    /// Delete a subscription and drop its pending deliveries.
    Unsubscribe(client::UnsubscribeArgs),
    /// List the pending deliveries of a subscription.
    Pending(PendingArgs),
    /// Show a subscription's state and each partition's: backlog, head, last error.
    Status(operate::StatusArgs),
    /// Pause a subscription, or one partition (`--topic`): events are kept, nothing is sent.
    Pause(operate::PauseArgs),
    /// Resume a paused or disabled subscription, or one partition (`--topic`).
    Resume(operate::ResumeArgs),
    /// Make a partition's head due now (cut its backoff short).
    Retry(operate::PartitionArgs),
    /// Dead-letter a partition's head so that the partition moves on.
    Skip(operate::SkipArgs),
    /// Put dead letters back in front of their partition (sent next, marked as redriven).
    Redrive(operate::DeadLetterArgs),
    /// Delete dead letters for good.
    Purge(operate::DeadLetterArgs),
    /// Send a range of a partition's delivered events again, in order (marked as replays).
    Replay(operate::ReplayArgs),
    /// Receive webhooks, verify their signatures and sequence chains, and print them.
    Sink(SinkArgs),
    /// DynamoDB administration.
    #[command(subcommand)]
    Dynamodb(DynamodbCommand),
    /// API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `herald keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new API key: prints the key once and the hashed entry for the key file.
    Generate(client::GenerateKeyArgs),
}

/// `herald dynamodb ...`.
#[derive(Debug, Subcommand)]
pub enum DynamodbCommand {
    /// Create the table (PAY_PER_REQUEST, TTL on idempotency keys) and wait until it is active.
    CreateTable(crate::config::DynamoArgs),
}

/// Runs a client subcommand or the sink (`serve` is run by `main`).
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("main runs serve"),
        Command::Publish(args) => client::publish(args).await,
        Command::Subscribe(args) => client::subscribe(args).await,
        Command::Subscriptions(args) => client::subscriptions(args).await,
        Command::Unsubscribe(args) => client::unsubscribe(args).await,
        Command::Pending(args) => client::pending(args).await,
        Command::Update(args) => update::update(args).await,
        Command::RotateSecret(args) => update::rotate(args).await,
        Command::Status(args) => operate::status(args).await,
        Command::Pause(args) => operate::pause(args).await,
        Command::Resume(args) => operate::resume(args).await,
        Command::Retry(args) => operate::retry(args).await,
        Command::Skip(args) => operate::skip(args).await,
        Command::Redrive(args) => operate::redrive(args).await,
        Command::Purge(args) => operate::purge(args).await,
        Command::Replay(args) => operate::replay(args).await,
        Command::Sink(args) => sink::run(args).await,
        Command::Keys(KeysCommand::Generate(args)) => client::generate_key(args),
        Command::Dynamodb(DynamodbCommand::CreateTable(args)) => {
            let config = args.to_config();
            let client = crate::store::dynamodb::client_from_env(&config).await;
            crate::store::dynamodb::create_table(&client, &config.table).await?;
            println!("created table {}", config.table);
            Ok(())
        }
    }
}
