//! The operator's calls on DynamoDB: changing a subscription in place (pause, resume), a
//! partition's status, retry-now and skip; and the per-partition counters the status reads.
//!
//! # What the status costs
//! A partition's backlog is not counted: every delivery carries its event's ordinal (the
//! topic's count of events when it was published), and a partition receives every event of
//! its topic from its first one on, so its backlog is `tail ordinal - head ordinal + 1`: two
//! single-item queries. Deliveries written before ordinals existed are counted instead. The
//! counters that change only on failures (dead letters, consecutive failures, last failure)
//! are written with the failure; the last success time is written with a completion that
//! ends a run of failures, and otherwise at most once a minute per partition and instance, so
//! a busy partition's completions stay one-item-lighter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{ConditionCheck, Delete, Put, Select, TransactWriteItem, Update};

use super::errors::{
    cancellation_reasons, conflict_pause, is_condition_failure, refused, sdk_error,
};
use super::schema::{self, Item, get_n, get_s, n, s};
use super::subscriptions::{Tracking, check_tracked};
use super::unsubscribe::Removal;
use super::{Inner, MAX_CONFLICT_RETRIES};
use crate::model::{
    HeadStatus, Page, PartitionKey, PartitionStatus, Redelivery, ReplayRange, Replayed,
    Subscription, now_micros, now_millis,
};
use crate::store::delivery_log::{SKIPPED, head_moved, replay_sequences};
use crate::store::pages;
use crate::store::records;
use crate::store::subscriptions::unchanged_identity;
use crate::store::{StoreError, SubscriptionUpdate, Updated};

/// How often a busy partition's completions also write its last success time.
const STATS_REFRESH: Duration = Duration::from_secs(60);
/// Partitions whose last stats write this instance remembers, at most.
const STATS_MEMORY: usize = 100_000;
/// Redriven deliveries at a partition's front counted one by one, at most (beyond, the
/// backlog is counted).
const REDRIVEN_COUNTED: usize = 100;
/// Dead letters moved per transaction (two items each, and the counter).
const REDRIVE_CHUNK: usize = 49;

impl Inner {
    /// The counters update that goes with a failed attempt (and, with `dead_lettered`, a new
    /// dead letter).
    pub(super) fn failure_stats(
        &self,
        partition: &PartitionKey,
        dead_lettered: bool,
    ) -> TransactWriteItem {
        // The next success ends a run of failures: it writes its counters.
        self.stats_written
            .lock()
            .expect("stats lock")
            .remove(partition);
        let expression = if dead_lettered {
            "ADD consecutive_failures :one, dead_letters :one SET last_failure_at = :now"
        } else {
            "ADD consecutive_failures :one SET last_failure_at = :now"
        };
        self.stats_update(partition, expression)
    }

    /// The counters update that goes with a completion, when one is due (see the module doc).
    pub(super) fn success_stats(&self, partition: &PartitionKey) -> Option<TransactWriteItem> {
        let mut written = self.stats_written.lock().expect("stats lock");
        if written
            .get(partition)
            .is_some_and(|at| at.elapsed() < STATS_REFRESH)
        {
            return None;
        }
        if written.len() >= STATS_MEMORY {
            written.clear();
        }
        written.insert(partition.clone(), Instant::now());
        drop(written);
        Some(self.stats_update(
            partition,
            "SET consecutive_failures = :zero, last_success_at = :now",
        ))
    }

    fn stats_update(&self, partition: &PartitionKey, expression: &str) -> TransactWriteItem {
        let mut update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(schema::stats_key(partition)))
            .update_expression(expression)
            .expression_attribute_values(":now", n(now_millis()));
        if expression.contains(":one") {
            update = update.expression_attribute_values(":one", n(1));
        }
        if expression.contains(":zero") {
            update = update.expression_attribute_values(":zero", n(0));
        }
        TransactWriteItem::builder()
            .update(update.build().expect("complete update"))
            .build()
    }

    /// Applies `update` to the stored subscription with the version item moved in the same
    /// transaction (so every instance's copy of the set is refreshed within its validity);
    /// returns the new value and the validity to wait out before the caller may count on
    /// every instance seeing it.
    ///
    /// A change of topics or filter makes the subscription tracked (see [`Tracking`]) from
    /// the new version on; a change of topics also leaves a removal record (see
    /// `unsubscribe`) for the partitions the new patterns no longer match, returned here to be
    /// worked off once the change has settled.
    pub(super) async fn update_subscription(
        &self,
        id: &str,
        update: &SubscriptionUpdate,
    ) -> Result<(Subscription, Option<Duration>, Option<Removal>), StoreError> {
        let _one_at_a_time = self.changes.lock().await;
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let Some(item) = self.get_item(schema::subscription_key(id)).await? else {
                return Err(StoreError::NotFound(format!("subscription {id}")));
            };
            let data = get_s(&item, "data")?.to_string();
            let current = records::decode_subscription(data.as_bytes(), "subscription")?;
            let mut updated = current.clone();
            update(&mut updated)?;
            unchanged_identity(&current, &updated)?;
            if updated == current {
                // Nothing to write, but the change that made it so (a retried call's own
                // first try, or another caller's) may be younger than other instances'
                // copies: wait them out all the same.
                let validity = self.subscription_set().await?.validity;
                return Ok((updated, Some(validity), None));
            }
            let meta = self.read_meta().await?;
            let created = get_n(&item, "version")?;
            let mut tracking = Tracking::of_item(&item, &current, created)?;
            let retargeted = updated.topics != current.topics || updated.filter != current.filter;
            if retargeted && tracking.is_none() {
                let tracked = self.subscription_set().await?.tracked.len();
                check_tracked(tracked, self.tracked_limit)?;
                tracking = Some(Tracking {
                    since: meta.version + 1,
                    topics_before: current.topics.clone(),
                });
            }
            let mut replacement = item;
            replacement.insert(
                "data".into(),
                s(String::from_utf8(records::encode_subscription(&updated))
                    .expect("JSON is UTF-8")),
            );
            if let Some(tracking) = &tracking {
                replacement.insert("tracked_since".into(), n(tracking.since));
                replacement.insert(
                    "topics_before".into(),
                    s(serde_json::to_string(&tracking.topics_before).expect("JSON")),
                );
            }
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(replacement))
                .condition_expression("#data = :old")
                .expression_attribute_names("#data", "data")
                .expression_attribute_values(":old", s(data))
                .build()
                .expect("complete put");
            let mut items = vec![
                self.bump_version(meta.version),
                TransactWriteItem::builder().put(put).build(),
            ];
            let removal = (updated.topics != current.topics).then(|| Removal {
                key: format!("{id}#topics#{}", meta.version + 1),
                subscription: current.clone(),
                kept: updated.topics.clone(),
                version: meta.version + 1,
                through: now_micros()
                    + super::subscriptions::settle_time(meta.validity).as_micros() as u64,
            });
            if let Some(removal) = &removal {
                items.push(self.put(removal.item(now_millis())));
            }
            let sent = Instant::now();
            match self.transact(items).await {
                Ok(()) => {
                    self.apply_own_change(meta.version, sent, |set| {
                        set.insert(&updated, created, tracking.clone());
                    });
                    return Ok((updated, Some(meta.validity), removal));
                }
                Err(error) => match cancellation_reasons(&error) {
                    Some(reasons) => {
                        if let Some(error) = refused(&reasons) {
                            return Err(error);
                        }
                        // Another change moved the version or the subscription: read again.
                        conflict_pause(attempt).await;
                    }
                    None => return Err(sdk_error(error)),
                },
            }
        }
        Err(StoreError::Contention(
            "too many concurrent subscription changes; nothing was written".into(),
        ))
    }

    /// The partition's first delivery item, if any.
    async fn head_item(&self, partition: &PartitionKey) -> Result<Option<Item>, StoreError> {
        Ok(self
            .query_after(&partition.encode(), None, 1)
            .await?
            .into_iter()
            .next())
    }

    /// The partition's last delivery item, if any.
    async fn tail_item(&self, partition: &PartitionKey) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(partition.encode()))
            .consistent_read(true)
            .scan_index_forward(false)
            .limit(1)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(output.items.unwrap_or_default().into_iter().next())
    }

    /// Counts a partition's deliveries (for deliveries written before ordinals existed).
    async fn count_deliveries(&self, partition: &PartitionKey) -> Result<u64, StoreError> {
        let mut count = 0;
        let mut start = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(partition.encode()))
                .select(Select::Count)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            count += output.count.max(0) as u64;
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(count),
            }
        }
    }

    /// The backlog between the head and the tail item (see the module doc). Redriven
    /// deliveries sit in front of the others, out of the ordinals' run: up to a page of them
    /// is counted, then the run is measured from the first delivery that is not one.
    async fn backlog(
        &self,
        partition: &PartitionKey,
        head: Option<&Item>,
    ) -> Result<u64, StoreError> {
        let Some(head) = head else {
            return Ok(0);
        };
        let Some(tail) = self.tail_item(partition).await? else {
            return Ok(0);
        };
        let mut first = head.clone();
        let mut redriven = 0;
        if head.contains_key("redelivery") {
            let front = self
                .query_after(&partition.encode(), None, REDRIVEN_COUNTED)
                .await?;
            redriven = front
                .iter()
                .take_while(|item| item.contains_key("redelivery"))
                .count() as u64;
            match front.into_iter().nth(redriven as usize) {
                Some(item) => first = item,
                None if redriven < REDRIVEN_COUNTED as u64 => return Ok(redriven),
                None => return self.count_deliveries(partition).await,
            }
        }
        let (start, end) = (get_n(&first, "ordinal")?, get_n(&tail, "ordinal")?);
        if start > 0 && end >= start {
            return Ok(redriven + end - start + 1);
        }
        self.count_deliveries(partition).await
    }

    /// The dead letters of a partition that `sequences` names (all if `None`); `NotFound`
    /// if a named one is not there.
    async fn dead_items(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<Vec<Item>, StoreError> {
        let Some(sequences) = sequences else {
            return self
                .query_after(&schema::dead_pk(partition), None, usize::MAX)
                .await;
        };
        let mut wanted: Vec<u64> = sequences.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let items = self
            .batch_get(
                wanted
                    .iter()
                    .map(|sequence| schema::dead_key(partition, *sequence))
                    .collect(),
            )
            .await?;
        let found: std::collections::HashSet<u64> = items
            .iter()
            .map(schema::get_sequence)
            .collect::<Result<_, _>>()?;
        if let Some(missing) = wanted.iter().find(|sequence| !found.contains(sequence)) {
            return Err(StoreError::NotFound(format!(
                "dead letter {partition}/{missing}"
            )));
        }
        Ok(items)
    }

    /// Moves dead letters back in front of the partition's deliveries, a transaction per
    /// chunk (each with its counter update); see [`crate::store::DeliveryLog::redrive`].
    pub(super) async fn redrive(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        let items = self.dead_items(partition, sequences).await?;
        let now = now_millis();
        let mut moved = 0;
        for chunk in items.chunks(REDRIVE_CHUNK) {
            let mut writes = Vec::new();
            for dead in chunk {
                let sequence = schema::get_sequence(dead)?;
                let mut delivery = dead.clone();
                delivery.extend(schema::delivery_key(partition, sequence));
                delivery.insert("attempts".into(), n(0));
                delivery.insert("next_attempt_at".into(), n(now));
                delivery.insert("redelivery".into(), s(Redelivery::Redrive.name()));
                writes.push(self.delete_existing(schema::dead_key(partition, sequence)));
                writes.push(
                    TransactWriteItem::builder()
                        .put(
                            Put::builder()
                                .table_name(&self.table)
                                .set_item(Some(delivery))
                                .build()
                                .expect("complete put"),
                        )
                        .build(),
                );
            }
            writes.push(self.dead_letters_added(partition, -(chunk.len() as i64)));
            if self.transact_fenced(writes, None).await?.is_some() {
                return Err(StoreError::Contention(format!(
                    "dead letters of {partition} changed meanwhile; {moved} were redriven, \
                     look again and retry"
                )));
            }
            moved += chunk.len() as u64;
        }
        Ok(moved)
    }

    /// Deletes dead letters (and events no longer referenced), each with its counter update.
    pub(super) async fn purge(
        &self,
        partition: &PartitionKey,
        sequences: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        let mut purged = 0;
        for dead in self.dead_items(partition, sequences).await? {
            let sequence = schema::get_sequence(&dead)?;
            let counter = self.dead_letters_added(partition, -1);
            if self
                .remove_delivery(
                    schema::dead_key(partition, sequence),
                    &partition.topic,
                    sequence,
                    None,
                    Some(counter),
                )
                .await?
            {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Items of `pk` with sort keys in `[low, high]`, in order, at most `limit`, with only
    /// the attributes `projection` names (`#attributes` for `attributes`, a reserved word).
    async fn query_between(
        &self,
        pk: &str,
        (low, high): (u64, u64),
        limit: usize,
        projection: &str,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        while items.len() < limit {
            let query = self.client.query();
            let query = if projection.contains("#attributes") {
                query.expression_attribute_names("#attributes", "attributes")
            } else {
                query
            };
            let output = query
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :low AND :high")
                .expression_attribute_values(":pk", s(pk))
                .expression_attribute_values(":low", s(schema::sequence_key(low)))
                .expression_attribute_values(":high", s(schema::sequence_key(high)))
                .projection_expression(projection)
                .consistent_read(true)
                .limit((limit - items.len()).min(1000) as i32)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            items.extend(output.items.unwrap_or_default());
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        Ok(items)
    }

    /// The sequence of the topic's last kept event before `sequence` (0 if none).
    async fn event_before(&self, topic: &str, sequence: u64) -> Result<u64, StoreError> {
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk < :before")
            .expression_attribute_values(":pk", s(schema::event_pk(topic)))
            .expression_attribute_values(":before", s(schema::sequence_key(sequence)))
            .consistent_read(true)
            .scan_index_forward(false)
            .limit(1)
            .projection_expression("pk, sk")
            .send()
            .await
            .map_err(sdk_error)?;
        match output.items.unwrap_or_default().first() {
            Some(item) => schema::get_sequence(item),
            None => Ok(0),
        }
    }

    /// Queues retained events of `range` again (see [`crate::store::DeliveryLog::replay`]):
    /// each event's count goes up and its expiry is lifted in the transaction that writes its
    /// delivery, in transactions of [`REDRIVE_CHUNK`].
    pub(super) async fn replay(
        &self,
        partition: &PartitionKey,
        range: &ReplayRange,
    ) -> Result<Replayed, StoreError> {
        let topic = partition.topic.as_str();
        let (low, high) = replay_sequences(range);
        let mut replayed = Replayed::default();
        if low > high {
            return Ok(replayed);
        }
        // Not the payloads: the transaction checks that each is still there.
        let events = self
            .query_between(
                &schema::event_pk(topic),
                (low, high),
                range.limit + 1,
                "pk, sk, published_at, ordinal, expires_at_ttl, #attributes",
            )
            .await?;
        let filter = range.compiled_filter()?;
        let now_seconds = now_millis() / 1000;
        let mut previous = self.event_before(topic, low).await?;
        let mut chosen = Vec::new();
        for item in &events {
            let sequence = schema::get_sequence(item)?;
            let expired = item.contains_key(schema::TTL) && get_n(item, schema::TTL)? < now_seconds;
            let published_at = get_n(item, "published_at")?;
            if let Some(filter) = &filter {
                let attributes =
                    serde_json::from_str(get_s(item, "attributes")?).map_err(|_| {
                        StoreError::Corrupt(format!("attributes of {topic}/{sequence}"))
                    })?;
                if !filter.matches(&crate::filter::Bindings::new(topic, &attributes)) {
                    continue;
                }
            }
            if expired || published_at < range.from_time {
                previous = sequence;
                continue;
            }
            if published_at > range.to_time {
                continue;
            }
            if chosen.len() >= range.limit {
                replayed.next_sequence = Some(sequence);
                break;
            }
            chosen.push((sequence, previous, get_n(item, "ordinal")?));
            previous = sequence;
        }
        // The read stopped at its cap with events left out (expired, or outside the times):
        // the range goes on after the last one read.
        if replayed.next_sequence.is_none()
            && events.len() > range.limit
            && let Some(last) = events.last()
        {
            replayed.next_sequence = Some(schema::get_sequence(last)?.saturating_add(1));
        }
        let (Some(first), Some(last)) = (chosen.first(), chosen.last()) else {
            return Ok(replayed);
        };
        let mut taken = std::collections::HashSet::new();
        for pk in [partition.encode(), schema::dead_pk(partition)] {
            for item in self
                .query_between(&pk, (first.0, last.0), usize::MAX, "pk, sk")
                .await?
            {
                taken.insert(schema::get_sequence(&item)?);
            }
        }
        let now = now_millis();
        // Queued under the set as it is now: a topic removal older than that keeps them.
        let set_version = self.read_meta().await?.version;
        let fresh: Vec<_> = chosen
            .into_iter()
            .filter(|(sequence, ..)| {
                let pending = taken.contains(sequence);
                if pending {
                    replayed.skipped += 1;
                }
                !pending
            })
            .collect();
        for chunk in fresh.chunks(REDRIVE_CHUNK) {
            let mut writes = Vec::new();
            for (sequence, previous, ordinal) in chunk {
                let reference = Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::event_key(topic, *sequence)))
                    .update_expression("ADD pending :one REMOVE #ttl")
                    .condition_expression("attribute_exists(payload)")
                    .expression_attribute_names("#ttl", schema::TTL)
                    .expression_attribute_values(":one", n(1))
                    .build()
                    .expect("complete update");
                let mut delivery = schema::delivery_item(
                    partition,
                    *sequence,
                    *previous,
                    now,
                    *ordinal,
                    set_version,
                );
                delivery.insert("redelivery".into(), s(Redelivery::Replay.name()));
                let put = Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(delivery))
                    .condition_expression("attribute_not_exists(pk)")
                    .build()
                    .expect("complete put");
                writes.push(TransactWriteItem::builder().update(reference).build());
                writes.push(TransactWriteItem::builder().put(put).build());
            }
            if self.transact_fenced(writes, None).await?.is_some() {
                return Err(StoreError::Contention(format!(
                    "partition {partition} or its events changed during the replay; {} were \
                     queued, look again and retry from the next",
                    replayed.count
                )));
            }
            replayed.count += chunk.len() as u64;
        }
        Ok(replayed)
    }

    /// The writes that move a delivery to the partition's dead letters as `dead` (the
    /// delivery item with its dead-letter key): refused if the delivery is gone.
    pub(super) fn bury(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        dead: Item,
    ) -> Vec<TransactWriteItem> {
        vec![
            self.delete_existing(schema::delivery_key(partition, sequence)),
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(dead))
                        .build()
                        .expect("complete put"),
                )
                .build(),
        ]
    }

    fn delete_existing(&self, key: Item) -> TransactWriteItem {
        TransactWriteItem::builder()
            .delete(
                Delete::builder()
                    .table_name(&self.table)
                    .set_key(Some(key))
                    .condition_expression("attribute_exists(pk)")
                    .build()
                    .expect("complete delete"),
            )
            .build()
    }

    /// Forgets that the success counters of `partition` were written (their write failed).
    pub(super) fn forget_stats(&self, partition: &PartitionKey) {
        self.stats_written
            .lock()
            .expect("stats lock")
            .remove(partition);
    }

    /// Moves the partition's dead-letter counter by `change`.
    pub(super) fn dead_letters_added(
        &self,
        partition: &PartitionKey,
        change: i64,
    ) -> TransactWriteItem {
        TransactWriteItem::builder()
            .update(
                Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::stats_key(partition)))
                    .update_expression("ADD dead_letters :change")
                    .expression_attribute_values(":change", n(change))
                    .build()
                    .expect("complete update"),
            )
            .build()
    }

    pub(super) async fn partition_status(
        &self,
        subscription: &Subscription,
        page_size: usize,
        after: Option<String>,
    ) -> Result<Page<PartitionStatus>, StoreError> {
        let mut topics: Vec<String> = self
            .topics()
            .await?
            .into_iter()
            .filter(|topic| subscription.matches(topic))
            .filter(|topic| after.as_ref().is_none_or(|after| topic > after))
            .collect();
        topics.truncate(page_size + 1);
        let partitions: Vec<PartitionKey> = topics
            .iter()
            .map(|topic| PartitionKey::new(topic.as_str(), subscription.id.as_str()))
            .collect();
        let mut stats = std::collections::HashMap::new();
        for item in self
            .batch_get(partitions.iter().map(schema::stats_key).collect())
            .await?
        {
            stats.insert(get_s(&item, schema::PK)?.to_string(), item);
        }
        let mut items = Vec::new();
        for partition in partitions {
            let head_item = self.head_item(&partition).await?;
            let pending = self.backlog(&partition, head_item.as_ref()).await?;
            let head = match head_item {
                Some(item) => {
                    let fields = schema::delivery_fields(&item, false)?;
                    let published_at = self
                        .batch_get_events(&partition.topic, &[fields.sequence])
                        .await?
                        .remove(&fields.sequence)
                        .map_or(0, |event| event.published_at);
                    Some(HeadStatus {
                        sequence: fields.sequence,
                        published_at,
                        state: fields.state,
                        last_error: fields.last_error,
                    })
                }
                None => None,
            };
            let counters = stats.get(get_s(&schema::stats_key(&partition), schema::PK)?);
            let counter = |name: &str| counters.map_or(Ok(0), |item| schema::get_count(item, name));
            items.push(PartitionStatus {
                pending,
                dead_letters: counter("dead_letters")?,
                head,
                consecutive_failures: counter("consecutive_failures")?,
                last_success_at: counter("last_success_at")?,
                last_failure_at: counter("last_failure_at")?,
                partition,
            });
        }
        Ok(pages::partition_page(items, page_size))
    }

    pub(super) async fn retry_now(
        &self,
        partition: &PartitionKey,
    ) -> Result<Option<u64>, StoreError> {
        let Some(head) = self.head_item(partition).await? else {
            return Ok(None);
        };
        let sequence = schema::get_sequence(&head)?;
        let now = now_millis();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(schema::delivery_key(partition, sequence)))
            .update_expression("SET next_attempt_at = :now")
            .condition_expression("attribute_exists(pk) AND next_attempt_at > :now")
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match result {
            // Already due, or completed meanwhile: nothing to cut short.
            Ok(_) => Ok(Some(sequence)),
            Err(error) if is_condition_failure(&error) => Ok(Some(sequence)),
            Err(error) => Err(sdk_error(error)),
        }
    }

    pub(super) async fn skip_head(
        &self,
        partition: &PartitionKey,
        sequence: u64,
    ) -> Result<(), StoreError> {
        // This event's fan-out, if open and old enough to be repaired, is finished first, so
        // that a skip retried after one that was refused below goes through.
        self.finish_stale_fanout(&partition.topic, sequence).await?;
        let head = self.head_item(partition).await?;
        let head_sequence = head.as_ref().map(schema::get_sequence).transpose()?;
        let Some(item) = head.filter(|_| head_sequence == Some(sequence)) else {
            return Err(head_moved(partition, sequence, head_sequence));
        };
        let mut dead = item;
        dead.extend(schema::dead_key(partition, sequence));
        dead.insert("last_error".into(), s(SKIPPED));
        let mut items = self.bury(partition, sequence, dead);
        items.push(self.stats_update(
            partition,
            "ADD dead_letters :one SET last_failure_at = :now",
        ));
        // The event's fan-out must be closed: while it is being written, it (or its repair)
        // writes every delivery of the event, this one included, and would undo the skip.
        let closed = items.len();
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(schema::topic_key(&partition.topic)))
            .condition_expression(
                "attribute_not_exists(open_fanouts) OR NOT contains(open_fanouts, :sequence)",
            )
            .expression_attribute_values(":sequence", n(sequence))
            .build()
            .expect("complete condition check");
        items.push(TransactWriteItem::builder().condition_check(check).build());
        match self.transact_fenced(items, None).await? {
            None => Ok(()),
            Some(reasons)
                if reasons.get(closed).map(String::as_str) == Some("ConditionalCheckFailed") =>
            {
                Err(StoreError::Unavailable(format!(
                    "sequence {sequence} of topic `{}` is still being fanned out to its \
                     subscriptions; skip it again in a moment",
                    partition.topic
                )))
            }
            // Completed (or dead-lettered) between the read and the write.
            Some(_) => Err(head_moved(partition, sequence, None)),
        }
    }
}

/// Runs an update and waits out the other instances' copies of the set if it wrote.
pub(super) async fn update_and_settle(
    inner: Arc<Inner>,
    id: String,
    update: SubscriptionUpdate,
) -> Result<Updated, StoreError> {
    // A topic dropped by an earlier update whose removal was left to a sweep (it failed
    // halfway) is worked off first: added back now, its old backlog would otherwise be sent.
    inner.finish_removals_of(&id).await;
    let (subscription, validity, removal) = inner.update_subscription(&id, &update).await?;
    if let Some(validity) = validity {
        tokio::time::sleep(super::subscriptions::settle_time(validity)).await;
    }
    let dropped = match removal {
        Some(removal) if inner.injected_removal_failure() => {
            return Err(StoreError::Partial(format!(
                "subscription {id} is updated; the removal of its old topics' deliveries \
                 failed (injected fault); any instance finishes it ({})",
                removal.key
            )));
        }
        Some(removal) => inner.finish_removal(&removal).await?,
        None => 0,
    };
    Ok(Updated {
        subscription,
        dropped,
    })
}
