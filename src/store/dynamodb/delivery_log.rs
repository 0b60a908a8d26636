//! The delivery log on DynamoDB: deliveries are items under their partition's key, dead
//! letters under a sibling key, events under their topic's key with a reference count.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{Delete, TransactWriteItem, Update};

use super::schema::{self, Item, get_n, n, s};
use super::{DynamoStore, Inner, MAX_CONFLICT_RETRIES, SWEEP_BUDGET};
use crate::model::{
    FailureOutcome, NewEvent, Page, PartitionKey, PartitionStatus, PendingDelivery, Published,
    ReplayRange, Replayed,
};
use crate::store::pages;
use crate::store::records;
use crate::store::{DeliveryLog, LeaseToken, StoreError, SubscriptionStore};

impl Inner {
    /// Whether the subscription exists, by a current copy of the set (refreshed if it is not
    /// in the copy: it may be younger).
    async fn subscribed(&self, id: &str) -> Result<bool, StoreError> {
        if self
            .subscription_set()
            .await?
            .subscriptions
            .contains_key(id)
        {
            return Ok(true);
        }
        Ok(self
            .refresh_subscriptions()
            .await?
            .subscriptions
            .contains_key(id))
    }

    /// Removes one pending (or dead-lettered) delivery and drops its reference to the event,
    /// deleting the event with its last reference. Returns false if it was not there.
    /// With `fence`, refused with `LeaseLost` unless the token holds the partition's lease.
    pub(super) async fn remove_delivery(
        &self,
        delivery_key: Item,
        topic: &str,
        sequence: u64,
        fence: Option<(&PartitionKey, &LeaseToken)>,
        extra: Option<TransactWriteItem>,
    ) -> Result<bool, StoreError> {
        let delete_delivery = || {
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(delivery_key.clone()))
                        .condition_expression("attribute_exists(pk)")
                        .build()
                        .expect("complete delete"),
                )
                .build()
        };
        let decrement = TransactWriteItem::builder()
            .update(
                Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::event_key(topic, sequence)))
                    .update_expression("ADD pending :minus_one")
                    .condition_expression("pending > :one")
                    .expression_attribute_values(":minus_one", n(-1))
                    .expression_attribute_values(":one", n(1))
                    .build()
                    .expect("complete update"),
            )
            .build();
        // Known to hold the last reference (the event had one when it was read): release the
        // event at once instead of learning it from a failed decrement. The release is
        // conditioned on the count, so a stale hint (a replay added a reference) only costs a
        // second try.
        let mut last_reference = self
            .events
            .lock()
            .expect("event cache lock")
            .pending(topic, sequence)
            == Some(1);
        // With the caller's item (counters) in the same transaction.
        let with_stats = |mut items: Vec<TransactWriteItem>| {
            items.extend(extra.clone());
            items
        };
        for _ in 0..MAX_CONFLICT_RETRIES {
            let items = if last_reference {
                vec![delete_delivery(), self.release_last(topic, sequence)]
            } else {
                vec![delete_delivery(), decrement.clone()]
            };
            let Some(reasons) = self.transact_fenced(with_stats(items), fence).await? else {
                return Ok(true);
            };
            if reasons.first().map(String::as_str) == Some("ConditionalCheckFailed") {
                return Ok(false);
            }
            // The event's condition failed: the count is not what was assumed.
            last_reference = !last_reference;
        }
        Err(StoreError::Contention(format!(
            "the references of event {topic}/{sequence} keep changing; try again"
        )))
    }

    /// Drops an event's last reference: deletes it, or with a retention window keeps it
    /// (count 0) until DynamoDB's TTL deletes it, counted from its sequence (a publish time).
    /// Conditioned on the count being at most one.
    fn release_last(&self, topic: &str, sequence: u64) -> TransactWriteItem {
        let key = schema::event_key(topic, sequence);
        if self.retention.is_zero() {
            return TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(key))
                        .condition_expression("attribute_not_exists(pending) OR pending <= :one")
                        .expression_attribute_values(":one", n(1))
                        .build()
                        .expect("complete delete"),
                )
                .build();
        }
        let expires = sequence / 1_000_000 + self.retention.as_secs();
        TransactWriteItem::builder()
            .update(
                Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(key))
                    .update_expression("SET pending = :zero, #ttl = :expires")
                    .condition_expression("attribute_exists(pk) AND pending <= :one")
                    .expression_attribute_names("#ttl", schema::TTL)
                    .expression_attribute_values(":zero", n(0))
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":expires", n(expires))
                    .build()
                    .expect("complete update"),
            )
            .build()
    }
}

#[async_trait]
impl DeliveryLog for DynamoStore {
    async fn publish(
        &self,
        event: &NewEvent,
        idempotency_window: Duration,
    ) -> Result<Published, StoreError> {
        super::publish::publish(&self.inner, event.clone(), idempotency_window).await
    }

    async fn next_deliveries(
        &self,
        partition: &PartitionKey,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        // The head blocked by a young unfinished fan-out is not waited for here (the worker
        // lingers and reads again, and the rescan looks again at topics with a fan-out open);
        // a head committed after the topic item was read is read again, a few times.
        if !self.subscribed(&partition.subscription_id).await? {
            // Deleted (what a publish racing its Unsubscribe wrote is not delivered).
            return Ok(Vec::new());
        }
        let mut rereads = 0;
        let fields = loop {
            let Some(horizon) = self.shared_horizon(&partition.topic).await? else {
                return Ok(Vec::new());
            };
            let items = self.query_after(&partition.encode(), None, limit).await?;
            let Some(head) = items.first() else {
                return Ok(Vec::new());
            };
            let mut fields = Vec::new();
            for item in &items {
                let delivery = schema::delivery_fields(item, false)?;
                if delivery.sequence >= horizon.limit() {
                    break;
                }
                fields.push(delivery);
            }
            if !fields.is_empty() {
                break fields;
            }
            // The head was committed after the topic was read: read again.
            if schema::get_sequence(head)? > horizon.last_sequence && rereads < 3 {
                rereads += 1;
                continue;
            }
            return Ok(Vec::new());
        };
        let sequences: Vec<u64> = fields.iter().map(|delivery| delivery.sequence).collect();
        let mut events = self.batch_get_events(&partition.topic, &sequences).await?;
        fields
            .into_iter()
            .map(|delivery| {
                let event = events.remove(&delivery.sequence).ok_or_else(|| {
                    StoreError::Internal(format!(
                        "delivery {partition}/{} has no event item",
                        delivery.sequence
                    ))
                })?;
                Ok(schema::pending_delivery(partition, delivery, event))
            })
            .collect()
    }

    async fn complete_delivery(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        // A worker's completion carries the partition's success counters when they are due.
        let stats = fence.and_then(|_| self.success_stats(partition));
        let wrote_stats = stats.is_some();
        let fence = fence.map(|token| (partition, token));
        let removed = self
            .remove_delivery(
                schema::delivery_key(partition, sequence),
                &partition.topic,
                sequence,
                fence,
                stats,
            )
            .await;
        match removed {
            Ok(true) => Ok(()),
            // Skipped by an operator while its attempt was in flight, which then succeeded:
            // the dead letter was delivered (a retried completion finds neither: a no-op).
            Ok(false) => self
                .remove_delivery(
                    schema::dead_key(partition, sequence),
                    &partition.topic,
                    sequence,
                    fence,
                    Some(self.dead_letters_added(partition, -1)),
                )
                .await
                .map(|_| ()),
            Err(error) => {
                if wrote_stats {
                    // Not written: the next completion carries them.
                    self.forget_stats(partition);
                }
                Err(error)
            }
        }
    }

    async fn record_failure(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        attempt: u32,
        error: &str,
        outcome: FailureOutcome,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        let mut holder = records::DeliveryRecord::new(0, 0);
        holder.set_error(error);
        let error = holder.last_error.unwrap_or_default();
        let fence = fence.map(|token| (partition, token));
        let items = match outcome {
            FailureOutcome::RetryAt(at) => {
                let update = Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::delivery_key(partition, sequence)))
                    .update_expression(
                        "SET attempts = :attempt, next_attempt_at = :at, last_error = :error",
                    )
                    // The count the attempt began with: a call repeated after an ambiguous
                    // error (its first try committed) counts the attempt once, and a count
                    // reset since (a redrive) stays reset.
                    .condition_expression("attribute_exists(pk) AND attempts = :before")
                    .expression_attribute_values(":attempt", n(attempt))
                    .expression_attribute_values(":before", n(attempt.saturating_sub(1)))
                    .expression_attribute_values(":at", n(at))
                    .expression_attribute_values(":error", s(error))
                    .build()
                    .expect("complete update");
                vec![
                    TransactWriteItem::builder().update(update).build(),
                    self.failure_stats(partition, false),
                ]
            }
            FailureOutcome::DeadLetter => {
                let Some(item) = self
                    .get_item(schema::delivery_key(partition, sequence))
                    .await?
                else {
                    return Ok(());
                };
                if get_n(&item, "attempts")? != u64::from(attempt.saturating_sub(1)) {
                    return Ok(());
                }
                let mut dead = item.clone();
                dead.extend(schema::dead_key(partition, sequence));
                dead.insert("attempts".into(), n(attempt));
                dead.insert("last_error".into(), s(error));
                let mut items = self.bury(partition, sequence, dead);
                items.push(self.failure_stats(partition, true));
                items
            }
        };
        // A cancellation for the delivery's own condition means it is no longer pending.
        self.transact_fenced(items, fence).await.map(|_| ())
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
        let subscription = self.get_subscription(subscription_id).await?;
        let topics = match topic {
            Some(topic) => vec![topic.to_string()],
            None => self
                .topics()
                .await?
                .into_iter()
                .filter(|topic| subscription.matches(topic))
                .collect(),
        };
        let wanted = page_size + 1;
        let mut items = Vec::new();
        for topic in topics {
            if items.len() >= wanted {
                break;
            }
            let start = match &after {
                Some((token_topic, _)) if topic < *token_topic => continue,
                Some((token_topic, sequence)) if topic == *token_topic => {
                    Some(schema::sequence_key(*sequence))
                }
                _ => None,
            };
            let partition = PartitionKey::new(topic.as_str(), subscription_id);
            let left = wanted - items.len();
            let live = if dead_only {
                Vec::new()
            } else {
                self.query_after(&partition.encode(), start.as_deref(), left)
                    .await?
            };
            let dead = self
                .query_after(&schema::dead_pk(&partition), start.as_deref(), left)
                .await?;
            let mut merged = Vec::new();
            for item in &live {
                merged.push(schema::delivery_fields(item, false)?);
            }
            for item in &dead {
                merged.push(schema::delivery_fields(item, true)?);
            }
            merged.sort_by_key(|delivery| delivery.sequence);
            merged.truncate(left);
            let sequences: Vec<u64> = merged.iter().map(|delivery| delivery.sequence).collect();
            let mut events = self.batch_get_events(&topic, &sequences).await?;
            for delivery in merged {
                let Some(event) = events.remove(&delivery.sequence) else {
                    continue;
                };
                items.push(schema::pending_delivery(&partition, delivery, event));
            }
        }
        Ok(pages::pending_page(items, page_size))
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
        let subscription = self.get_subscription(subscription_id).await?;
        self.inner
            .partition_status(&subscription, page_size, after)
            .await
    }

    async fn redrive(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        self.inner.redrive(partition, sequences).await
    }

    async fn purge(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        self.inner.purge(partition, sequences).await
    }

    async fn replay(
        &self,
        partition: &PartitionKey,
        range: &ReplayRange,
    ) -> Result<Replayed, StoreError> {
        self.inner.replay(partition, range).await
    }

    async fn retry_now(&self, partition: &PartitionKey) -> Result<Option<u64>, StoreError> {
        self.inner.retry_now(partition).await
    }

    async fn skip_head(&self, partition: &PartitionKey, sequence: u64) -> Result<(), StoreError> {
        self.inner.skip_head(partition, sequence).await
    }

    /// The first call probes every partition of every topic. Later calls probe only the
    /// partitions of topics published since the previous call (or with a fan-out open then),
    /// plus those whose lease ran out (an instance that stopped renewing or handed over), so an
    /// idle fleet costs a few requests per rescan. Expired leases are looked at first and a
    /// failure of one part does not stop the other; then a bounded share of what interrupted
    /// unsubscribes left is removed.
    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError> {
        let set = self.refresh_subscriptions().await?;
        let mut found = std::collections::BTreeSet::new();
        let leases = self.expired_leases(&set, &mut found).await;
        // If the lease shards could not be read, probe every partition of changed topics.
        let leased = leases.as_ref().cloned().unwrap_or_default();
        let topics = self.changed_topics(&set, &leased, &mut found).await;
        if let Err(error) = self.finish_unsubscribes(SWEEP_BUDGET).await {
            // Left for the next rescan.
            tracing::warn!(%error, "cannot finish an interrupted unsubscribe yet");
        }
        match (leases.map(|_| ()), topics) {
            (Err(error), Err(_)) => Err(error),
            (Err(error), Ok(())) | (Ok(()), Err(error)) => {
                tracing::warn!(%error, "rescan incomplete; the next one tries again");
                Ok(found.into_iter().collect())
            }
            (Ok(()), Ok(())) => Ok(found.into_iter().collect()),
        }
    }
}
