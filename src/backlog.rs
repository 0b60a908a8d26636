//! The backlog gauges: every `--metrics-backlog-interval`, the status of every subscription's
//! partitions (read from the store's counters and each partition's head, never by counting
//! rows) is summed per subscription into a snapshot that `/metrics` renders.
//!
//! Label cardinality is bounded: the `--metrics-max-subscriptions` subscriptions with the
//! largest backlogs get their own `subscription` label, the rest are summed under
//! `subscription="_other"`. On DynamoDB every instance reads the whole table's figures, so
//! aggregate them across instances with `max`, not `sum`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::broker::{Broker, PartitionState, partition_state};
use crate::model::UnixMillis;
use crate::shutdown::Shutdown;

/// The label under which subscriptions beyond the cap are summed.
pub const OTHER: &str = "_other";
/// Subscriptions read per page, and partitions per subscription per page.
const PAGE: i32 = 1000;

/// One subscription's backlog (or the sum of those beyond the cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionBacklog {
    /// The subscription id, or [`OTHER`].
    pub subscription: String,
    /// Deliveries waiting, dead letters not included.
    pub pending: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Publish time of its oldest pending event, if any.
    pub oldest_pending: Option<UnixMillis>,
}

/// What the last refresh found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BacklogSnapshot {
    /// Per subscription, largest backlogs first, then [`OTHER`] if any were summed.
    pub subscriptions: Vec<SubscriptionBacklog>,
    /// Partitions by state: idle, delivering, retrying, blocked, paused.
    pub partitions: [u64; 5],
}

/// The snapshot shared with the metrics collector; `None` until the first refresh.
pub type SharedSnapshot = Arc<Mutex<Option<BacklogSnapshot>>>;

/// The index of a state in [`BacklogSnapshot::partitions`], and its label.
pub fn state_slot(state: PartitionState) -> (usize, &'static str) {
    match state {
        PartitionState::Idle => (0, "idle"),
        PartitionState::Delivering => (1, "delivering"),
        PartitionState::Retrying => (2, "retrying"),
        PartitionState::Blocked => (3, "blocked"),
        PartitionState::Paused => (4, "paused"),
    }
}

/// Refreshes `snapshot` every `interval` until shutdown.
pub async fn refresh_loop(
    broker: Arc<Broker>,
    snapshot: SharedSnapshot,
    interval: Duration,
    cap: usize,
    mut shutdown: Shutdown,
) {
    loop {
        match read(&broker, cap).await {
            Ok(fresh) => *snapshot.lock().expect("snapshot lock") = Some(fresh),
            Err(error) => tracing::warn!(%error, "cannot read the backlog for the metrics"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.fired() => return,
        }
    }
}

/// Reads every subscription's status into a snapshot.
async fn read(broker: &Broker, cap: usize) -> Result<BacklogSnapshot, crate::error::Error> {
    let mut snapshot = BacklogSnapshot::default();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = broker.list_subscriptions(PAGE, &token).await?;
        for subscription in page.items {
            let mut backlog = SubscriptionBacklog {
                subscription: subscription.id.clone(),
                pending: 0,
                dead_letters: 0,
                oldest_pending: None,
            };
            let mut partitions_token = String::new();
            loop {
                let (subscription, partitions) = match broker
                    .subscription_status(&subscription.id, PAGE, &partitions_token)
                    .await
                {
                    Ok(found) => found,
                    // Deleted meanwhile.
                    Err(crate::error::Error::NotFound(_)) => break,
                    Err(error) => return Err(error),
                };
                for status in &partitions.items {
                    let (slot, _) = state_slot(partition_state(&subscription, status));
                    snapshot.partitions[slot] += 1;
                    backlog.pending += status.pending;
                    backlog.dead_letters += status.dead_letters;
                    if let Some(head) = &status.head {
                        backlog.oldest_pending = Some(
                            backlog
                                .oldest_pending
                                .map_or(head.published_at, |oldest| oldest.min(head.published_at)),
                        );
                    }
                }
                match partitions.next_token {
                    Some(next) => partitions_token = next,
                    None => break,
                }
            }
            all.push(backlog);
        }
        match page.next_token {
            Some(next) => token = next,
            None => break,
        }
    }
    all.sort_by(|a, b| {
        (b.pending + b.dead_letters)
            .cmp(&(a.pending + a.dead_letters))
            .then_with(|| a.subscription.cmp(&b.subscription))
    });
    let rest = all.split_off(all.len().min(cap));
    snapshot.subscriptions = all;
    if !rest.is_empty() {
        snapshot.subscriptions.push(SubscriptionBacklog {
            subscription: OTHER.to_string(),
            pending: rest.iter().map(|backlog| backlog.pending).sum(),
            dead_letters: rest.iter().map(|backlog| backlog.dead_letters).sum(),
            oldest_pending: rest
                .iter()
                .filter_map(|backlog| backlog.oldest_pending)
                .min(),
        });
    }
    Ok(snapshot)
}
