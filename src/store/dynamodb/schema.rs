//! The single-table layout: key builders and item encodings.
//!
//! Every item has a string partition key `pk` and a string sort key `sk`. Sequences in sort keys
//! are zero-padded to 20 digits so that string order is numeric order. Topics are lowercase and
//! contain no `#`, so the upper-case prefixes below never collide with a delivery's
//! `{topic}#{subscription}` key.
//!
//! | item | pk | sk |
//! | --- | --- | --- |
//! | subscription | `SUBSCRIPTION` | subscription id |
//! | subscription-set version | `META` | `SUBSCRIPTIONS` |
//! | subscription being deleted (tombstone) | `UNSUBSCRIBING` | subscription id |
//! | topic (sequence, open fan-outs) | `TOPIC#{topic}` | `TOPIC` |
//! | topic directory entry | `TOPICS` | topic |
//! | event | `EVENT#{topic}` | sequence |
//! | delivery | `{topic}#{subscription}` | sequence |
//! | dead letter | `DEAD#{topic}#{subscription}` | sequence |
//! | idempotency key | `IDEMPOTENCY#{topic}` | key |
//! | partition lease | `LEASES#{shard}` (00..15) | `{topic}#{subscription}` |
//! | partition counters (dead letters, failures, last success) | `STATS#{topic}#{subscription}` | `STATS` |

use std::collections::HashMap;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::model::{DeliveryState, Event, PartitionKey, PendingDelivery, Redelivery};
use crate::store::StoreError;
use crate::trace::TraceContext;

/// Partition key attribute.
pub const PK: &str = "pk";
/// Sort key attribute.
pub const SK: &str = "sk";
/// The TTL attribute (Unix seconds); only idempotency keys carry it.
pub const TTL: &str = "expires_at_ttl";

/// An item as the SDK represents it.
pub type Item = HashMap<String, AttributeValue>;

/// Pads a sequence for use in a sort key.
pub fn sequence_key(sequence: u64) -> String {
    format!("{sequence:020}")
}

/// Key of a subscription item.
pub fn subscription_key(id: &str) -> Item {
    key("SUBSCRIPTION", id)
}

/// Partition of the tombstones of subscriptions being deleted.
pub const UNSUBSCRIBING_PK: &str = "UNSUBSCRIBING";

/// Key of a subscription's deletion tombstone.
pub fn tombstone_key(id: &str) -> Item {
    key(UNSUBSCRIBING_PK, id)
}

/// Key of the subscription-set version item.
pub fn meta_key() -> Item {
    key("META", "SUBSCRIPTIONS")
}

/// Key of a topic item.
pub fn topic_key(topic: &str) -> Item {
    key(&format!("TOPIC#{topic}"), "TOPIC")
}

/// Partition of the topic directory.
pub const TOPICS_PK: &str = "TOPICS";

/// Partition of the subscriptions.
pub const SUBSCRIPTIONS_PK: &str = "SUBSCRIPTION";

/// Partition key of a topic's events.
pub fn event_pk(topic: &str) -> String {
    format!("EVENT#{topic}")
}

/// Key of an event item.
pub fn event_key(topic: &str, sequence: u64) -> Item {
    key(&event_pk(topic), &sequence_key(sequence))
}

/// Partition key of a partition's dead letters.
pub fn dead_pk(partition: &PartitionKey) -> String {
    format!("DEAD#{}", partition.encode())
}

/// Key of a delivery item.
pub fn delivery_key(partition: &PartitionKey, sequence: u64) -> Item {
    key(&partition.encode(), &sequence_key(sequence))
}

/// Key of a dead-letter item.
pub fn dead_key(partition: &PartitionKey, sequence: u64) -> Item {
    key(&dead_pk(partition), &sequence_key(sequence))
}

/// Key of a partition's counters item.
pub fn stats_key(partition: &PartitionKey) -> Item {
    key(&format!("STATS#{}", partition.encode()), "STATS")
}

/// Key of an idempotency item.
pub fn idempotency_key(topic: &str, idempotency_key: &str) -> Item {
    key(&format!("IDEMPOTENCY#{topic}"), idempotency_key)
}

/// Lease items are spread over this many partition keys, so that the rescan can list them
/// with a few Queries without making one key hot.
pub const LEASE_SHARDS: u32 = 16;

/// Partition key of one lease shard.
pub fn lease_shard_pk(shard: u32) -> String {
    format!("LEASES#{shard:02}")
}

/// Key of a partition's lease item: in the shard its key hashes to (FNV-1a, stable across
/// instances and versions), sorted by partition key.
pub fn lease_key(partition: &PartitionKey) -> Item {
    let encoded = partition.encode();
    let hash = encoded
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    key(
        &lease_shard_pk((hash % u64::from(LEASE_SHARDS)) as u32),
        &encoded,
    )
}

/// A key map with `pk` and `sk`.
pub fn key(pk: &str, sk: &str) -> Item {
    HashMap::from([
        (PK.to_string(), AttributeValue::S(pk.to_string())),
        (SK.to_string(), AttributeValue::S(sk.to_string())),
    ])
}

/// A string attribute.
pub fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

/// A number attribute.
/// The attribute of a delivery item naming the subscription-set version it was planned with.
pub const SET_VERSION: &str = "set_version";

pub fn n(value: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// Reads a string attribute.
pub fn get_s<'a>(item: &'a Item, name: &str) -> Result<&'a str, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value),
        _ => Err(corrupt(name)),
    }
}

/// Reads a number attribute, 0 if absent.
pub fn get_n(item: &Item, name: &str) -> Result<u64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value.parse().map_err(|_| corrupt(name)),
        None => Ok(0),
        _ => Err(corrupt(name)),
    }
}

/// Reads a counter that `ADD` moves both ways, 0 if absent; a count below zero (a decrement
/// of something counted before the counter existed) reads as 0.
pub fn get_count(item: &Item, name: &str) -> Result<u64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value
            .parse::<i64>()
            .map(|count| count.max(0) as u64)
            .map_err(|_| corrupt(name)),
        None => Ok(0),
        _ => Err(corrupt(name)),
    }
}

/// Reads a sequence from a sort key.
pub fn get_sequence(item: &Item) -> Result<u64, StoreError> {
    get_s(item, SK)?.parse().map_err(|_| corrupt(SK))
}

fn corrupt(name: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "DynamoDB item attribute `{name}` missing or malformed"
    ))
}

/// What finishing an open fan-out needs besides the event item: the subscription-set version
/// the fan-out was planned with (its subscribers are that set's matching subscriptions, less
/// those deleted since) and the topic's state before the event (their previous sequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutRecord {
    /// Subscription-set version of the fan-out.
    pub version: u64,
    /// The topic's last sequence before the event.
    pub previous_sequence: u64,
    /// The subscription-set version of that previous event.
    pub previous_version: u64,
}

/// The event item for `event`, the topic's `ordinal`-th, with `pending` deliveries
/// referencing it; an event whose fan-out does not fit its first transaction carries its
/// [`FanoutRecord`].
pub fn event_item(
    event: &Event,
    ordinal: u64,
    pending: usize,
    fanout: Option<FanoutRecord>,
) -> Item {
    let mut item = event_key(&event.topic, event.sequence);
    item.insert("ordinal".into(), n(ordinal));
    item.insert("id".into(), s(&event.id));
    item.insert("content_type".into(), s(&event.content_type));
    item.insert(
        "attributes".into(),
        s(serde_json::to_string(&event.attributes).expect("attributes serialize")),
    );
    item.insert("published_at".into(), n(event.published_at));
    item.insert(
        "payload".into(),
        AttributeValue::B(Blob::new(event.payload.clone())),
    );
    item.insert("pending".into(), n(pending));
    if let Some(trace) = &event.trace {
        item.insert("traceparent".into(), s(&trace.traceparent));
        if let Some(state) = &trace.tracestate {
            item.insert("tracestate".into(), s(state));
        }
    }
    if let Some(fanout) = fanout {
        item.insert("fanout_version".into(), n(fanout.version));
        item.insert("fanout_previous_seq".into(), n(fanout.previous_sequence));
        item.insert("fanout_previous_version".into(), n(fanout.previous_version));
    }
    item
}

/// The fan-out record of an event item, if it has one.
pub fn fanout_record(item: &Item) -> Result<Option<FanoutRecord>, StoreError> {
    if !item.contains_key("fanout_version") {
        return Ok(None);
    }
    Ok(Some(FanoutRecord {
        version: get_n(item, "fanout_version")?,
        previous_sequence: get_n(item, "fanout_previous_seq")?,
        previous_version: get_n(item, "fanout_previous_version")?,
    }))
}

/// Decodes an event item.
pub fn event_from_item(topic: &str, item: &Item) -> Result<Event, StoreError> {
    let payload = match item.get("payload") {
        Some(AttributeValue::B(blob)) => blob.as_ref().to_vec(),
        _ => return Err(corrupt("payload")),
    };
    Ok(Event {
        id: get_s(item, "id")?.to_string(),
        topic: topic.to_string(),
        sequence: get_sequence(item)?,
        payload,
        content_type: get_s(item, "content_type")?.to_string(),
        attributes: serde_json::from_str(get_s(item, "attributes")?)
            .map_err(|_| corrupt("attributes"))?,
        published_at: get_n(item, "published_at")?,
        trace: match item.get("traceparent") {
            Some(AttributeValue::S(traceparent)) => Some(TraceContext {
                traceparent: traceparent.clone(),
                tracestate: match item.get("tracestate") {
                    Some(AttributeValue::S(state)) => Some(state.clone()),
                    _ => None,
                },
            }),
            _ => None,
        },
    })
}

/// A new delivery item of the topic's `ordinal`-th event (0: unknown, not stored).
///
/// `set_version` is the subscription-set version the delivery was planned with (0 if unknown):
/// a topic removal removes the deliveries planned before it by this number, which the table
/// decides, not by a clock.
pub fn delivery_item(
    partition: &PartitionKey,
    sequence: u64,
    previous: u64,
    due: u64,
    ordinal: u64,
    set_version: u64,
) -> Item {
    let mut item = delivery_key(partition, sequence);
    if ordinal > 0 {
        item.insert("ordinal".into(), n(ordinal));
    }
    if set_version > 0 {
        item.insert(SET_VERSION.into(), n(set_version));
    }
    item.insert("attempts".into(), n(0));
    item.insert("next_attempt_at".into(), n(due));
    item.insert("previous".into(), n(previous));
    item
}

/// The progress stored in a delivery or dead-letter item.
pub struct DeliveryFields {
    /// Sequence (from the sort key).
    pub sequence: u64,
    /// State.
    pub state: DeliveryState,
    /// Previous sequence in the partition.
    pub previous: u64,
    /// Last failure.
    pub last_error: Option<String>,
    /// Why it is sent again out of order, if it is.
    pub redelivery: Option<Redelivery>,
}

/// Decodes a delivery or dead-letter item.
pub fn delivery_fields(item: &Item, dead_lettered: bool) -> Result<DeliveryFields, StoreError> {
    Ok(DeliveryFields {
        sequence: get_sequence(item)?,
        state: DeliveryState {
            attempts: get_n(item, "attempts")? as u32,
            next_attempt_at: get_n(item, "next_attempt_at")?,
            dead_lettered,
        },
        previous: get_n(item, "previous")?,
        last_error: item
            .get("last_error")
            .and_then(|value| value.as_s().ok())
            .cloned(),
        redelivery: item
            .get("redelivery")
            .and_then(|value| value.as_s().ok())
            .and_then(|name| Redelivery::from_name(name)),
    })
}

/// Joins delivery fields with their event.
pub fn pending_delivery(
    partition: &PartitionKey,
    fields: DeliveryFields,
    event: Event,
) -> PendingDelivery {
    PendingDelivery {
        partition: partition.clone(),
        event,
        state: fields.state,
        last_error: fields.last_error,
        previous_sequence: fields.previous,
        redelivery: fields.redelivery,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_keys_sort_numerically() {
        assert!(sequence_key(9) < sequence_key(10));
        assert!(sequence_key(1_795_850_993_106_281) < sequence_key(u64::MAX));
        assert_eq!(sequence_key(u64::MAX).len(), 20);
    }

    #[test]
    fn lease_keys_are_stable_and_spread() {
        let key = lease_key(&PartitionKey::new("fin:purchase", "sub_1"));
        assert_eq!(get_s(&key, SK).unwrap(), "fin:purchase#sub_1");
        // Pinned: a different hash would orphan the leases of instances still running.
        assert_eq!(get_s(&key, PK).unwrap(), "LEASES#10");
        let shards: std::collections::HashSet<String> = (0..200)
            .map(|index| {
                let key = lease_key(&PartitionKey::new("t", format!("sub_{index}")));
                get_s(&key, PK).unwrap().to_string()
            })
            .collect();
        assert_eq!(shards.len(), LEASE_SHARDS as usize);
        assert!(shards.iter().all(|shard| shard.starts_with("LEASES#")));
    }

    #[test]
    fn event_items_round_trip() {
        let event = Event {
            id: "evt_1".into(),
            topic: "user:new".into(),
            sequence: 42,
            payload: vec![0, 1, 2],
            content_type: "application/json".into(),
            attributes: [("a".to_string(), "b".to_string())].into(),
            published_at: 7,
            trace: None,
        };
        let item = event_item(&event, 1, 3, None);
        assert_eq!(event_from_item("user:new", &item).unwrap(), event);
        assert_eq!(get_n(&item, "pending").unwrap(), 3);
        assert_eq!(fanout_record(&item).unwrap(), None);
        let record = FanoutRecord {
            version: 5,
            previous_sequence: 41,
            previous_version: 4,
        };
        let item = event_item(&event, 1, 3, Some(record));
        assert_eq!(event_from_item("user:new", &item).unwrap(), event);
        assert_eq!(fanout_record(&item).unwrap(), Some(record));
    }
}
