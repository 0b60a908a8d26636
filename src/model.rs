//! Domain types shared by the API, the stores and the delivery engine. No prost, no store types.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::trace::TraceContext;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// The current wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// The current wall-clock time in microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// What to do with an event once its delivery attempts are exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExhausted {
    /// Park the event as dead-lettered and go on with the next one of the partition.
    DeadLetter,
    /// Keep the partition at this event, retrying at the max backoff.
    Block,
}

/// Retry settings of one subscription; every field is filled in (server defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Backoff cap before the second attempt; doubles with each further attempt.
    pub initial_backoff: Duration,
    /// Largest backoff, and the retry interval of a blocked partition.
    pub max_backoff: Duration,
    /// Attempts (the first included) before the event counts as exhausted.
    pub max_attempts: u32,
    /// Time allowed for one HTTP request, response included.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    /// The defaults of `herald serve` ([`crate::config::defaults`]).
    fn default() -> Self {
        crate::config::defaults::retry_policy()
    }
}

/// A registered receiver of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Server-assigned id, `sub_...`; ids sort by creation time.
    pub id: String,
    /// The http(s) URL that receives a POST per event.
    pub endpoint: String,
    /// Exact topics, prefix patterns ending in `*`, or `*`.
    pub topics: Vec<String>,
    /// The Standard Webhooks secret, `whsec_<base64>`.
    pub secret: String,
    /// Retry settings.
    pub retry_policy: RetryPolicy,
    /// What happens after the last attempt.
    pub on_exhausted: OnExhausted,
    /// Creation time.
    pub created_at: UnixMillis,
    /// Whether it sends: paused or disabled as a whole, or paused for some topics.
    pub control: Control,
    /// The secret a rotation replaced, still signing every delivery beside the new one until
    /// its time is up.
    pub previous_secret: Option<PreviousSecret>,
    /// How fast its endpoint may be sent to.
    pub pacing: Pacing,
    /// A CEL expression over an event's topic and attributes: only events it matches are
    /// delivered (see [`crate::filter`]).
    pub filter: Option<String>,
}

/// Limits on how hard a subscription's endpoint is driven, over all its partitions (per
/// instance on a shared store). Zero means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pacing {
    /// Requests started per second at most (no bursts beyond one).
    pub max_requests_per_second: u32,
    /// Requests in flight at once at most.
    pub max_in_flight: u32,
}

/// A replaced signing secret in its grace window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousSecret {
    /// The old `whsec_...` secret.
    pub secret: String,
    /// When it stops signing.
    pub until: UnixMillis,
}

impl Subscription {
    /// The replaced secret, if it still signs at `now`.
    pub fn previous_secret_at(&self, now: UnixMillis) -> Option<&str> {
        self.previous_secret
            .as_ref()
            .filter(|previous| previous.until > now)
            .map(|previous| previous.secret.as_str())
    }
}

impl Subscription {
    /// True if any of the subscription's patterns matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.topics
            .iter()
            .any(|pattern| pattern_matches(pattern, topic))
    }
}

/// Whether a subscription sends at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SubscriptionState {
    /// It sends (except to the topics paused one by one).
    #[default]
    Active,
    /// An operator paused it: events keep arriving, nothing is sent until it is resumed.
    Paused,
    /// Herald stopped it because its endpoint kept failing; nothing is sent until it is
    /// resumed.
    Disabled,
}

/// The operator's controls on a subscription. A paused partition (or a paused or disabled
/// subscription) keeps receiving events and sends nothing; an attempt already in flight
/// finishes and its outcome is recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Control {
    /// The state of the subscription as a whole.
    pub state: SubscriptionState,
    /// Why it is paused or disabled (empty while active).
    pub reason: String,
    /// When `state` last changed (0 if never).
    pub since: UnixMillis,
    /// Topics whose partitions are paused one by one (while the subscription is active).
    pub paused_topics: BTreeSet<String>,
}

impl Control {
    /// True if the partition of `topic` may send now.
    pub fn sends(&self, topic: &str) -> bool {
        self.state == SubscriptionState::Active && !self.paused_topics.contains(topic)
    }
}

/// True if a subscription pattern (`exact`, `prefix*` or `*`) matches `topic`.
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// An event as a publisher hands it to Herald, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Server-assigned id, `evt_...`.
    pub id: String,
    /// The topic published on.
    pub topic: String,
    /// The body, delivered byte for byte.
    pub payload: Vec<u8>,
    /// The `content-type` of every delivery.
    pub content_type: String,
    /// Optional idempotency key, unique per topic within the idempotency window.
    pub idempotency_key: Option<String>,
    /// Free-form attributes.
    pub attributes: BTreeMap<String, String>,
    /// The publisher's trace context, if it sent one.
    pub trace: Option<TraceContext>,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Server-assigned id, `evt_...`.
    pub id: String,
    /// The topic published on.
    pub topic: String,
    /// Strictly increasing per topic in acknowledgement order.
    pub sequence: u64,
    /// The body, delivered byte for byte.
    pub payload: Vec<u8>,
    /// The `content-type` of every delivery.
    pub content_type: String,
    /// Free-form attributes.
    pub attributes: BTreeMap<String, String>,
    /// Acceptance time.
    pub published_at: UnixMillis,
    /// The publisher's trace context, if it sent one.
    pub trace: Option<TraceContext>,
}

/// The outcome of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event id (the original one for a duplicate).
    pub event_id: String,
    /// The event's sequence (the original one for a duplicate).
    pub sequence: u64,
    /// Acceptance time (the original one for a duplicate).
    pub published_at: UnixMillis,
    /// Number of subscriptions fanned out to (the original count for a duplicate).
    pub subscription_count: u32,
    /// True if the idempotency key matched an earlier publish.
    pub duplicate: bool,
    /// The partitions to wake: those that received a new delivery, or for a duplicate the
    /// topic's current partitions (the original's caller may have gone before waking them).
    pub partitions: Vec<PartitionKey>,
}

/// One (topic, subscription) pair: the unit of ordering.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// The topic.
    pub topic: String,
    /// The subscription id.
    pub subscription_id: String,
}

impl PartitionKey {
    /// Builds a key.
    pub fn new(topic: impl Into<String>, subscription_id: impl Into<String>) -> Self {
        PartitionKey {
            topic: topic.into(),
            subscription_id: subscription_id.into(),
        }
    }

    /// The store key `{topic}#{subscription_id}`. Topics cannot contain `#`, so it is unambiguous.
    pub fn encode(&self) -> String {
        format!("{}#{}", self.topic, self.subscription_id)
    }

    /// Parses `{topic}#{subscription_id}`.
    pub fn decode(encoded: &str) -> Option<Self> {
        let (topic, subscription_id) = encoded.split_once('#')?;
        Some(PartitionKey::new(topic, subscription_id))
    }
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}#{}", self.topic, self.subscription_id)
    }
}

/// Delivery progress of one event in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryState {
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next_attempt_at: UnixMillis,
    /// True once attempts are exhausted under the DEAD_LETTER policy.
    pub dead_lettered: bool,
}

/// A pending (undelivered or dead-lettered) delivery, with its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelivery {
    /// The partition it belongs to.
    pub partition: PartitionKey,
    /// The event.
    pub event: Event,
    /// Progress so far.
    pub state: DeliveryState,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// The sequence of the event before this one in the partition (0 for the first).
    pub previous_sequence: u64,
    /// Set if the event is sent again, out of the partition's order: redriven from the dead
    /// letters or replayed.
    pub redelivery: Option<Redelivery>,
}

/// Why an event is sent again, out of its partition's order (header `herald-redelivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// An operator redrove it from the partition's dead letters.
    Redrive,
    /// An operator replayed a range of the partition's delivered events.
    Replay,
}

impl Redelivery {
    /// The name stored and sent in the `herald-redelivery` header.
    pub fn name(self) -> &'static str {
        match self {
            Redelivery::Redrive => "redrive",
            Redelivery::Replay => "replay",
        }
    }

    /// Inverse of [`Redelivery::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "redrive" => Some(Redelivery::Redrive),
            "replay" => Some(Redelivery::Replay),
            _ => None,
        }
    }
}

/// What the store keeps of one partition, for the operator's view. Every figure is read from
/// counters and the partition's head, never by counting its backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: PartitionKey,
    /// Deliveries waiting to be sent (dead letters not included).
    pub pending: u64,
    /// Dead-lettered deliveries kept.
    pub dead_letters: u64,
    /// The next delivery to send, if any: its progress and its event's publish time (the
    /// oldest pending one).
    pub head: Option<HeadStatus>,
    /// Failed attempts since the last successful one.
    pub consecutive_failures: u64,
    /// When an attempt last succeeded (0: never, or not known).
    pub last_success_at: UnixMillis,
    /// When an attempt last failed (0: never, or not known).
    pub last_failure_at: UnixMillis,
}

/// The head of a partition: the delivery it sends next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadStatus {
    /// The event's sequence.
    pub sequence: u64,
    /// When the event was published.
    pub published_at: UnixMillis,
    /// Progress so far.
    pub state: DeliveryState,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Which delivered events of a partition to send again: those with a sequence in
/// `[from_sequence, to_sequence]` published within `[from_time, to_time]` (both inclusive),
/// at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRange {
    /// Smallest sequence.
    pub from_sequence: u64,
    /// Largest sequence.
    pub to_sequence: u64,
    /// Earliest publish time.
    pub from_time: UnixMillis,
    /// Latest publish time.
    pub to_time: UnixMillis,
    /// Most events queued by one call.
    pub limit: usize,
    /// The subscription's filter: events it does not match are not the partition's, and are
    /// not queued (nor taken as a replayed event's previous one).
    pub filter: Option<String>,
}

impl ReplayRange {
    /// The compiled filter, if any.
    pub fn compiled_filter(
        &self,
    ) -> Result<Option<crate::filter::Filter>, crate::store::StoreError> {
        self.filter
            .as_deref()
            .map(crate::filter::Filter::compile)
            .transpose()
            .map_err(|error| {
                crate::store::StoreError::Internal(format!(
                    "stored filter does not compile: {error}"
                ))
            })
    }
}

/// What a replay queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Events queued again, marked as replays.
    pub count: u64,
    /// Events of the range left alone because they are still pending (they are delivered
    /// in their turn) or dead-lettered (redrive them instead).
    pub skipped: u64,
    /// Where a next call should start (`from_sequence`) if the range held more than `limit`.
    pub next_sequence: Option<u64>,
}

/// The result of one failed attempt, as the worker records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Try again at the given time.
    RetryAt(UnixMillis),
    /// Attempts exhausted: park the event and go on with the partition.
    DeadLetter,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The entries.
    pub items: Vec<T>,
    /// Opaque cursor for the next page; `None` on the last page.
    pub next_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_prefix_and_all() {
        assert!(pattern_matches("user:new", "user:new"));
        assert!(!pattern_matches("user:new", "user:newer"));
        assert!(pattern_matches("user:*", "user:online"));
        assert!(!pattern_matches("user:*", "fin:purchase"));
        assert!(pattern_matches("*", "fin:purchase"));
    }

    #[test]
    fn partition_keys_round_trip() {
        let key = PartitionKey::new("fin:purchase", "sub_1");
        assert_eq!(key.encode(), "fin:purchase#sub_1");
        assert_eq!(PartitionKey::decode(&key.encode()), Some(key));
    }
}
