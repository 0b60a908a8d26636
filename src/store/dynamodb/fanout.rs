//! Fan-outs larger than one transaction: the rest of the deliveries written behind an "open
//! fan-out" mark on the topic, the delivery horizon every reader respects, and finishing a
//! fan-out whose publisher died (called from the read path, by any instance).

use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, TransactWriteItem};

use super::errors::{cancellation_reasons, sdk_error};
use super::publish::{TopicState, previous_sequences};
use super::schema::{self, Item, get_n, n};
use super::{Inner, TRANSACTION_LIMIT};
use crate::model::{PartitionKey, now_micros};
use crate::store::StoreError;

/// What a worker may deliver of a topic.
#[derive(Debug, Clone, Copy)]
pub(super) struct Horizon {
    /// The topic's last committed sequence.
    pub last_sequence: u64,
    /// The smallest sequence whose fan-out is unfinished.
    pub oldest_open: Option<u64>,
}

impl Horizon {
    /// The first sequence that may not be delivered yet.
    pub fn limit(&self) -> u64 {
        self.oldest_open
            .unwrap_or(u64::MAX)
            .min(self.last_sequence.saturating_add(1))
    }
}

impl Inner {
    /// Writes the remaining deliveries of an open fan-out, then closes it. Every write is
    /// conditional on the fan-out still being open, so a publisher that resumes after another
    /// instance finished its fan-out cannot bring back deliveries that were already made.
    pub(super) async fn write_open_fanout(
        &self,
        topic: &str,
        sequence: u64,
        deliveries: Vec<Item>,
    ) -> Result<(), StoreError> {
        for chunk in deliveries.chunks(TRANSACTION_LIMIT - 1) {
            let check = ConditionCheck::builder()
                .table_name(&self.table)
                .set_key(Some(schema::topic_key(topic)))
                .condition_expression("contains(open_fanouts, :sequence)")
                .expression_attribute_values(":sequence", n(sequence))
                .build()
                .expect("complete condition check");
            let mut items = vec![TransactWriteItem::builder().condition_check(check).build()];
            items.extend(chunk.iter().cloned().map(|item| self.put(item)));
            if let Err(error) = self.transact(items).await {
                return match cancellation_reasons(&error) {
                    // Someone else finished it.
                    Some(reasons)
                        if reasons.first().map(String::as_str)
                            == Some("ConditionalCheckFailed") =>
                    {
                        Ok(())
                    }
                    _ => Err(sdk_error(error)),
                };
            }
        }
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(schema::topic_key(topic)))
            .update_expression("DELETE open_fanouts :open")
            .expression_attribute_values(":open", AttributeValue::Ns(vec![sequence.to_string()]))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    /// The first sequence of `topic` that a worker may not deliver yet: one past the last
    /// sequence committed, or the smallest sequence whose fan-out is unfinished if lower.
    /// Finishes an unfinished fan-out older than the repair delay first. `None` if the topic
    /// has never been published.
    ///
    /// Read this before the deliveries: every event at or below the returned last sequence is
    /// then either fully fanned out before the read of the deliveries, or still open here.
    pub(super) async fn delivery_horizon(
        &self,
        topic: &str,
    ) -> Result<Option<Horizon>, StoreError> {
        for _ in 0..3 {
            let Some(item) = self.get_item(schema::topic_key(topic)).await? else {
                return Ok(None);
            };
            let last_sequence = get_n(&item, "last_seq")?;
            let oldest_open = match item.get("open_fanouts") {
                Some(AttributeValue::Ns(open)) => open
                    .iter()
                    .filter_map(|sequence| sequence.parse::<u64>().ok())
                    .min(),
                _ => None,
            };
            match oldest_open {
                Some(oldest)
                    if Duration::from_micros(now_micros().saturating_sub(oldest))
                        >= self.repair_after =>
                {
                    self.finish_fanout(topic, oldest).await?;
                }
                _ => {
                    return Ok(Some(Horizon {
                        last_sequence,
                        oldest_open,
                    }));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "cannot finish the fan-outs of {topic}"
        )))
    }

    /// The sequences of `topic`'s fan-outs still open.
    async fn open_fanouts(&self, topic: &str) -> Result<Vec<u64>, StoreError> {
        let Some(item) = self.get_item(schema::topic_key(topic)).await? else {
            return Ok(Vec::new());
        };
        Ok(match item.get("open_fanouts") {
            Some(AttributeValue::Ns(open)) => open
                .iter()
                .filter_map(|sequence| sequence.parse::<u64>().ok())
                .collect(),
            _ => Vec::new(),
        })
    }

    /// Finishes the fan-out of `sequence` if it is open and older than the repair delay (a
    /// younger one is probably still being written by its publisher).
    pub(super) async fn finish_stale_fanout(
        &self,
        topic: &str,
        sequence: u64,
    ) -> Result<(), StoreError> {
        let stale =
            Duration::from_micros(now_micros().saturating_sub(sequence)) >= self.repair_after;
        if stale && self.open_fanouts(topic).await?.contains(&sequence) {
            self.finish_fanout(topic, sequence).await?;
        }
        Ok(())
    }

    /// Finishes every open fan-out of `topic` up to `through` now, whatever its age: once a
    /// fan-out is closed neither its publisher nor a repair writes to it again (every such
    /// write checks that it is open), so a removal that sweeps the topic's partitions after
    /// this cannot see a delivery it removed written back.
    pub(super) async fn finish_open_fanouts(
        &self,
        topic: &str,
        through: u64,
    ) -> Result<(), StoreError> {
        for sequence in self.open_fanouts(topic).await? {
            if sequence <= through {
                self.finish_fanout(topic, sequence).await?;
            }
        }
        Ok(())
    }

    /// Rewrites every delivery of an unfinished fan-out, recomputed from its event item's
    /// fan-out record (an event written by an earlier version lists them instead), then
    /// closes it.
    async fn finish_fanout(&self, topic: &str, sequence: u64) -> Result<(), StoreError> {
        tracing::warn!(
            topic,
            sequence,
            "finishing a fan-out left unfinished by its publisher"
        );
        let deliveries = match self.get_item(schema::event_key(topic, sequence)).await? {
            Some(event) => self.fanout_deliveries(topic, sequence, &event).await?,
            None => Vec::new(),
        };
        self.write_open_fanout(topic, sequence, deliveries).await?;
        self.fanouts_repaired.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The deliveries of an open fan-out, for the subscriptions that still exist and still
    /// match the topic (one deleted, or whose topics changed since, needs none): an event
    /// written by an earlier version lists them all; otherwise the tracked subscriptions
    /// beyond the first transaction are listed with their links, and the others (which
    /// receive every event of their topics) are recomputed from the set version and the
    /// topic's previous event recorded on the event.
    async fn fanout_deliveries(
        &self,
        topic: &str,
        sequence: u64,
        event: &Item,
    ) -> Result<Vec<Item>, StoreError> {
        let due = get_n(event, "published_at")?;
        let ordinal = get_n(event, "ordinal")?;
        // The set version the publisher planned with (unknown for an event written by a
        // version of Herald that listed its fan-out instead).
        let set_version = schema::fanout_record(event)?.map_or(0, |record| record.version);
        let delivery = |id: &str, previous: u64, ordinal: u64| {
            schema::delivery_item(
                &PartitionKey::new(topic, id),
                sequence,
                previous,
                due,
                ordinal,
                set_version,
            )
        };
        let corrupt = || StoreError::Corrupt(format!("fan-out record of {topic}/{sequence}"));
        if let Some(AttributeValue::S(listed)) = event.get("fanout") {
            let fanout: Vec<(String, u64)> = serde_json::from_str(listed).map_err(|_| corrupt())?;
            return Ok(fanout
                .iter()
                .map(|(id, previous)| delivery(id, *previous, ordinal))
                .collect());
        }
        let record = schema::fanout_record(event)?.ok_or_else(|| {
            StoreError::Corrupt(format!("event {topic}/{sequence} has no fan-out record"))
        })?;
        let mut set = self.subscription_set().await?;
        if set.version < record.version {
            set = self.refresh_subscriptions().await?;
        }
        let still_matches = |id: &str| {
            set.subscriptions
                .get(id)
                .is_some_and(|subscription| subscription.matches(topic))
        };
        let mut deliveries = Vec::new();
        if let Some(AttributeValue::S(listed)) = event.get("fanout_tracked") {
            let tracked: Vec<(String, u64, u64)> =
                serde_json::from_str(listed).map_err(|_| corrupt())?;
            deliveries.extend(
                tracked
                    .iter()
                    .filter(|(id, ..)| still_matches(id))
                    .map(|(id, previous, ordinal)| delivery(id, *previous, *ordinal)),
            );
        }
        // Those untracked at the event's version, matched by the patterns they had then.
        let mut candidates = set.index.matching(topic);
        candidates.extend(set.before_index.matching(topic));
        let subscribers: Vec<String> = candidates
            .into_iter()
            .filter(|id| {
                set.created
                    .get(id)
                    .is_some_and(|created| *created <= record.version)
                    && set
                        .tracked
                        .get(id)
                        .is_none_or(|tracking| tracking.since > record.version)
                    && set.matched_at(id, topic, record.version)
                    && still_matches(id)
            })
            .collect();
        let before = TopicState {
            last_sequence: record.previous_sequence,
            last_version: record.previous_version,
            ..TopicState::default()
        };
        let previous = previous_sequences(&set, &subscribers, &before);
        deliveries.extend(
            subscribers
                .iter()
                .zip(previous)
                .map(|(id, previous)| delivery(id, previous, ordinal)),
        );
        Ok(deliveries)
    }
}
