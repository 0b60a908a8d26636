//! Byte encodings of the embedded store's values and of page tokens.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::model::{DeliveryState, Event, Page, PendingDelivery, Subscription, UnixMillis};
use crate::store::StoreError;

/// Longest `last_error` kept per delivery, in bytes.
const MAX_ERROR_LEN: usize = 512;

/// Per-partition bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionRecord {
    /// Sequence of the newest delivery enqueued (0 if none): the next one's previous sequence.
    pub last_enqueued: u64,
    /// Every delivery with a sequence at or below this is completed or dead-lettered.
    pub dead_through: u64,
    /// Pending deliveries, dead-lettered included.
    pub pending: u64,
}

impl PartitionRecord {
    /// Fixed 24-byte little-endian encoding.
    pub fn encode(&self) -> [u8; 24] {
        let mut bytes = [0u8; 24];
        bytes[0..8].copy_from_slice(&self.last_enqueued.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dead_through.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.pending.to_le_bytes());
        bytes
    }

    /// Inverse of [`PartitionRecord::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() != 24 {
            return Err(StoreError::Internal(format!(
                "partition record of {} bytes",
                bytes.len()
            )));
        }
        let word = |index: usize| {
            let mut buffer = [0u8; 8];
            buffer.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
            u64::from_le_bytes(buffer)
        };
        Ok(PartitionRecord {
            last_enqueued: word(0),
            dead_through: word(1),
            pending: word(2),
        })
    }
}

/// A pending delivery's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
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
}

impl DeliveryRecord {
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
    id: String,
    content_type: String,
    attributes: BTreeMap<String, String>,
    published_at: UnixMillis,
}

/// Encodes an event as `u32 header length | JSON header | payload bytes`.
pub fn encode_event(event: &Event) -> Vec<u8> {
    let header = EventHeader {
        id: event.id.clone(),
        content_type: event.content_type.clone(),
        attributes: event.attributes.clone(),
        published_at: event.published_at,
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
    Ok(Event {
        id: header.id,
        topic: topic.to_string(),
        sequence,
        payload: bytes[header_end..].to_vec(),
        content_type: header.content_type,
        attributes: header.attributes,
        published_at: header.published_at,
    })
}

/// What an idempotency key remembers of the original publish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdempotencyRecord {
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

/// Serializes a record as JSON.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

/// Parses a JSON record, mapping failure to `Internal`.
pub fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt(format!("{what}: {error}")))
}

/// Cuts `items`, read with one more than `page_size` to learn whether another page follows,
/// to a page whose token names its last item.
fn page<T>(mut items: Vec<T>, page_size: usize, token_of: impl Fn(&T) -> String) -> Page<T> {
    let more = items.len() > page_size;
    items.truncate(page_size);
    let next_token = items.last().filter(|_| more).map(token_of);
    Page { items, next_token }
}

/// A ListSubscriptions page from up to `page_size + 1` subscriptions in id order.
pub fn subscription_page(items: Vec<Subscription>, page_size: usize) -> Page<Subscription> {
    page(items, page_size, |last| encode_subscription_token(&last.id))
}

/// A ListPending page from up to `page_size + 1` deliveries in (topic, sequence) order.
pub fn pending_page(items: Vec<PendingDelivery>, page_size: usize) -> Page<PendingDelivery> {
    page(items, page_size, |last| {
        encode_pending_token(&last.partition.topic, last.event.sequence)
    })
}

/// Encodes a ListPending cursor: the last (topic, sequence) returned.
pub fn encode_pending_token(topic: &str, sequence: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{topic}#{sequence}"))
}

/// Inverse of [`encode_pending_token`].
pub fn decode_pending_token(token: &str) -> Result<(String, u64), StoreError> {
    let invalid = || StoreError::InvalidArgument("not a token this server issued".into());
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let (topic, sequence) = text.split_once('#').ok_or_else(invalid)?;
    let sequence = sequence.parse().map_err(|_| invalid())?;
    Ok((topic.to_string(), sequence))
}

/// Encodes a ListSubscriptions cursor: the last id returned.
pub fn encode_subscription_token(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id)
}

/// Inverse of [`encode_subscription_token`].
pub fn decode_subscription_token(token: &str) -> Result<String, StoreError> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| StoreError::InvalidArgument("not a token this server issued".into()))
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
        };
        assert_eq!(PartitionRecord::decode(&record.encode()).unwrap(), record);
        assert!(PartitionRecord::decode(&[1, 2]).is_err());
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
        };
        assert_eq!(decode_event("a", 9, &encode_event(&event)).unwrap(), event);
        assert!(decode_event("a", 9, &[9, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = encode_pending_token("user:new", 42);
        assert_eq!(
            decode_pending_token(&token).unwrap(),
            ("user:new".into(), 42)
        );
        assert!(decode_pending_token("!!!").is_err());
        assert!(decode_pending_token(&URL_SAFE_NO_PAD.encode("no-sequence")).is_err());
        assert_eq!(
            decode_subscription_token(&encode_subscription_token("sub_1")).unwrap(),
            "sub_1"
        );
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let mut record = DeliveryRecord {
            attempts: 0,
            next_attempt_at: 0,
            dead_lettered: false,
            previous_sequence: 0,
            last_error: None,
        };
        record.set_error(&"é".repeat(600));
        let error = record.last_error.unwrap();
        assert!(error.len() <= MAX_ERROR_LEN);
        assert!(error.chars().all(|character| character == 'é'));
    }
}
