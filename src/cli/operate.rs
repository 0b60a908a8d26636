//! The operator's subcommands: status, pause, resume, retry, skip.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::client::{ServerArgs, connect, print_subscription, status_error};
use crate::proto;

/// `herald status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
}

/// `herald pause`.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// Pause only this topic's partition.
    #[arg(long, default_value = "")]
    topic: String,
    /// Why (shown in the status).
    #[arg(long, default_value = "")]
    reason: String,
}

/// `herald resume`.
#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// Resume only this topic's partition.
    #[arg(long, default_value = "")]
    topic: String,
}

/// One partition: `herald retry`.
#[derive(Debug, clap::Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// The partition's topic.
    #[arg(long)]
    topic: String,
}

/// `herald skip`.
#[derive(Debug, clap::Args)]
pub struct SkipArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// The partition's topic.
    #[arg(long)]
    topic: String,
    /// The head's sequence, as `herald status` shows it (refused if the head moved).
    #[arg(long)]
    sequence: u64,
}

/// `herald redrive` and `herald purge`: some dead letters of a partition, or all.
#[derive(Debug, clap::Args)]
#[group(id = "selection", required = true, args = ["sequences", "all"])]
pub struct DeadLetterArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// The partition's topic.
    #[arg(long)]
    topic: String,
    /// A dead letter's sequence (`herald pending SUB --dead-letters` lists them); repeatable.
    #[arg(long = "sequence")]
    sequences: Vec<u64>,
    /// Every dead letter of the partition.
    #[arg(long, conflicts_with = "sequences")]
    all: bool,
}

/// Puts dead letters back in front of their partition.
pub async fn redrive(args: DeadLetterArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let response = client
        .redrive_dead_letters(proto::RedriveDeadLettersRequest {
            subscription_id: args.subscription_id,
            topic: args.topic,
            sequences: args.sequences,
        })
        .await
        .map_err(status_error)?;
    println!("redriven={}", response.into_inner().redriven_count);
    Ok(())
}

/// Deletes dead letters for good.
pub async fn purge(args: DeadLetterArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let response = client
        .purge_dead_letters(proto::PurgeDeadLettersRequest {
            subscription_id: args.subscription_id,
            topic: args.topic,
            sequences: args.sequences,
        })
        .await
        .map_err(status_error)?;
    println!("purged={}", response.into_inner().purged_count);
    Ok(())
}

/// `herald replay`.
#[derive(Debug, clap::Args)]
#[group(id = "start", required = true, args = ["from_sequence", "since"])]
pub struct ReplayArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscription id.
    subscription_id: String,
    /// The partition's topic.
    #[arg(long)]
    topic: String,
    /// First sequence of the range.
    #[arg(long)]
    from_sequence: Option<u64>,
    /// Start this long ago instead (e.g. `1h`): events published since then.
    #[arg(long, value_parser = crate::config::parse_duration, conflicts_with = "from_sequence")]
    since: Option<Duration>,
    /// Last sequence of the range (default: up to now).
    #[arg(long)]
    to_sequence: Option<u64>,
    /// Events queued per call; the command calls again until the range is queued.
    #[arg(long, default_value_t = 1000)]
    limit: i32,
}

/// Queues a range of a partition's delivered events again, call after call.
pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    use proto::replay_request::{End, Start};
    let mut client = connect(&args.server).await?;
    let mut start = match (args.from_sequence, args.since) {
        (Some(sequence), _) => Start::FromSequence(sequence),
        (None, Some(since)) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
            let from = now.saturating_sub(since);
            Start::FromTime(prost_types::Timestamp {
                seconds: from.as_secs() as i64,
                nanos: from.subsec_nanos() as i32,
            })
        }
        (None, None) => anyhow::bail!("give --from-sequence or --since"),
    };
    let (mut replayed, mut skipped) = (0, 0);
    loop {
        let response = client
            .replay(proto::ReplayRequest {
                subscription_id: args.subscription_id.clone(),
                topic: args.topic.clone(),
                start: Some(start),
                end: args.to_sequence.map(End::ToSequence),
                limit: args.limit,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        replayed += response.replayed_count;
        skipped += response.skipped_count;
        if response.next_sequence == 0 {
            break;
        }
        start = Start::FromSequence(response.next_sequence);
    }
    println!("replayed={replayed} skipped={skipped}");
    Ok(())
}

/// Prints the subscription and a table of its partitions, following pages.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let mut page_token = String::new();
    let mut first = true;
    loop {
        let page = client
            .get_subscription_status(proto::GetSubscriptionStatusRequest {
                subscription_id: args.subscription_id.clone(),
                page_size: 100,
                page_token,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if first {
            if let Some(subscription) = &page.subscription {
                print_subscription(subscription);
                let state =
                    proto::SubscriptionState::try_from(subscription.state).unwrap_or_default();
                println!("state={}", short(state.as_str_name()));
            }
            println!(
                "{:<24} {:<10} {:>8} {:>6} {:>10} {:>20} {:>8} {:>12} {:>8}  LAST_ERROR",
                "TOPIC",
                "STATE",
                "PENDING",
                "DEAD",
                "OLDEST",
                "HEAD",
                "ATTEMPTS",
                "NEXT_ATTEMPT",
                "FAILURES"
            );
            first = false;
        }
        for partition in &page.partitions {
            let state = proto::PartitionState::try_from(partition.state).unwrap_or_default();
            println!(
                "{:<24} {:<10} {:>8} {:>6} {:>10} {:>20} {:>8} {:>12} {:>8}  {}",
                partition.topic,
                short(state.as_str_name()),
                partition.pending_count,
                partition.dead_letter_count,
                age(partition.oldest_pending_published_at.as_ref()),
                partition.head_sequence,
                partition.head_attempts,
                until(partition.head_next_attempt_at.as_ref()),
                partition.consecutive_failures,
                partition.last_error,
            );
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}

/// Pauses a subscription or one partition.
pub async fn pause(args: PauseArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let subscription = client
        .pause_subscription(proto::PauseSubscriptionRequest {
            subscription_id: args.subscription_id,
            topic: args.topic,
            reason: args.reason,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print_subscription(&subscription);
    Ok(())
}

/// Resumes a subscription or one partition.
pub async fn resume(args: ResumeArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let subscription = client
        .resume_subscription(proto::ResumeSubscriptionRequest {
            subscription_id: args.subscription_id,
            topic: args.topic,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print_subscription(&subscription);
    let state = proto::SubscriptionState::try_from(subscription.state).unwrap_or_default();
    println!("state={}", short(state.as_str_name()));
    Ok(())
}

/// Makes a partition's head due now.
pub async fn retry(args: PartitionArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let response = client
        .retry_now(proto::RetryNowRequest {
            subscription_id: args.subscription_id,
            topic: args.topic,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if response.sequence == 0 {
        println!("nothing pending");
    } else {
        println!("head sequence={} is due now", response.sequence);
    }
    Ok(())
}

/// Dead-letters a partition's head.
pub async fn skip(args: SkipArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    client
        .skip_head(proto::SkipHeadRequest {
            subscription_id: args.subscription_id,
            topic: args.topic,
            sequence: args.sequence,
        })
        .await
        .map_err(status_error)?;
    println!("skipped sequence={} (dead-lettered)", args.sequence);
    Ok(())
}

/// An enum value's name without its type prefix.
fn short(name: &str) -> &str {
    name.rsplit_once("_STATE_").map_or(name, |(_, short)| short)
}

/// How long ago a timestamp was, for people (`-` if unset).
fn age(timestamp: Option<&prost_types::Timestamp>) -> String {
    match timestamp.map(offset_from_now) {
        Some(Some(offset)) if offset <= 0.0 => human(-offset),
        Some(_) => "0s".into(),
        None => "-".into(),
    }
}

/// How long until a timestamp, for people (`now` if it is past, `-` if unset).
fn until(timestamp: Option<&prost_types::Timestamp>) -> String {
    match timestamp.map(offset_from_now) {
        Some(Some(ahead)) if ahead > 0.0 => format!("in {}", human(ahead)),
        Some(_) => "now".into(),
        None => "-".into(),
    }
}

/// Seconds from now to `at` (negative: in the past).
fn offset_from_now(at: &prost_types::Timestamp) -> Option<f64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let at = Duration::new(u64::try_from(at.seconds).ok()?, at.nanos.max(0) as u32);
    Some(at.as_secs_f64() - now.as_secs_f64())
}

fn human(seconds: f64) -> String {
    let seconds = seconds.max(0.0) as u64;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{}h", seconds / 86400, seconds % 86400 / 3600),
    }
}
