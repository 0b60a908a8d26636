//! The write side of the embedded store: what each command does to the tables, inside the
//! writer's transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::quarantine::{Damaged, DeliveryTable};
use super::schema::{
    DEAD_LETTERS, DELIVERIES, EVENT_EXPIRY, EVENT_REFERENCES, EVENTS, IDEMPOTENCY,
    IDEMPOTENCY_EXPIRY, PARTITIONS, PENDING_PARTITIONS, SUBSCRIPTIONS, TOPICS,
};
use super::unavailable;
use super::writer::Failure;
use crate::model::{
    Event, FailureOutcome, NewEvent, PartitionKey, Published, Redelivery, ReplayRange, Replayed,
    Subscription, now_micros, now_millis,
};
use crate::store::delivery_log::{SKIPPED, head_moved, replay_sequences};
use crate::store::records::{
    DeliveryRecord, IdempotencyRecord, PartitionRecord, decode_event, decode_subscription,
    encode_event, encode_subscription,
};
use crate::store::subscriptions::unchanged_identity;
use crate::store::topic_index::TopicIndex;
use crate::store::{StoreError, SubscriptionLimits, SubscriptionUpdate, Updated};

/// Most expired idempotency keys removed per sweep.
const SWEEP_LIMIT: usize = 1000;
/// Most expired events removed per sweep (sweeps run every second): retention keeps up with
/// 10,000 events a second.
const EVENT_SWEEP_LIMIT: usize = 10_000;

/// A dead letter found: its sequence, its record, and whether it is kept in the dead-letter
/// table (else it is a flagged delivery from before the table existed).
type DeadLetter = (u64, DeliveryRecord, bool);

/// Result of one command: the outer error aborts the batch, the inner one is the command's own.
pub(super) type Applied<T> = Result<Result<T, StoreError>, StoreError>;

/// The tables of one write transaction.
pub(super) struct Tables<'transaction> {
    subscriptions: redb::Table<'transaction, &'static str, &'static [u8]>,
    topics: redb::Table<'transaction, &'static str, u64>,
    events: redb::Table<'transaction, (&'static str, u64), &'static [u8]>,
    event_references: redb::Table<'transaction, (&'static str, u64), u32>,
    event_expiry: redb::Table<'transaction, (u64, &'static str, u64), ()>,
    /// How long an event is kept after its last delivery (0: deleted at once).
    retention_ms: u64,
    partitions: redb::Table<'transaction, (&'static str, &'static str), &'static [u8]>,
    pending_partitions: redb::Table<'transaction, (&'static str, &'static str), ()>,
    deliveries: redb::Table<'transaction, (&'static str, u64), &'static [u8]>,
    dead_letters: redb::Table<'transaction, (&'static str, u64), &'static [u8]>,
    idempotency: redb::Table<'transaction, (&'static str, &'static str), &'static [u8]>,
    idempotency_expiry: redb::Table<'transaction, (u64, &'static str, &'static str), ()>,
    /// References to events released by completions and not yet written, by topic and
    /// sequence: a fan-out's partitions complete an event at about the same time, so its count
    /// is rewritten once per batch instead of once per delivery (see [`Tables::settle`]).
    releases: BTreeMap<String, BTreeMap<u64, u32>>,
    /// Partition records changed by the batch's publishes, completions and failures, by
    /// subscription id and topic, written once each when it settles. Nested maps keyed by
    /// owned strings are looked up by borrowed ones, so the hot path allocates a key only for
    /// a partition the batch has not touched yet, and they settle in the table's key order.
    partition_records: BTreeMap<String, BTreeMap<String, PartitionRecord>>,
    /// The last delivery record that did not decode, for the writer to quarantine.
    damaged: std::cell::RefCell<Option<Damaged>>,
}

/// The value under `key`, inserted as the default if absent; allocates the key only then.
fn slot<'map, V: Default>(map: &'map mut BTreeMap<String, V>, key: &str) -> &'map mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("the key was inserted above")
}

impl<'transaction> Tables<'transaction> {
    pub(super) fn open(
        transaction: &'transaction WriteTransaction,
        retention_ms: u64,
    ) -> Result<Self, redb::Error> {
        Ok(Tables {
            event_expiry: transaction.open_table(EVENT_EXPIRY)?,
            retention_ms,
            subscriptions: transaction.open_table(SUBSCRIPTIONS)?,
            topics: transaction.open_table(TOPICS)?,
            events: transaction.open_table(EVENTS)?,
            event_references: transaction.open_table(EVENT_REFERENCES)?,
            partitions: transaction.open_table(PARTITIONS)?,
            pending_partitions: transaction.open_table(PENDING_PARTITIONS)?,
            deliveries: transaction.open_table(DELIVERIES)?,
            dead_letters: transaction.open_table(DEAD_LETTERS)?,
            idempotency: transaction.open_table(IDEMPOTENCY)?,
            idempotency_expiry: transaction.open_table(IDEMPOTENCY_EXPIRY)?,
            releases: BTreeMap::new(),
            partition_records: BTreeMap::new(),
            damaged: std::cell::RefCell::new(None),
        })
    }

    /// The delivery record that failed the batch by not decoding, if one did.
    pub(super) fn take_damaged(&self) -> Option<Damaged> {
        self.damaged.borrow_mut().take()
    }

    /// Decodes a delivery record read from `table` at (`partition_key`, `sequence`),
    /// remembering where a damaged one lies.
    fn decode_delivery(
        &self,
        table: DeliveryTable,
        partition_key: &str,
        sequence: u64,
        bytes: &[u8],
    ) -> Result<DeliveryRecord, StoreError> {
        decode_delivery(&self.damaged, table, partition_key, sequence, bytes)
    }
}

/// [`Tables::decode_delivery`], for a caller that holds another field of the tables mutably.
fn decode_delivery(
    damaged: &std::cell::RefCell<Option<Damaged>>,
    table: DeliveryTable,
    partition_key: &str,
    sequence: u64,
    bytes: &[u8],
) -> Result<DeliveryRecord, StoreError> {
    DeliveryRecord::decode(bytes).inspect_err(|_| {
        *damaged.borrow_mut() = Some(Damaged {
            table,
            partition_key: partition_key.to_string(),
            sequence,
            bytes: bytes.to_vec(),
        });
    })
}

impl Tables<'_> {
    pub(super) fn create_subscription(
        &mut self,
        subscription: &Subscription,
        limits: &SubscriptionLimits,
        index: &TopicIndex,
    ) -> Applied<()> {
        if self
            .subscriptions
            .get(subscription.id.as_str())
            .map_err(unavailable)?
            .is_some()
        {
            return Ok(Err(StoreError::Conflict(format!(
                "subscription {} already exists",
                subscription.id
            ))));
        }
        let total = self.subscriptions.len().map_err(unavailable)? as usize;
        if let Err(error) = limits.check(subscription, total, |pattern| index.with_pattern(pattern))
        {
            return Ok(Err(error));
        }
        self.subscriptions
            .insert(
                subscription.id.as_str(),
                encode_subscription(subscription).as_slice(),
            )
            .map_err(unavailable)?;
        Ok(Ok(()))
    }

    pub(super) fn delete_subscription(&mut self, id: &str) -> Applied<(Subscription, u64)> {
        let subscription: Subscription = match self.subscriptions.remove(id).map_err(unavailable)? {
            Some(bytes) => decode_subscription(bytes.value(), "subscription")?,
            None => return Ok(Err(StoreError::NotFound(format!("subscription {id}")))),
        };
        let mut dropped = 0;
        for topic in self.partition_topics(id)? {
            dropped += self.drop_partition(id, &topic)?;
        }
        Ok(Ok((subscription, dropped)))
    }

    /// The topics of the subscription's partitions.
    fn partition_topics(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let mut topics = Vec::new();
        for entry in self.partitions.range((id, "")..).map_err(unavailable)? {
            let (key, _) = entry.map_err(unavailable)?;
            let (owner, topic) = key.value();
            if owner != id {
                break;
            }
            topics.push(topic.to_string());
        }
        Ok(topics)
    }

    /// Removes a partition with its deliveries and dead letters; returns how many those were.
    fn drop_partition(&mut self, id: &str, topic: &str) -> Result<u64, StoreError> {
        let partition_key = PartitionKey::new(topic, id).encode();
        let mut sequences = Vec::new();
        for entry in self
            .deliveries
            .range((partition_key.as_str(), 0)..=(partition_key.as_str(), u64::MAX))
            .map_err(unavailable)?
        {
            let (key, _) = entry.map_err(unavailable)?;
            sequences.push(key.value().1);
        }
        let mut dropped = 0;
        for sequence in sequences {
            self.deliveries
                .remove((partition_key.as_str(), sequence))
                .map_err(unavailable)?;
            self.release_event(topic, sequence)?;
            dropped += 1;
        }
        for sequence in self.dead_sequences(&partition_key)? {
            self.dead_letters
                .remove((partition_key.as_str(), sequence))
                .map_err(unavailable)?;
            self.release_event(topic, sequence)?;
            dropped += 1;
        }
        self.partitions.remove((id, topic)).map_err(unavailable)?;
        self.pending_partitions
            .remove((id, topic))
            .map_err(unavailable)?;
        Ok(dropped)
    }

    pub(super) fn publish(
        &mut self,
        index: &TopicIndex,
        event: &NewEvent,
        window: Duration,
        now: u64,
    ) -> Applied<Published> {
        let topic = event.topic.as_str();
        if let Some(key) = event.idempotency_key.as_deref()
            && let Some(bytes) = self.idempotency.get((topic, key)).map_err(unavailable)?
        {
            let original = IdempotencyRecord::decode(bytes.value())?;
            if original.expires_at > now {
                // The original's caller may have gone before it woke the worker: wake the
                // topic's partitions again (a partition with nothing due just goes idle).
                let partitions = index
                    .matching(topic)
                    .into_iter()
                    .map(|subscription_id| PartitionKey::new(topic, subscription_id))
                    .collect();
                return Ok(Ok(Published {
                    event_id: original.event_id,
                    sequence: original.sequence,
                    published_at: original.published_at,
                    subscription_count: original.subscription_count,
                    duplicate: true,
                    partitions,
                }));
            }
        }
        let last = self
            .topics
            .get(topic)
            .map_err(unavailable)?
            .map_or(0, |value| value.value());
        let sequence = now_micros().max(last + 1);
        self.topics.insert(topic, sequence).map_err(unavailable)?;

        let subscribers = index.matching_event(topic, &event.attributes);
        if !subscribers.is_empty() {
            let stored = Event {
                id: event.id.clone(),
                topic: event.topic.clone(),
                sequence,
                payload: event.payload.clone(),
                content_type: event.content_type.clone(),
                attributes: event.attributes.clone(),
                published_at: now,
                trace: event.trace.clone(),
            };
            self.events
                .insert((topic, sequence), encode_event(&stored).as_slice())
                .map_err(unavailable)?;
            self.event_references
                .insert((topic, sequence), subscribers.len() as u32)
                .map_err(unavailable)?;
        }
        let mut partitions = Vec::with_capacity(subscribers.len());
        for subscription_id in &subscribers {
            let partition = PartitionKey::new(topic, subscription_id.as_str());
            let mut record = self.partition(subscription_id, topic)?;
            let delivery = DeliveryRecord::new(now, record.last_enqueued);
            self.deliveries
                .insert(
                    (partition.encode().as_str(), sequence),
                    delivery.encode().as_slice(),
                )
                .map_err(unavailable)?;
            record.last_enqueued = sequence;
            record.pending += 1;
            if record.pending == 1 {
                self.pending_partitions
                    .insert((subscription_id.as_str(), topic), ())
                    .map_err(unavailable)?;
            }
            self.put_partition(subscription_id, topic, record);
            partitions.push(partition);
        }
        let published = Published {
            event_id: event.id.clone(),
            sequence,
            published_at: now,
            subscription_count: subscribers.len() as u32,
            duplicate: false,
            partitions,
        };
        if let Some(key) = event.idempotency_key.as_deref()
            && !window.is_zero()
        {
            self.remember_key(topic, key, &published, now + window.as_millis() as u64)?;
        }
        Ok(Ok(published))
    }

    pub(super) fn remember_key(
        &mut self,
        topic: &str,
        key: &str,
        published: &Published,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        // An expired record may still be there: drop its expiry entry with it.
        let previous = self
            .idempotency
            .get((topic, key))
            .map_err(unavailable)?
            .map(|bytes| IdempotencyRecord::decode(bytes.value()));
        if let Some(previous) = previous {
            self.idempotency_expiry
                .remove((previous?.expires_at, topic, key))
                .map_err(unavailable)?;
        }
        let record = IdempotencyRecord::current(
            published.event_id.clone(),
            published.sequence,
            published.published_at,
            published.subscription_count,
            expires_at,
        );
        self.idempotency
            .insert((topic, key), record.encode().as_slice())
            .map_err(unavailable)?;
        self.idempotency_expiry
            .insert((expires_at, topic, key), ())
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes events whose retention ended, unless a delivery references them again (a
    /// replay), at most [`EVENT_SWEEP_LIMIT`] per call.
    pub(super) fn expire_events(&mut self, now: u64) -> Result<(), StoreError> {
        let mut expired = Vec::new();
        for entry in self
            .event_expiry
            .range(..(now, "", 0))
            .map_err(unavailable)?
            .take(EVENT_SWEEP_LIMIT)
        {
            let (key, _) = entry.map_err(unavailable)?;
            let (expires_at, topic, sequence) = key.value();
            expired.push((expires_at, topic.to_string(), sequence));
        }
        for (expires_at, topic, sequence) in expired {
            self.event_expiry
                .remove((expires_at, topic.as_str(), sequence))
                .map_err(unavailable)?;
            let referenced = self
                .event_references
                .get((topic.as_str(), sequence))
                .map_err(unavailable)?
                .is_some_and(|references| references.value() > 0);
            if !referenced {
                self.events
                    .remove((topic.as_str(), sequence))
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    pub(super) fn expire_idempotency_keys(&mut self, now: u64) -> Result<(), StoreError> {
        let mut expired = Vec::new();
        for entry in self
            .idempotency_expiry
            .range(..(now, "", ""))
            .map_err(unavailable)?
            .take(SWEEP_LIMIT)
        {
            let (key, _) = entry.map_err(unavailable)?;
            let (expires_at, topic, idempotency_key) = key.value();
            expired.push((expires_at, topic.to_string(), idempotency_key.to_string()));
        }
        for (expires_at, topic, key) in expired {
            self.idempotency_expiry
                .remove((expires_at, topic.as_str(), key.as_str()))
                .map_err(unavailable)?;
            self.idempotency
                .remove((topic.as_str(), key.as_str()))
                .map_err(unavailable)?;
        }
        Ok(())
    }

    pub(super) fn partition(
        &self,
        subscription_id: &str,
        topic: &str,
    ) -> Result<PartitionRecord, StoreError> {
        if let Some(record) = self
            .partition_records
            .get(subscription_id)
            .and_then(|topics| topics.get(topic))
        {
            return Ok(*record);
        }
        match self
            .partitions
            .get((subscription_id, topic))
            .map_err(unavailable)?
        {
            Some(bytes) => PartitionRecord::decode(bytes.value()),
            None => Ok(PartitionRecord::default()),
        }
    }

    pub(super) fn delivery(
        &self,
        partition_key: &str,
        sequence: u64,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        match self
            .deliveries
            .get((partition_key, sequence))
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(Some(self.decode_delivery(
                DeliveryTable::Deliveries,
                partition_key,
                sequence,
                bytes.value(),
            )?)),
            None => Ok(None),
        }
    }

    /// Completes the partition's deliveries of `sequences` (pending or dead-lettered; those
    /// no longer there are skipped): removes them, and writes the partition's record once.
    /// Their events' references are released when the batch settles.
    pub(super) fn complete(
        &mut self,
        partition: &PartitionKey,
        sequences: &[u64],
    ) -> Result<(), StoreError> {
        let partition_key = partition.encode();
        let topic = partition.topic.as_str();
        let mut completed = 0;
        let mut dead = 0;
        let releases = slot(&mut self.releases, topic);
        for &sequence in sequences {
            let was_dead = match self
                .deliveries
                .remove((partition_key.as_str(), sequence))
                .map_err(unavailable)?
            {
                Some(removed) => {
                    decode_delivery(
                        &self.damaged,
                        DeliveryTable::Deliveries,
                        &partition_key,
                        sequence,
                        removed.value(),
                    )?
                    .dead_lettered
                }
                None => {
                    let removed = self
                        .dead_letters
                        .remove((partition_key.as_str(), sequence))
                        .map_err(unavailable)?
                        .is_some();
                    if !removed {
                        continue;
                    }
                    true
                }
            };
            completed += 1;
            // Skipped by an operator while its attempt was in flight, which then succeeded.
            dead += u64::from(was_dead);
            *releases.entry(sequence).or_default() += 1;
        }
        if completed == 0 {
            return Ok(());
        }
        let subscription_id = partition.subscription_id.as_str();
        let mut record = self.partition(subscription_id, topic)?;
        record.pending = record.pending.saturating_sub(completed);
        record.dead_letters = record.dead_letters.saturating_sub(dead);
        record.consecutive_failures = 0;
        record.last_success_at = now_millis();
        if record.pending == 0 {
            self.pending_partitions
                .remove((subscription_id, topic))
                .map_err(unavailable)?;
        }
        self.put_partition(subscription_id, topic, record);
        Ok(())
    }

    /// Writes what publishes, completions and failures kept for the end of the batch: the
    /// partition records they changed and the event references completions released. Called
    /// before any other command (which reads and writes the tables directly), and before the
    /// batch commits.
    pub(super) fn settle(&mut self) -> Result<(), StoreError> {
        for (topic, sequences) in std::mem::take(&mut self.releases) {
            for (sequence, released) in sequences {
                self.release_event_by(&topic, sequence, released)?;
            }
        }
        for (subscription_id, topics) in std::mem::take(&mut self.partition_records) {
            for (topic, record) in topics {
                self.partitions
                    .insert(
                        (subscription_id.as_str(), topic.as_str()),
                        record.encode().as_slice(),
                    )
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Keeps a changed partition record for [`Tables::settle`]: a batch's publishes fan out to
    /// the same partitions again and again, and each record is written once per batch.
    fn put_partition(&mut self, subscription_id: &str, topic: &str, record: PartitionRecord) {
        *slot(slot(&mut self.partition_records, subscription_id), topic) = record;
    }

    pub(super) fn record_failure(
        &mut self,
        partition: &PartitionKey,
        failure: &Failure,
    ) -> Result<(), StoreError> {
        let Failure {
            sequence,
            attempt,
            ref error,
            ref outcome,
        } = *failure;
        let partition_key = partition.encode();
        let Some(mut delivery) = self.delivery(&partition_key, sequence)? else {
            return Ok(());
        };
        if delivery.attempts != attempt.saturating_sub(1) {
            // Recorded already (by a call whose answer was lost), or reset since the attempt
            // began (a redrive).
            return Ok(());
        }
        let was_dead = delivery.dead_lettered;
        delivery.attempts = attempt;
        delivery.set_error(error);
        let subscription_id = partition.subscription_id.as_str();
        let topic = partition.topic.as_str();
        let mut record = self.partition(subscription_id, topic)?;
        record.consecutive_failures += 1;
        record.last_failure_at = now_millis();
        match outcome {
            FailureOutcome::RetryAt(at) => {
                delivery.next_attempt_at = *at;
                self.deliveries
                    .insert(
                        (partition_key.as_str(), sequence),
                        delivery.encode().as_slice(),
                    )
                    .map_err(unavailable)?;
            }
            FailureOutcome::DeadLetter => {
                if !was_dead {
                    record.dead_letters += 1;
                }
                self.bury(&partition_key, sequence, delivery)?;
            }
        }
        self.put_partition(subscription_id, topic, record);
        Ok(())
    }

    /// Moves a delivery from the partition's pending ones to its dead letters. The head mark
    /// (`dead_through`) does not move: the dead letter is gone from the range the head is read
    /// from, and a delivery redriven or replayed below it must stay readable.
    fn bury(
        &mut self,
        partition_key: &str,
        sequence: u64,
        mut delivery: DeliveryRecord,
    ) -> Result<(), StoreError> {
        delivery.dead_lettered = true;
        self.deliveries
            .remove((partition_key, sequence))
            .map_err(unavailable)?;
        self.dead_letters
            .insert((partition_key, sequence), delivery.encode().as_slice())
            .map_err(unavailable)?;
        Ok(())
    }

    /// The sequences of a partition's dead letters, in order.
    fn dead_sequences(&self, partition_key: &str) -> Result<Vec<u64>, StoreError> {
        let mut sequences = Vec::new();
        for entry in self
            .dead_letters
            .range((partition_key, 0)..=(partition_key, u64::MAX))
            .map_err(unavailable)?
        {
            let (key, _) = entry.map_err(unavailable)?;
            sequences.push(key.value().1);
        }
        Ok(sequences)
    }

    /// The dead letters `sequences` names (all of the partition's if `None`), with their
    /// records: a dead letter kept in the dead-letter table, or (written before it existed)
    /// a flagged one among the deliveries. `NotFound` for a named sequence that is neither.
    fn dead_letters_named(
        &self,
        partition: &PartitionKey,
        record: &PartitionRecord,
        sequences: Option<&[u64]>,
    ) -> Applied<Vec<DeadLetter>> {
        let key = partition.encode();
        let mut found = Vec::new();
        let named: Vec<u64> = match sequences {
            Some(sequences) => sequences.to_vec(),
            None => {
                let mut all = self.dead_sequences(&key)?;
                // Flagged ones from before the table: at or below the head mark.
                for entry in self
                    .deliveries
                    .range((key.as_str(), 0)..=(key.as_str(), record.dead_through))
                    .map_err(unavailable)?
                {
                    let (entry_key, value) = entry.map_err(unavailable)?;
                    let sequence = entry_key.value().1;
                    let delivery = self.decode_delivery(
                        DeliveryTable::Deliveries,
                        &key,
                        sequence,
                        value.value(),
                    )?;
                    if delivery.dead_lettered {
                        all.push(sequence);
                    }
                }
                all
            }
        };
        for sequence in named {
            if let Some(bytes) = self
                .dead_letters
                .get((key.as_str(), sequence))
                .map_err(unavailable)?
            {
                let delivery = self.decode_delivery(
                    DeliveryTable::DeadLetters,
                    &key,
                    sequence,
                    bytes.value(),
                )?;
                found.push((sequence, delivery, true));
                continue;
            }
            match self.delivery(&key, sequence)? {
                Some(delivery) if delivery.dead_lettered => found.push((sequence, delivery, false)),
                _ => {
                    return Ok(Err(StoreError::NotFound(format!(
                        "dead letter {partition}/{sequence}"
                    ))));
                }
            }
        }
        found.sort_by_key(|(sequence, ..)| *sequence);
        found.dedup_by_key(|(sequence, ..)| *sequence);
        Ok(Ok(found))
    }

    /// Puts dead letters back in front of the partition's pending deliveries (their
    /// sequences are below its head, so they are sent next), marked as redriven, with fresh
    /// attempts. Returns how many.
    pub(super) fn redrive(
        &mut self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
        now: u64,
    ) -> Applied<u64> {
        let subscription_id = partition.subscription_id.as_str();
        let topic = partition.topic.as_str();
        let mut record = self.partition(subscription_id, topic)?;
        let found = match self.dead_letters_named(partition, &record, sequences)? {
            Ok(found) => found,
            Err(error) => return Ok(Err(error)),
        };
        let key = partition.encode();
        for (sequence, mut delivery, in_table) in found.iter().cloned() {
            if in_table {
                self.dead_letters
                    .remove((key.as_str(), sequence))
                    .map_err(unavailable)?;
            }
            delivery.dead_lettered = false;
            delivery.attempts = 0;
            delivery.next_attempt_at = now;
            delivery.redelivery = Some(Redelivery::Redrive.name().to_string());
            self.deliveries
                .insert((key.as_str(), sequence), delivery.encode().as_slice())
                .map_err(unavailable)?;
            record.dead_through = record.dead_through.min(sequence.saturating_sub(1));
        }
        let count = found.len() as u64;
        record.dead_letters = record.dead_letters.saturating_sub(count);
        self.partitions
            .insert((subscription_id, topic), record.encode().as_slice())
            .map_err(unavailable)?;
        Ok(Ok(count))
    }

    /// Queues retained events of `range` again in the partition (see
    /// [`crate::store::DeliveryLog::replay`]).
    pub(super) fn replay(
        &mut self,
        partition: &PartitionKey,
        range: &ReplayRange,
        now: u64,
    ) -> Applied<Replayed> {
        let topic = partition.topic.as_str();
        let key = partition.encode();
        let (low, high) = replay_sequences(range);
        if low > high {
            return Ok(Ok(Replayed::default()));
        }
        let filter = match range.compiled_filter() {
            Ok(filter) => filter,
            Err(error) => return Ok(Err(error)),
        };
        // The event before the range: the first replayed one's previous sequence.
        let mut previous = match self
            .events
            .range((topic, 0)..(topic, low))
            .map_err(unavailable)?
            .next_back()
        {
            Some(entry) => entry.map_err(unavailable)?.0.value().1,
            None => 0,
        };
        let mut chosen = Vec::new();
        let mut replayed = Replayed::default();
        for entry in self
            .events
            .range((topic, low)..=(topic, high))
            .map_err(unavailable)?
        {
            let (entry_key, value) = entry.map_err(unavailable)?;
            let sequence = entry_key.value().1;
            let event = decode_event(topic, sequence, value.value())?;
            if filter.as_ref().is_some_and(|filter| {
                !filter.matches(&crate::filter::Bindings::new(topic, &event.attributes))
            }) {
                continue;
            }
            if event.published_at < range.from_time {
                previous = sequence;
                continue;
            }
            if event.published_at > range.to_time {
                continue;
            }
            if chosen.len() >= range.limit {
                replayed.next_sequence = Some(sequence);
                break;
            }
            chosen.push((sequence, previous));
            previous = sequence;
        }
        let subscription_id = partition.subscription_id.as_str();
        let mut record = self.partition(subscription_id, topic)?;
        for (sequence, previous) in chosen {
            let pending = self
                .deliveries
                .get((key.as_str(), sequence))
                .map_err(unavailable)?
                .is_some()
                || self
                    .dead_letters
                    .get((key.as_str(), sequence))
                    .map_err(unavailable)?
                    .is_some();
            if pending {
                replayed.skipped += 1;
                continue;
            }
            let mut delivery = DeliveryRecord::new(now, previous);
            delivery.redelivery = Some(Redelivery::Replay.name().to_string());
            self.deliveries
                .insert((key.as_str(), sequence), delivery.encode().as_slice())
                .map_err(unavailable)?;
            let references = self
                .event_references
                .get((topic, sequence))
                .map_err(unavailable)?
                .map_or(0, |value| value.value());
            self.event_references
                .insert((topic, sequence), references + 1)
                .map_err(unavailable)?;
            record.dead_through = record.dead_through.min(sequence.saturating_sub(1));
            record.pending += 1;
            replayed.count += 1;
        }
        if replayed.count > 0 {
            self.pending_partitions
                .insert((subscription_id, topic), ())
                .map_err(unavailable)?;
            self.partitions
                .insert((subscription_id, topic), record.encode().as_slice())
                .map_err(unavailable)?;
        }
        Ok(Ok(replayed))
    }

    /// Deletes dead letters for good. Returns how many.
    pub(super) fn purge(
        &mut self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Applied<u64> {
        let subscription_id = partition.subscription_id.as_str();
        let topic = partition.topic.as_str();
        let mut record = self.partition(subscription_id, topic)?;
        let found = match self.dead_letters_named(partition, &record, sequences)? {
            Ok(found) => found,
            Err(error) => return Ok(Err(error)),
        };
        let key = partition.encode();
        for (sequence, _, in_table) in &found {
            if *in_table {
                self.dead_letters
                    .remove((key.as_str(), *sequence))
                    .map_err(unavailable)?;
            } else {
                self.deliveries
                    .remove((key.as_str(), *sequence))
                    .map_err(unavailable)?;
            }
            self.release_event(topic, *sequence)?;
        }
        let count = found.len() as u64;
        record.dead_letters = record.dead_letters.saturating_sub(count);
        record.pending = record.pending.saturating_sub(count);
        if record.pending == 0 {
            self.pending_partitions
                .remove((subscription_id, topic))
                .map_err(unavailable)?;
        }
        self.partitions
            .insert((subscription_id, topic), record.encode().as_slice())
            .map_err(unavailable)?;
        Ok(Ok(count))
    }

    /// Replaces a subscription by `update`'s edit of it; returns the old value too (the
    /// caller updates the topic index if the topics or the filter changed). Partitions of
    /// topics the new patterns no longer match are dropped with their deliveries.
    pub(super) fn update_subscription(
        &mut self,
        id: &str,
        update: &SubscriptionUpdate,
    ) -> Applied<(Subscription, Updated)> {
        let current = match self.subscriptions.get(id).map_err(unavailable)? {
            Some(bytes) => decode_subscription(bytes.value(), "subscription")?,
            None => return Ok(Err(StoreError::NotFound(format!("subscription {id}")))),
        };
        let mut updated = current.clone();
        if let Err(error) = update(&mut updated) {
            return Ok(Err(error));
        }
        if let Err(error) = unchanged_identity(&current, &updated) {
            return Ok(Err(error));
        }
        let mut dropped = 0;
        if updated != current {
            self.subscriptions
                .insert(id, encode_subscription(&updated).as_slice())
                .map_err(unavailable)?;
            if updated.topics != current.topics {
                for topic in self.partition_topics(id)? {
                    if !updated.matches(&topic) {
                        // Only the chain's last link stays: if the topic comes back, its
                        // first event names the last one received before.
                        let last = self.partition(id, &topic)?.last_enqueued;
                        dropped += self.drop_partition(id, &topic)?;
                        let kept = PartitionRecord {
                            last_enqueued: last,
                            dead_through: last,
                            ..PartitionRecord::default()
                        };
                        self.partitions
                            .insert((id, topic.as_str()), kept.encode().as_slice())
                            .map_err(unavailable)?;
                    }
                }
            }
        }
        Ok(Ok((
            current,
            Updated {
                subscription: updated,
                dropped,
            },
        )))
    }

    /// The partition's head: its first delivery that is neither completed nor dead-lettered.
    fn head(
        &self,
        partition: &PartitionKey,
        record: &PartitionRecord,
    ) -> Result<Option<(u64, DeliveryRecord)>, StoreError> {
        let key = partition.encode();
        let from = record.dead_through.saturating_add(1);
        for entry in self
            .deliveries
            .range((key.as_str(), from)..=(key.as_str(), u64::MAX))
            .map_err(unavailable)?
        {
            let (entry_key, value) = entry.map_err(unavailable)?;
            let sequence = entry_key.value().1;
            let delivery =
                self.decode_delivery(DeliveryTable::Deliveries, &key, sequence, value.value())?;
            if !delivery.dead_lettered {
                return Ok(Some((sequence, delivery)));
            }
        }
        Ok(None)
    }

    /// Makes the head due at `now`; returns its sequence.
    pub(super) fn retry_now(&mut self, partition: &PartitionKey, now: u64) -> Applied<Option<u64>> {
        let record = self.partition(&partition.subscription_id, &partition.topic)?;
        let Some((sequence, mut delivery)) = self.head(partition, &record)? else {
            return Ok(Ok(None));
        };
        if delivery.next_attempt_at > now {
            delivery.next_attempt_at = now;
            self.deliveries
                .insert(
                    (partition.encode().as_str(), sequence),
                    delivery.encode().as_slice(),
                )
                .map_err(unavailable)?;
        }
        Ok(Ok(Some(sequence)))
    }

    /// Dead-letters the head if it is the delivery of `sequence`.
    pub(super) fn skip_head(&mut self, partition: &PartitionKey, sequence: u64) -> Applied<()> {
        let subscription_id = partition.subscription_id.as_str();
        let topic = partition.topic.as_str();
        let mut record = self.partition(subscription_id, topic)?;
        let head = self.head(partition, &record)?;
        let head_sequence = head.as_ref().map(|(at, _)| *at);
        let Some((head_sequence, mut delivery)) = head.filter(|(head, _)| *head == sequence) else {
            return Ok(Err(head_moved(partition, sequence, head_sequence)));
        };
        delivery.set_error(SKIPPED);
        self.bury(&partition.encode(), head_sequence, delivery)?;
        record.dead_letters += 1;
        self.partitions
            .insert((subscription_id, topic), record.encode().as_slice())
            .map_err(unavailable)?;
        Ok(Ok(()))
    }

    /// Drops one reference to an event. With the last, the event is deleted, or with a
    /// retention window kept until it ends (counted from the sequence, a publish time in
    /// microseconds).
    pub(super) fn release_event(&mut self, topic: &str, sequence: u64) -> Result<(), StoreError> {
        self.release_event_by(topic, sequence, 1)
    }

    /// Drops `released` references to an event; the last one deletes it, or with a retention
    /// schedules its expiry.
    fn release_event_by(
        &mut self,
        topic: &str,
        sequence: u64,
        released: u32,
    ) -> Result<(), StoreError> {
        let references = self
            .event_references
            .get((topic, sequence))
            .map_err(unavailable)?
            .map_or(0, |value| value.value());
        if references <= released {
            self.event_references
                .remove((topic, sequence))
                .map_err(unavailable)?;
            if self.retention_ms == 0 {
                self.events.remove((topic, sequence)).map_err(unavailable)?;
            } else {
                let expires_at = (sequence / 1000).saturating_add(self.retention_ms);
                self.event_expiry
                    .insert((expires_at, topic, sequence), ())
                    .map_err(unavailable)?;
            }
        } else {
            self.event_references
                .insert((topic, sequence), references - released)
                .map_err(unavailable)?;
        }
        Ok(())
    }
}
