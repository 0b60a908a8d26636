//! The embedded store's delivery log: publishes and outcomes go through the writer; reads
//! (next deliveries, listings) run in read transactions.

use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable};

use super::EmbeddedStore;
use super::schema::{
    DEAD_LETTERS, DELIVERIES, EVENTS, PARTITIONS, PENDING_PARTITIONS, SUBSCRIPTIONS,
};
use super::unavailable;
use super::writer::{Command, Failure};
use crate::model::{
    FailureOutcome, HeadStatus, NewEvent, Page, PartitionKey, PartitionStatus, PendingDelivery,
    Published, Redelivery, ReplayRange, Replayed,
};
use crate::store::pages;
use crate::store::records::{DeliveryRecord, PartitionRecord, decode_event};
use crate::store::{DeliveryLog, LeaseToken, StoreError};

#[async_trait]
impl DeliveryLog for EmbeddedStore {
    async fn publish(
        &self,
        event: &NewEvent,
        idempotency_window: Duration,
    ) -> Result<Published, StoreError> {
        let event = event.clone();
        self.submit(|reply| Command::Publish(event, idempotency_window, reply))
            .await
    }

    async fn next_deliveries(
        &self,
        partition: &PartitionKey,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let partition = partition.clone();
        self.read_with(move |transaction| {
            let partition = &partition;
            let partitions = transaction.open_table(PARTITIONS).map_err(unavailable)?;
            let record = match partitions
                .get((partition.subscription_id.as_str(), partition.topic.as_str()))
                .map_err(unavailable)?
            {
                Some(bytes) => PartitionRecord::decode(bytes.value())?,
                None => return Ok(Vec::new()),
            };
            if record.pending == 0 {
                return Ok(Vec::new());
            }
            // Dead letters flagged in place (written before they had a table of their own)
            // can lie after the head mark once a redrive lowered it: read past them.
            let mut from = record.dead_through.saturating_add(1);
            loop {
                let mut deliveries = read_partition(&transaction, partition, from, limit)?;
                let full = deliveries.len() == limit;
                let last = deliveries.last().map(|delivery| delivery.event.sequence);
                deliveries.retain(|delivery| !delivery.state.dead_lettered);
                match last {
                    Some(last) if deliveries.is_empty() && full => from = last.saturating_add(1),
                    _ => return Ok(deliveries),
                }
            }
        })
        .await
    }

    /// One process owns the file, so there are no leases and `fence` is not checked.
    async fn complete_delivery(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        _fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        let partition = partition.clone();
        self.submit(|reply| Command::Complete(partition, vec![sequence], reply))
            .await
    }

    /// One write for all of them: the partition's record is rewritten once.
    async fn complete_deliveries(
        &self,
        partition: &PartitionKey,
        sequences: &[u64],
        _fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        if sequences.is_empty() {
            return Ok(());
        }
        let partition = partition.clone();
        let sequences = sequences.to_vec();
        self.submit(|reply| Command::Complete(partition, sequences, reply))
            .await
    }

    async fn record_failure(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        attempt: u32,
        error: &str,
        outcome: FailureOutcome,
        _fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        let failure = Failure {
            sequence,
            attempt,
            error: error.to_string(),
            outcome,
        };
        let partition = partition.clone();
        self.submit(|reply| Command::Failure(partition, failure, reply))
            .await
    }

    async fn list_pending(
        &self,
        subscription_id: &str,
        topic: Option<&str>,
        dead_only: bool,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PendingDelivery>, StoreError> {
        let after = page_token.map(pages::decode_pending_token).transpose()?;
        let subscription_id = subscription_id.to_string();
        let topic = topic.map(str::to_string);
        self.read_with(move |transaction| {
            let subscription_id = subscription_id.as_str();
            let topic = topic.as_deref();
            require_subscription(&transaction, subscription_id)?;
            let start_after = |candidate: &str| match &after {
                Some((token_topic, sequence)) if token_topic == candidate => sequence + 1,
                _ => 0,
            };
            // Fetch one more than asked to learn whether another page follows.
            let wanted = page_size + 1;
            let mut items = Vec::new();
            match topic {
                Some(topic) => {
                    let partition = PartitionKey::new(topic, subscription_id);
                    items = read_with_dead(
                        &transaction,
                        &partition,
                        start_after(topic),
                        wanted,
                        dead_only,
                    )?;
                }
                None => {
                    let pending = transaction
                        .open_table(PENDING_PARTITIONS)
                        .map_err(unavailable)?;
                    let first_topic = after.as_ref().map_or("", |(topic, _)| topic.as_str());
                    let range = pending
                        .range((subscription_id, first_topic)..)
                        .map_err(unavailable)?;
                    for entry in range {
                        let (key, _) = entry.map_err(unavailable)?;
                        let (owner, topic) = key.value();
                        if owner != subscription_id || items.len() >= wanted {
                            break;
                        }
                        let partition = PartitionKey::new(topic, subscription_id);
                        let left = wanted - items.len();
                        items.extend(read_with_dead(
                            &transaction,
                            &partition,
                            start_after(topic),
                            left,
                            dead_only,
                        )?);
                    }
                }
            }
            Ok(pages::pending_page(items, page_size))
        })
        .await
    }

    async fn partition_status(
        &self,
        subscription_id: &str,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PartitionStatus>, StoreError> {
        let after = page_token
            .map(pages::decode_subscription_token)
            .transpose()?;
        let subscription_id = subscription_id.to_string();
        self.read_with(move |transaction| {
            let subscription_id = subscription_id.as_str();
            let subscription = require_subscription(&transaction, subscription_id)?;
            let partitions = transaction.open_table(PARTITIONS).map_err(unavailable)?;
            let start = after.as_deref().unwrap_or("");
            let mut items = Vec::new();
            for entry in partitions
                .range((subscription_id, start)..)
                .map_err(unavailable)?
            {
                let (key, value) = entry.map_err(unavailable)?;
                let (owner, topic) = key.value();
                if owner != subscription_id || items.len() > page_size {
                    break;
                }
                // A topic no longer subscribed keeps only its chain's last link.
                if after.as_deref() == Some(topic) || !subscription.matches(topic) {
                    continue;
                }
                let record = PartitionRecord::decode(value.value())?;
                let partition = PartitionKey::new(topic, subscription_id);
                let head = read_partition(
                    &transaction,
                    &partition,
                    record.dead_through.saturating_add(1),
                    1,
                )?
                .into_iter()
                .find(|delivery| !delivery.state.dead_lettered)
                .map(|delivery| HeadStatus {
                    sequence: delivery.event.sequence,
                    published_at: delivery.event.published_at,
                    state: delivery.state,
                    last_error: delivery.last_error,
                });
                items.push(PartitionStatus {
                    partition,
                    pending: record.pending.saturating_sub(record.dead_letters),
                    dead_letters: record.dead_letters,
                    head,
                    consecutive_failures: record.consecutive_failures,
                    last_success_at: record.last_success_at,
                    last_failure_at: record.last_failure_at,
                });
            }
            Ok(pages::partition_page(items, page_size))
        })
        .await
    }

    async fn retry_now(&self, partition: &PartitionKey) -> Result<Option<u64>, StoreError> {
        let partition = partition.clone();
        self.submit(|reply| Command::RetryNow(partition, reply))
            .await
    }

    async fn skip_head(&self, partition: &PartitionKey, sequence: u64) -> Result<(), StoreError> {
        let partition = partition.clone();
        self.submit(|reply| Command::SkipHead(partition, sequence, reply))
            .await
    }

    async fn redrive(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        let partition = partition.clone();
        let sequences = sequences.map(<[u64]>::to_vec);
        self.submit(|reply| Command::Redrive(partition, sequences, reply))
            .await
    }

    async fn purge(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        let partition = partition.clone();
        let sequences = sequences.map(<[u64]>::to_vec);
        self.submit(|reply| Command::Purge(partition, sequences, reply))
            .await
    }

    async fn replay(
        &self,
        partition: &PartitionKey,
        range: &ReplayRange,
    ) -> Result<Replayed, StoreError> {
        let partition = partition.clone();
        let range = range.clone();
        self.submit(|reply| Command::Replay(partition, range, reply))
            .await
    }

    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError> {
        self.read_with(move |transaction| {
            let table = transaction
                .open_table(PENDING_PARTITIONS)
                .map_err(unavailable)?;
            let mut partitions = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
                let (key, _) = entry.map_err(unavailable)?;
                let (subscription_id, topic) = key.value();
                partitions.push(PartitionKey::new(topic, subscription_id));
            }
            Ok(partitions)
        })
        .await
    }
}

/// `NotFound` unless the subscription exists.
fn require_subscription(
    transaction: &ReadTransaction,
    subscription_id: &str,
) -> Result<crate::model::Subscription, StoreError> {
    let subscriptions = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
    match subscriptions.get(subscription_id).map_err(unavailable)? {
        Some(bytes) => crate::store::records::decode_subscription(bytes.value(), "subscription"),
        None => Err(StoreError::NotFound(format!(
            "subscription {subscription_id}"
        ))),
    }
}

/// Reads up to `limit` deliveries of a partition with sequence >= `from`, joined with events.
fn read_partition(
    transaction: &ReadTransaction,
    partition: &PartitionKey,
    from: u64,
    limit: usize,
) -> Result<Vec<PendingDelivery>, StoreError> {
    read_range(transaction, DELIVERIES, partition, from, limit)
}

/// Reads up to `limit` of a partition's pending deliveries and dead letters with sequence >=
/// `from`, in sequence order (only dead letters with `dead_only`), joined with events.
fn read_with_dead(
    transaction: &ReadTransaction,
    partition: &PartitionKey,
    from: u64,
    limit: usize,
    dead_only: bool,
) -> Result<Vec<PendingDelivery>, StoreError> {
    let mut merged = read_range(transaction, DEAD_LETTERS, partition, from, limit)?;
    for delivery in &mut merged {
        delivery.state.dead_lettered = true;
    }
    merged.extend(
        read_partition(transaction, partition, from, limit)?
            .into_iter()
            .filter(|delivery| !dead_only || delivery.state.dead_lettered),
    );
    merged.sort_by_key(|delivery| delivery.event.sequence);
    merged.truncate(limit);
    Ok(merged)
}

/// Reads up to `limit` entries of `table` (deliveries or dead letters) of a partition with
/// sequence >= `from`, joined with events.
fn read_range(
    transaction: &ReadTransaction,
    table: redb::TableDefinition<(&str, u64), &[u8]>,
    partition: &PartitionKey,
    from: u64,
    limit: usize,
) -> Result<Vec<PendingDelivery>, StoreError> {
    let deliveries = transaction.open_table(table).map_err(unavailable)?;
    let events = transaction.open_table(EVENTS).map_err(unavailable)?;
    let key = partition.encode();
    let mut result = Vec::new();
    for entry in deliveries
        .range((key.as_str(), from)..=(key.as_str(), u64::MAX))
        .map_err(unavailable)?
    {
        if result.len() >= limit {
            break;
        }
        let (entry_key, value) = entry.map_err(unavailable)?;
        let (_, sequence) = entry_key.value();
        let record = DeliveryRecord::decode(value.value())?;
        let event_bytes = events
            .get((partition.topic.as_str(), sequence))
            .map_err(unavailable)?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("delivery {key}/{sequence} has no event record"))
            })?;
        let event = decode_event(&partition.topic, sequence, event_bytes.value())?;
        result.push(PendingDelivery {
            partition: partition.clone(),
            event,
            state: record.state(),
            last_error: record.last_error.clone(),
            previous_sequence: record.previous_sequence,
            redelivery: record.redelivery.as_deref().and_then(Redelivery::from_name),
        });
    }
    Ok(result)
}
