//! The write side of the embedded store: what each command does to the tables, inside the
//! writer's transaction.

use std::time::Duration;

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::schema::{
    DELIVERIES, EVENT_REFERENCES, EVENTS, IDEMPOTENCY, IDEMPOTENCY_EXPIRY, PARTITIONS,
    PENDING_PARTITIONS, SUBSCRIPTIONS, TOPICS,
};
use super::unavailable;
use crate::model::{
    Event, FailureOutcome, NewEvent, PartitionKey, Published, Subscription, now_micros,
};
use crate::store::records::{
    DeliveryRecord, IdempotencyRecord, PartitionRecord, decode_subscription, encode_event,
    encode_subscription,
};
use crate::store::topic_index::TopicIndex;
use crate::store::{StoreError, SubscriptionLimits};

/// Most expired idempotency keys removed per sweep.
const SWEEP_LIMIT: usize = 1000;

/// Result of one command: the outer error aborts the batch, the inner one is the command's own.
pub(super) type Applied<T> = Result<Result<T, StoreError>, StoreError>;

/// The tables of one write transaction.
pub(super) struct Tables<'transaction> {
    subscriptions: redb::Table<'transaction, &'static str, &'static [u8]>,
    topics: redb::Table<'transaction, &'static str, u64>,
    events: redb::Table<'transaction, (&'static str, u64), &'static [u8]>,
    event_references: redb::Table<'transaction, (&'static str, u64), u32>,
    partitions: redb::Table<'transaction, (&'static str, &'static str), &'static [u8]>,
    pending_partitions: redb::Table<'transaction, (&'static str, &'static str), ()>,
    deliveries: redb::Table<'transaction, (&'static str, u64), &'static [u8]>,
    idempotency: redb::Table<'transaction, (&'static str, &'static str), &'static [u8]>,
    idempotency_expiry: redb::Table<'transaction, (u64, &'static str, &'static str), ()>,
}

impl<'transaction> Tables<'transaction> {
    pub(super) fn open(transaction: &'transaction WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Tables {
            subscriptions: transaction.open_table(SUBSCRIPTIONS)?,
            topics: transaction.open_table(TOPICS)?,
            events: transaction.open_table(EVENTS)?,
            event_references: transaction.open_table(EVENT_REFERENCES)?,
            partitions: transaction.open_table(PARTITIONS)?,
            pending_partitions: transaction.open_table(PENDING_PARTITIONS)?,
            deliveries: transaction.open_table(DELIVERIES)?,
            idempotency: transaction.open_table(IDEMPOTENCY)?,
            idempotency_expiry: transaction.open_table(IDEMPOTENCY_EXPIRY)?,
        })
    }

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
        let mut topics = Vec::new();
        for entry in self.partitions.range((id, "")..).map_err(unavailable)? {
            let (key, _) = entry.map_err(unavailable)?;
            let (owner, topic) = key.value();
            if owner != id {
                break;
            }
            topics.push(topic.to_string());
        }
        let mut dropped = 0;
        for topic in &topics {
            let partition_key = PartitionKey::new(topic.as_str(), id).encode();
            let mut sequences = Vec::new();
            for entry in self
                .deliveries
                .range((partition_key.as_str(), 0)..=(partition_key.as_str(), u64::MAX))
                .map_err(unavailable)?
            {
                let (key, _) = entry.map_err(unavailable)?;
                sequences.push(key.value().1);
            }
            for sequence in sequences {
                self.deliveries
                    .remove((partition_key.as_str(), sequence))
                    .map_err(unavailable)?;
                self.release_event(topic, sequence)?;
                dropped += 1;
            }
            self.partitions
                .remove((id, topic.as_str()))
                .map_err(unavailable)?;
            self.pending_partitions
                .remove((id, topic.as_str()))
                .map_err(unavailable)?;
        }
        Ok(Ok((subscription, dropped)))
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

        let subscribers = index.matching(topic);
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
            self.partitions
                .insert(
                    (subscription_id.as_str(), topic),
                    record.encode().as_slice(),
                )
                .map_err(unavailable)?;
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
            Some(bytes) => Ok(Some(DeliveryRecord::decode(bytes.value())?)),
            None => Ok(None),
        }
    }

    pub(super) fn complete(
        &mut self,
        partition: &PartitionKey,
        sequence: u64,
    ) -> Result<(), StoreError> {
        let partition_key = partition.encode();
        let removed = self
            .deliveries
            .remove((partition_key.as_str(), sequence))
            .map_err(unavailable)?
            .is_some();
        if !removed {
            return Ok(());
        }
        let subscription_id = partition.subscription_id.as_str();
        let topic = partition.topic.as_str();
        let mut record = self.partition(subscription_id, topic)?;
        record.pending = record.pending.saturating_sub(1);
        if record.pending == 0 {
            self.pending_partitions
                .remove((subscription_id, topic))
                .map_err(unavailable)?;
        }
        self.partitions
            .insert((subscription_id, topic), record.encode().as_slice())
            .map_err(unavailable)?;
        self.release_event(topic, sequence)
    }

    pub(super) fn record_failure(
        &mut self,
        partition: &PartitionKey,
        sequence: u64,
        error: &str,
        outcome: &FailureOutcome,
    ) -> Result<(), StoreError> {
        let partition_key = partition.encode();
        let Some(mut delivery) = self.delivery(&partition_key, sequence)? else {
            return Ok(());
        };
        delivery.attempts += 1;
        delivery.set_error(error);
        match outcome {
            FailureOutcome::RetryAt(at) => delivery.next_attempt_at = *at,
            FailureOutcome::DeadLetter => {
                delivery.dead_lettered = true;
                let subscription_id = partition.subscription_id.as_str();
                let topic = partition.topic.as_str();
                let mut record = self.partition(subscription_id, topic)?;
                record.dead_through = record.dead_through.max(sequence);
                self.partitions
                    .insert((subscription_id, topic), record.encode().as_slice())
                    .map_err(unavailable)?;
            }
        }
        self.deliveries
            .insert(
                (partition_key.as_str(), sequence),
                delivery.encode().as_slice(),
            )
            .map_err(unavailable)?;
        Ok(())
    }

    /// Drops one reference to an event, deleting it with the last.
    pub(super) fn release_event(&mut self, topic: &str, sequence: u64) -> Result<(), StoreError> {
        let references = self
            .event_references
            .get((topic, sequence))
            .map_err(unavailable)?
            .map_or(0, |value| value.value());
        if references <= 1 {
            self.event_references
                .remove((topic, sequence))
                .map_err(unavailable)?;
            self.events.remove((topic, sequence)).map_err(unavailable)?;
        } else {
            self.event_references
                .insert((topic, sequence), references - 1)
                .map_err(unavailable)?;
        }
        Ok(())
    }
}
