//! Byte encodings of stored records.
//!
//! Every record kind is an explicit stored struct with a version tag, never the serde form of
//! a domain type, so that renaming a field of the API's types cannot silently change what is
//! on disk. JSON records carry `"v"`; a record without it was written before versions existed
//! (version 0) and is still read. The partition record is binary: a version byte and seven
//! little-endian words (version 1 had three; 24 bytes without the version byte is version 0).
//! The delivery record, written for every delivery, is binary from version 2 (JSON before).
//! The tests at the end decode records in every earlier format.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{
    Control, DeliveryState, Event, OnExhausted, Pacing, PreviousSecret, RetryPolicy, Subscription,
    SubscriptionState, UnixMillis,
};
use crate::store::StoreError;
use crate::trace::TraceContext;

/// Longest `last_error` kept per delivery, in bytes.
const MAX_ERROR_LEN: usize = 512;

/// Version written into every JSON record (`"v"`).
const JSON_RECORD_VERSION: u32 = 1;
/// Version byte of binary partition records.
const PARTITION_RECORD_VERSION: u8 = 2;
/// Version byte of binary delivery records (versions 0 and 1 were JSON, which starts with `{`).
const DELIVERY_RECORD_VERSION: u8 = 2;
/// Bytes of a binary delivery record without its strings: the version byte, the flags, the
/// attempts and two words.
const DELIVERY_RECORD_FIXED_LEN: usize = 1 + 1 + 4 + 8 + 8;
/// Delivery record flags.
const DEAD_LETTERED: u8 = 1;
const HAS_ERROR: u8 = 2;
const HAS_REDELIVERY: u8 = 4;

/// The version of a JSON record: its `"v"`, or 0 if it has none.
#[derive(Deserialize)]
struct VersionTag {
    #[serde(default)]
    v: u32,
}

/// Refuses a record written by a newer Herald than this one.
fn check_version(v: u32, what: &str) -> Result<(), StoreError> {
    if v > JSON_RECORD_VERSION {
        return Err(StoreError::Corrupt(format!(
            "{what} has format version {v}, newer than this Herald reads ({JSON_RECORD_VERSION}): \
             run the newer version"
        )));
    }
    Ok(())
}

/// Per-partition bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionRecord {
    /// Sequence of the newest delivery enqueued (0 if none): the next one's previous sequence.
    pub last_enqueued: u64,
    /// Every delivery with a sequence at or below this is completed or dead-lettered.
    pub dead_through: u64,
    /// Pending deliveries, dead-lettered included.
    pub pending: u64,
    /// Dead-lettered deliveries kept (version 2; 0 when read from older records).
    pub dead_letters: u64,
    /// Failed attempts since the last successful one (version 2).
    pub consecutive_failures: u64,
    /// When an attempt last succeeded, 0 if never (version 2).
    pub last_success_at: UnixMillis,
    /// When an attempt last failed, 0 if never (version 2).
    pub last_failure_at: UnixMillis,
}

/// Length of a version-2 partition record: the version byte and seven words.
const PARTITION_RECORD_LEN: usize = 1 + 7 * 8;

impl PartitionRecord {
    /// Version byte, then seven little-endian words.
    pub fn encode(&self) -> [u8; PARTITION_RECORD_LEN] {
        let mut bytes = [0u8; PARTITION_RECORD_LEN];
        bytes[0] = PARTITION_RECORD_VERSION;
        let words = [
            self.last_enqueued,
            self.dead_through,
            self.pending,
            self.dead_letters,
            self.consecutive_failures,
            self.last_success_at,
            self.last_failure_at,
        ];
        for (index, word) in words.iter().enumerate() {
            bytes[1 + index * 8..9 + index * 8].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    /// Inverse of [`PartitionRecord::encode`]; also reads version 1 (a version byte and
    /// three words) and version 0 (the three words alone).
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let words = match bytes {
            [PARTITION_RECORD_VERSION, words @ ..] if words.len() == 56 => words,
            [1, words @ ..] if words.len() == 24 => words,
            words if words.len() == 24 => words,
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "partition record of {} bytes, version {:?}",
                    bytes.len(),
                    bytes.first()
                )));
            }
        };
        let word = |index: usize| {
            let Some(slice) = words.get(index * 8..index * 8 + 8) else {
                return 0;
            };
            let mut buffer = [0u8; 8];
            buffer.copy_from_slice(slice);
            u64::from_le_bytes(buffer)
        };
        Ok(PartitionRecord {
            last_enqueued: word(0),
            dead_through: word(1),
            pending: word(2),
            dead_letters: word(3),
            consecutive_failures: word(4),
            last_success_at: word(5),
            last_failure_at: word(6),
        })
    }
}

/// A pending delivery's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Format version: 0 and 1 were JSON (0 before versions existed), 2 is binary; a record
    /// read is written back in the current one.
    #[serde(default)]
    pub v: u32,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next_attempt_at: UnixMillis,
    /// True once dead-lettered.
    pub dead_lettered: bool,
    /// The sequence of the event before this one in the partition (0 for the first).
    pub previous_sequence: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// `redrive` or `replay` for an event sent again out of order (added in version 1
    /// without a version change: absent means a first delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivery: Option<String>,
}

impl DeliveryRecord {
    /// A new record in the current format.
    pub fn new(next_attempt_at: UnixMillis, previous_sequence: u64) -> Self {
        DeliveryRecord {
            v: u32::from(DELIVERY_RECORD_VERSION),
            attempts: 0,
            next_attempt_at,
            dead_lettered: false,
            previous_sequence,
            last_error: None,
            redelivery: None,
        }
    }

    /// Binary, in the current format (records are upgraded as they are read or made): the
    /// version byte, a flags byte (dead-lettered, has an error, has a redelivery), the attempts
    /// (4 bytes), the next attempt time and the previous sequence (8 bytes each, all little
    /// endian), then the error and the redelivery name when present, each as a 4-byte length
    /// and UTF-8. A third of the JSON's size, and no parsing: one is written per delivery of
    /// every event and read back at least twice.
    pub fn encode(&self) -> Vec<u8> {
        let error = self.last_error.as_deref();
        let redelivery = self.redelivery.as_deref();
        let strings =
            error.map_or(0, |text| 4 + text.len()) + redelivery.map_or(0, |name| 4 + name.len());
        let mut bytes = Vec::with_capacity(DELIVERY_RECORD_FIXED_LEN + strings);
        bytes.push(DELIVERY_RECORD_VERSION);
        let mut flags = 0;
        if self.dead_lettered {
            flags |= DEAD_LETTERED;
        }
        if error.is_some() {
            flags |= HAS_ERROR;
        }
        if redelivery.is_some() {
            flags |= HAS_REDELIVERY;
        }
        bytes.push(flags);
        bytes.extend_from_slice(&self.attempts.to_le_bytes());
        bytes.extend_from_slice(&self.next_attempt_at.to_le_bytes());
        bytes.extend_from_slice(&self.previous_sequence.to_le_bytes());
        for text in [error, redelivery].into_iter().flatten() {
            bytes.extend_from_slice(&(text.len() as u32).to_le_bytes());
            bytes.extend_from_slice(text.as_bytes());
        }
        bytes
    }

    /// Inverse of [`DeliveryRecord::encode`], for every version so far (JSON for 0 and 1).
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut record = match bytes.first() {
            Some(&DELIVERY_RECORD_VERSION) => Self::decode_binary(bytes)?,
            // Versions 0 and 1 were JSON, never binary: such a first byte is damage.
            Some(&version) if version < DELIVERY_RECORD_VERSION => {
                return Err(StoreError::Corrupt(format!(
                    "delivery record of {} bytes starts with byte {version}, which no version \
                     of Herald writes: the record is damaged",
                    bytes.len()
                )));
            }
            Some(&version) if version < b' ' && !version.is_ascii_whitespace() => {
                return Err(StoreError::Corrupt(format!(
                    "delivery record has format version {version}, newer than this Herald \
                     reads ({DELIVERY_RECORD_VERSION}): run the newer version"
                )));
            }
            _ => {
                let record: DeliveryRecord = from_json(bytes, "delivery record")?;
                // Later versions are binary: a JSON record claiming one is damaged.
                if record.v > JSON_RECORD_VERSION {
                    return Err(StoreError::Corrupt(format!(
                        "delivery record in JSON claims format version {}, but only versions \
                         0 and {JSON_RECORD_VERSION} were JSON: the record is damaged",
                        record.v
                    )));
                }
                record
            }
        };
        // Upgraded in memory: written back in the current format.
        record.v = u32::from(DELIVERY_RECORD_VERSION);
        Ok(record)
    }

    fn decode_binary(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("delivery record of {} bytes", bytes.len()));
        let mut rest = bytes.get(1..).ok_or_else(corrupt)?;
        let mut take = |length: usize| -> Result<&[u8], StoreError> {
            let (taken, remaining) = rest.split_at_checked(length).ok_or_else(corrupt)?;
            rest = remaining;
            Ok(taken)
        };
        let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("eight bytes"));
        let flags = take(1)?[0];
        if flags & !(DEAD_LETTERED | HAS_ERROR | HAS_REDELIVERY) != 0 {
            return Err(corrupt());
        }
        let attempts = u32::from_le_bytes(take(4)?.try_into().expect("four bytes"));
        let next_attempt_at = word(take(8)?);
        let previous_sequence = word(take(8)?);
        let mut text = |present: bool| -> Result<Option<String>, StoreError> {
            if !present {
                return Ok(None);
            }
            let length = u32::from_le_bytes(take(4)?.try_into().expect("four bytes")) as usize;
            let text = std::str::from_utf8(take(length)?).map_err(|_| corrupt())?;
            Ok(Some(text.to_string()))
        };
        let last_error = text(flags & HAS_ERROR != 0)?;
        let redelivery = text(flags & HAS_REDELIVERY != 0)?;
        if !rest.is_empty() {
            return Err(corrupt());
        }
        Ok(DeliveryRecord {
            v: u32::from(DELIVERY_RECORD_VERSION),
            attempts,
            next_attempt_at,
            dead_lettered: flags & DEAD_LETTERED != 0,
            previous_sequence,
            last_error,
            redelivery,
        })
    }

    /// The public view of the progress.
    pub fn state(&self) -> DeliveryState {
        DeliveryState {
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
            dead_lettered: self.dead_lettered,
        }
    }

    /// Stores `error`, cut to a bounded length at a character boundary.
    pub fn set_error(&mut self, error: &str) {
        let mut end = error.len().min(MAX_ERROR_LEN);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        self.last_error = Some(error[..end].to_string());
    }
}

/// The event fields stored beside the payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EventHeader {
    #[serde(default)]
    v: u32,
    id: String,
    content_type: String,
    attributes: BTreeMap<String, String>,
    published_at: UnixMillis,
    /// Added in version 1 without a version change: absent means no trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tracestate: Option<String>,
}

/// Encodes an event as `u32 header length | JSON header | payload bytes`.
pub fn encode_event(event: &Event) -> Vec<u8> {
    let header = EventHeader {
        v: JSON_RECORD_VERSION,
        id: event.id.clone(),
        content_type: event.content_type.clone(),
        attributes: event.attributes.clone(),
        published_at: event.published_at,
        traceparent: event.trace.as_ref().map(|trace| trace.traceparent.clone()),
        tracestate: event
            .trace
            .as_ref()
            .and_then(|trace| trace.tracestate.clone()),
    };
    let header = serde_json::to_vec(&header).expect("event header serializes");
    let mut bytes = Vec::with_capacity(4 + header.len() + event.payload.len());
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&event.payload);
    bytes
}

/// Inverse of [`encode_event`]; `topic` and `sequence` come from the key.
pub fn decode_event(topic: &str, sequence: u64, bytes: &[u8]) -> Result<Event, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("event record {topic}/{sequence}"));
    let length_bytes: [u8; 4] = bytes.get(0..4).ok_or_else(corrupt)?.try_into().unwrap();
    let header_end = 4 + u32::from_le_bytes(length_bytes) as usize;
    let header: EventHeader = serde_json::from_slice(bytes.get(4..header_end).ok_or_else(corrupt)?)
        .map_err(|_| corrupt())?;
    check_version(header.v, "event record")?;
    Ok(Event {
        id: header.id,
        topic: topic.to_string(),
        sequence,
        payload: bytes[header_end..].to_vec(),
        content_type: header.content_type,
        attributes: header.attributes,
        published_at: header.published_at,
        trace: header.traceparent.map(|traceparent| TraceContext {
            traceparent,
            tracestate: header.tracestate,
        }),
    })
}

/// What an idempotency key remembers of the original publish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// Format version ([`IdempotencyRecord::current`] makes new ones).
    #[serde(default)]
    pub v: u32,
    /// Original event id.
    pub event_id: String,
    /// Original sequence.
    pub sequence: u64,
    /// Original acceptance time.
    pub published_at: UnixMillis,
    /// Original fan-out.
    pub subscription_count: u32,
    /// When the key may be forgotten.
    pub expires_at: UnixMillis,
}

impl IdempotencyRecord {
    /// A new record in the current format.
    pub fn current(
        event_id: String,
        sequence: u64,
        published_at: UnixMillis,
        subscription_count: u32,
        expires_at: UnixMillis,
    ) -> Self {
        IdempotencyRecord {
            v: JSON_RECORD_VERSION,
            event_id,
            sequence,
            published_at,
            subscription_count,
            expires_at,
        }
    }

    /// JSON, in the current format (records are upgraded as they are read or made).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialize")
    }

    /// Inverse of [`IdempotencyRecord::encode`], for every version so far.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut record: IdempotencyRecord = from_json(bytes, "idempotency record")?;
        check_version(record.v, "idempotency record")?;
        // Upgraded in memory: written back in the current format.
        record.v = JSON_RECORD_VERSION;
        Ok(record)
    }
}

/// A subscription as stored (version 1): durations in milliseconds, the exhaustion policy by
/// name.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSubscription {
    v: u32,
    id: String,
    endpoint: String,
    topics: Vec<String>,
    secret: String,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    max_attempts: u32,
    request_timeout_ms: u64,
    on_exhausted: String,
    created_at: UnixMillis,
    /// Added in version 1 without a version change: absent means active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    control: Option<StoredControl>,
    /// Added in version 1 without a version change: a replaced secret in its grace window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_secret_until: Option<UnixMillis>,
    /// Added in version 1 without a version change: 0 (absent) is no limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    max_requests_per_second: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    max_in_flight: u32,
    /// Added in version 1 without a version change: absent is no filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter: Option<String>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// The operator's controls as stored.
#[derive(Debug, Serialize, Deserialize)]
struct StoredControl {
    /// `active`, `paused` or `disabled`.
    state: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    since: UnixMillis,
    #[serde(default)]
    paused_topics: Vec<String>,
}

fn state_name(state: SubscriptionState) -> &'static str {
    match state {
        SubscriptionState::Active => "active",
        SubscriptionState::Paused => "paused",
        SubscriptionState::Disabled => "disabled",
    }
}

fn control_from(stored: Option<StoredControl>, what: &str) -> Result<Control, StoreError> {
    let Some(stored) = stored else {
        return Ok(Control::default());
    };
    let state = match stored.state.as_str() {
        "active" => SubscriptionState::Active,
        "paused" => SubscriptionState::Paused,
        "disabled" => SubscriptionState::Disabled,
        other => {
            return Err(StoreError::Corrupt(format!(
                "{what}: unknown subscription state `{other}`"
            )));
        }
    };
    Ok(Control {
        state,
        reason: stored.reason,
        since: stored.since,
        paused_topics: stored.paused_topics.into_iter().collect(),
    })
}

/// A subscription as stored before versions existed (version 0): the serde form of the domain
/// type of that time, frozen here.
#[derive(Debug, Deserialize)]
struct StoredSubscriptionV0 {
    id: String,
    endpoint: String,
    topics: Vec<String>,
    secret: String,
    retry_policy: RetryPolicyV0,
    on_exhausted: String,
    created_at: UnixMillis,
}

#[derive(Debug, Deserialize)]
struct RetryPolicyV0 {
    initial_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
    request_timeout: Duration,
}

fn on_exhausted_name(policy: OnExhausted) -> &'static str {
    match policy {
        OnExhausted::DeadLetter => "dead_letter",
        OnExhausted::Block => "block",
    }
}

fn on_exhausted_from(name: &str, what: &str) -> Result<OnExhausted, StoreError> {
    match name {
        "dead_letter" | "DeadLetter" => Ok(OnExhausted::DeadLetter),
        "block" | "Block" => Ok(OnExhausted::Block),
        other => Err(StoreError::Corrupt(format!(
            "{what}: unknown exhaustion policy `{other}`"
        ))),
    }
}

/// Encodes a subscription in the current format.
pub fn encode_subscription(subscription: &Subscription) -> Vec<u8> {
    let millis = |duration: Duration| duration.as_millis() as u64;
    let policy = &subscription.retry_policy;
    let stored = StoredSubscription {
        v: JSON_RECORD_VERSION,
        id: subscription.id.clone(),
        endpoint: subscription.endpoint.clone(),
        topics: subscription.topics.clone(),
        secret: subscription.secret.clone(),
        initial_backoff_ms: millis(policy.initial_backoff),
        max_backoff_ms: millis(policy.max_backoff),
        max_attempts: policy.max_attempts,
        request_timeout_ms: millis(policy.request_timeout),
        on_exhausted: on_exhausted_name(subscription.on_exhausted).to_string(),
        created_at: subscription.created_at,
        control: (subscription.control != Control::default()).then(|| StoredControl {
            state: state_name(subscription.control.state).to_string(),
            reason: subscription.control.reason.clone(),
            since: subscription.control.since,
            paused_topics: subscription.control.paused_topics.iter().cloned().collect(),
        }),
        previous_secret: subscription
            .previous_secret
            .as_ref()
            .map(|previous| previous.secret.clone()),
        previous_secret_until: subscription
            .previous_secret
            .as_ref()
            .map(|previous| previous.until),
        max_requests_per_second: subscription.pacing.max_requests_per_second,
        max_in_flight: subscription.pacing.max_in_flight,
        filter: subscription.filter.clone(),
    };
    serde_json::to_vec(&stored).expect("records serialize")
}

/// Inverse of [`encode_subscription`], for every version so far.
pub fn decode_subscription(bytes: &[u8], what: &str) -> Result<Subscription, StoreError> {
    let version: VersionTag = from_json(bytes, what)?;
    check_version(version.v, what)?;
    if version.v == 0 {
        let old: StoredSubscriptionV0 = from_json(bytes, what)?;
        return Ok(Subscription {
            id: old.id,
            endpoint: old.endpoint,
            topics: old.topics,
            secret: old.secret,
            retry_policy: RetryPolicy {
                initial_backoff: old.retry_policy.initial_backoff,
                max_backoff: old.retry_policy.max_backoff,
                max_attempts: old.retry_policy.max_attempts,
                request_timeout: old.retry_policy.request_timeout,
            },
            on_exhausted: on_exhausted_from(&old.on_exhausted, what)?,
            created_at: old.created_at,
            control: Control::default(),
            previous_secret: None,
            pacing: Pacing::default(),
            filter: None,
        });
    }
    let stored: StoredSubscription = from_json(bytes, what)?;
    Ok(Subscription {
        id: stored.id,
        endpoint: stored.endpoint,
        topics: stored.topics,
        secret: stored.secret,
        retry_policy: RetryPolicy {
            initial_backoff: Duration::from_millis(stored.initial_backoff_ms),
            max_backoff: Duration::from_millis(stored.max_backoff_ms),
            max_attempts: stored.max_attempts,
            request_timeout: Duration::from_millis(stored.request_timeout_ms),
        },
        on_exhausted: on_exhausted_from(&stored.on_exhausted, what)?,
        created_at: stored.created_at,
        control: control_from(stored.control, what)?,
        previous_secret: match (stored.previous_secret, stored.previous_secret_until) {
            (Some(secret), Some(until)) => Some(PreviousSecret { secret, until }),
            _ => None,
        },
        pacing: Pacing {
            max_requests_per_second: stored.max_requests_per_second,
            max_in_flight: stored.max_in_flight,
        },
        filter: stored.filter,
    })
}

/// A version tag of a subscription as stored: it changes with every change to it. Clients
/// send it back as a precondition (AIP-154 `etag`).
pub fn subscription_etag(subscription: &Subscription) -> String {
    use sha2::Digest;
    // Without the secrets (whoever sees the etag never sees them); a rotation still changes
    // it, through the previous secret's end time.
    let mut public = subscription.clone();
    public.secret.clear();
    if let Some(previous) = public.previous_secret.as_mut() {
        previous.secret.clear();
    }
    let digest = sha2::Sha256::digest(encode_subscription(&public));
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Parses a JSON record, mapping failure to `Corrupt`.
fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt(format!("{what}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_record_round_trips() {
        let record = PartitionRecord {
            last_enqueued: 7,
            dead_through: 3,
            pending: u64::MAX,
            dead_letters: 2,
            consecutive_failures: 5,
            last_success_at: 11,
            last_failure_at: 13,
        };
        assert_eq!(PartitionRecord::decode(&record.encode()).unwrap(), record);
        assert!(PartitionRecord::decode(&[1, 2]).is_err());
        let mut newer = record.encode();
        newer[0] = 3;
        assert!(PartitionRecord::decode(&newer).is_err());
        // Version 1: a version byte and the first three words.
        let mut version_1 = vec![1u8];
        for word in [9u64, 4, 2] {
            version_1.extend_from_slice(&word.to_le_bytes());
        }
        assert_eq!(
            PartitionRecord::decode(&version_1).unwrap(),
            PartitionRecord {
                last_enqueued: 9,
                dead_through: 4,
                pending: 2,
                ..PartitionRecord::default()
            }
        );
    }

    #[test]
    fn subscription_controls_round_trip_and_active_ones_are_not_written() {
        let mut subscription = decode_subscription(version_0::SUBSCRIPTION.as_bytes(), "sub")
            .expect("version 0 reads");
        let active = encode_subscription(&subscription);
        assert!(!String::from_utf8_lossy(&active).contains("control"));
        subscription.control = Control {
            state: SubscriptionState::Disabled,
            reason: "endpoint failing since 10:00".into(),
            since: 42,
            paused_topics: ["a".to_string()].into(),
        };
        let encoded = encode_subscription(&subscription);
        assert_eq!(decode_subscription(&encoded, "sub").unwrap(), subscription);
        let unknown = String::from_utf8(encoded)
            .unwrap()
            .replace("\"disabled\"", "\"sleeping\"");
        assert!(decode_subscription(unknown.as_bytes(), "sub").is_err());
    }

    #[test]
    fn event_round_trips_with_binary_payload() {
        let event = Event {
            id: "evt_1".into(),
            topic: "a".into(),
            sequence: 9,
            payload: vec![0, 255, 10, 13],
            content_type: "application/octet-stream".into(),
            attributes: BTreeMap::from([("k".into(), "v".into())]),
            published_at: 5,
            trace: None,
        };
        assert_eq!(decode_event("a", 9, &encode_event(&event)).unwrap(), event);
        assert!(decode_event("a", 9, &[9, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let mut record = DeliveryRecord::new(0, 0);
        record.set_error(&"é".repeat(600));
        let error = record.last_error.unwrap();
        assert!(error.len() <= MAX_ERROR_LEN);
        assert!(error.chars().all(|character| character == 'é'));
    }

    /// Records exactly as the first release wrote them (version 0, before version tags).
    mod version_0 {
        use super::*;

        pub const SUBSCRIPTION: &str = r#"{"id":"sub_1","endpoint":"http://127.0.0.1:9/hook","topics":["a","b*"],"secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw","retry_policy":{"initial_backoff":{"secs":1,"nanos":500000000},"max_backoff":{"secs":600,"nanos":0},"max_attempts":12,"request_timeout":{"secs":10,"nanos":0}},"on_exhausted":"Block","created_at":1764000000000}"#;
        pub const DELIVERY: &str = r#"{"attempts":3,"next_attempt_at":1764000000123,"dead_lettered":true,"previous_sequence":41,"last_error":"HTTP 500"}"#;
        pub const IDEMPOTENCY: &str = r#"{"event_id":"evt_1","sequence":42,"published_at":5,"subscription_count":3,"expires_at":99}"#;
        pub const EVENT_HEADER: &str = r#"{"id":"evt_1","content_type":"application/json","attributes":{"k":"v"},"published_at":5}"#;

        #[test]
        fn every_record_kind_reads() {
            let subscription = decode_subscription(SUBSCRIPTION.as_bytes(), "sub").unwrap();
            assert_eq!(subscription.id, "sub_1");
            assert_eq!(subscription.topics, ["a", "b*"]);
            assert_eq!(
                subscription.retry_policy.initial_backoff,
                Duration::from_millis(1500)
            );
            assert_eq!(subscription.retry_policy.max_attempts, 12);
            assert_eq!(subscription.on_exhausted, OnExhausted::Block);
            assert_eq!(subscription.created_at, 1764000000000);
            // Written again, it is the current format and reads back the same.
            let current = encode_subscription(&subscription);
            assert!(String::from_utf8_lossy(&current).starts_with(r#"{"v":1,"#));
            assert_eq!(decode_subscription(&current, "sub").unwrap(), subscription);

            let delivery = DeliveryRecord::decode(DELIVERY.as_bytes()).unwrap();
            assert_eq!(
                (
                    delivery.attempts,
                    delivery.dead_lettered,
                    delivery.previous_sequence
                ),
                (3, true, 41)
            );
            assert_eq!(delivery.last_error.as_deref(), Some("HTTP 500"));
            let again = DeliveryRecord::decode(&delivery.encode()).unwrap();
            assert_eq!(again.v, 2);
            assert_eq!(again, delivery);

            let key = IdempotencyRecord::decode(IDEMPOTENCY.as_bytes()).unwrap();
            assert_eq!(
                (key.sequence, key.subscription_count, key.expires_at),
                (42, 3, 99)
            );

            let mut event = (EVENT_HEADER.len() as u32).to_le_bytes().to_vec();
            event.extend_from_slice(EVENT_HEADER.as_bytes());
            event.extend_from_slice(b"payload");
            let event = decode_event("t", 7, &event).unwrap();
            assert_eq!(
                (event.id.as_str(), event.payload.as_slice()),
                ("evt_1", &b"payload"[..])
            );

            let mut partition = Vec::new();
            for word in [9u64, 4, 2] {
                partition.extend_from_slice(&word.to_le_bytes());
            }
            assert_eq!(
                PartitionRecord::decode(&partition).unwrap(),
                PartitionRecord {
                    last_enqueued: 9,
                    dead_through: 4,
                    pending: 2,
                    ..PartitionRecord::default()
                }
            );
        }
    }

    /// A delivery record as version 1 (JSON) wrote it, until binary records replaced it.
    #[test]
    fn version_1_delivery_records_read() {
        let json = br#"{"v":1,"attempts":2,"next_attempt_at":17,"dead_lettered":false,"previous_sequence":5,"last_error":"HTTP 503","redelivery":"replay"}"#;
        let record = DeliveryRecord::decode(json).unwrap();
        assert_eq!(
            (
                record.attempts,
                record.next_attempt_at,
                record.previous_sequence
            ),
            (2, 17, 5)
        );
        assert_eq!(record.last_error.as_deref(), Some("HTTP 503"));
        assert_eq!(record.redelivery.as_deref(), Some("replay"));
        assert_eq!(DeliveryRecord::decode(&record.encode()).unwrap(), record);
    }

    #[test]
    fn delivery_records_are_binary_and_round_trip() {
        let mut record = DeliveryRecord::new(1_764_000_000_123, 41);
        let plain = record.encode();
        assert_eq!(plain.len(), DELIVERY_RECORD_FIXED_LEN);
        assert_eq!(DeliveryRecord::decode(&plain).unwrap(), record);

        record.attempts = 7;
        record.dead_lettered = true;
        record.set_error("HTTP 500: é");
        record.redelivery = Some("redrive".into());
        let full = record.encode();
        assert_eq!(DeliveryRecord::decode(&full).unwrap(), record);
        // An empty error is kept apart from none.
        record.last_error = Some(String::new());
        assert_eq!(DeliveryRecord::decode(&record.encode()).unwrap(), record);

        // Cut short, with bytes left over, or with an unknown flag: damaged, not misread.
        for damaged in [
            &full[..full.len() - 1],
            &[full.as_slice(), &[0]].concat(),
            &[&[DELIVERY_RECORD_VERSION, 8][..], &full[2..]].concat(),
        ] {
            assert!(
                matches!(DeliveryRecord::decode(damaged), Err(StoreError::Corrupt(_))),
                "{damaged:?}"
            );
        }
    }

    #[test]
    fn records_from_a_newer_version_are_refused_with_what_to_do() {
        let newer = br#"{"v":2,"id":"sub_1"}"#;
        let error = decode_subscription(newer, "subscription sub_1").unwrap_err();
        assert!(
            matches!(&error, StoreError::Corrupt(text) if text.contains("newer")),
            "{error}"
        );
        let mut binary = DeliveryRecord::new(0, 0).encode();
        binary[0] = DELIVERY_RECORD_VERSION + 1;
        let error = DeliveryRecord::decode(&binary).unwrap_err();
        assert!(
            matches!(&error, StoreError::Corrupt(text) if text.contains("newer")),
            "{error}"
        );
    }

    #[test]
    fn a_damaged_delivery_record_is_called_damaged_not_newer() {
        let mut binary = DeliveryRecord::new(0, 0).encode();
        for first in [0, 1] {
            binary[0] = first;
            let error = DeliveryRecord::decode(&binary).unwrap_err();
            assert!(
                matches!(&error, StoreError::Corrupt(text) if text.contains("damaged")),
                "{error}"
            );
        }
        let json = br#"{"v":9,"attempts":0,"next_attempt_at":0,"dead_lettered":false,"previous_sequence":0,"last_error":null}"#;
        let error = DeliveryRecord::decode(json).unwrap_err();
        assert!(
            matches!(&error, StoreError::Corrupt(text) if text.contains("damaged") && !text.contains("newer")),
            "{error}"
        );
    }
}
