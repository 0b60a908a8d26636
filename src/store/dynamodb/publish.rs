//! Publishing on DynamoDB: sequence allocation, fan-out (see `fanout` for fan-outs
//! larger than one transaction) and idempotency.

use std::time::Duration;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, TransactWriteItem, Update};

use super::errors::{cancellation_reasons, conflict_pause, sdk_error};
use super::schema::{self, Item, get_n, get_s, n, s};
use super::{DynamoStore, MAX_CONFLICT_RETRIES, TRANSACTION_LIMIT};
use crate::model::{Event, NewEvent, PartitionKey, Published, now_micros, now_millis};
use crate::store::StoreError;

/// Position of the items every publish transaction starts with.
const VERSION_ITEM: usize = 0;
const TOPIC_ITEM: usize = 1;
const IDEMPOTENCY_ITEM: usize = 2;

/// One attempt at a publish, computed from this instance's view of the subscription set and
/// the topic: the transaction to commit, and the fan-out left for later if it does not fit.
struct Attempt {
    sequence: u64,
    now: u64,
    version: u64,
    subscribers: Vec<String>,
    items: Vec<TransactWriteItem>,
    /// Deliveries beyond the first transaction (an open fan-out), empty if it all fits.
    rest: Vec<Item>,
}

/// What a cancelled publish transaction says to do next.
enum Cancelled {
    /// Another publisher or a subscription change won the race: compute again at once.
    Stale,
    /// A conflict with another transaction: pause, then compute again.
    Conflict,
}

impl DynamoStore {
    pub(super) async fn publish_event(
        &self,
        event: &NewEvent,
        window: Duration,
    ) -> Result<Published, StoreError> {
        let topic = event.topic.as_str();
        let key = event
            .idempotency_key
            .as_deref()
            .filter(|_| !window.is_zero());
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let now = now_millis();
            if let Some(key) = key
                && let Some(original) = self.idempotent_original(topic, key, now).await?
            {
                return self.with_partitions(original, topic).await;
            }
            let plan = self.plan(event, key, window, now).await?;
            if let Err(error) = self.transact(plan.items).await {
                match self.cancelled(&error, topic, key.is_some()) {
                    None => return Err(sdk_error(error)),
                    Some(Cancelled::Stale) => {}
                    Some(Cancelled::Conflict) => conflict_pause(attempt).await,
                }
                continue;
            }
            self.topics.lock().expect("cache lock").insert(
                topic.to_string(),
                TopicState {
                    last_sequence: plan.sequence,
                    last_version: plan.version,
                },
            );
            if !plan.rest.is_empty() {
                if self.injected_fanout_failure() {
                    return Err(StoreError::Unavailable(
                        "injected fault: publisher stopped after the first fan-out transaction"
                            .into(),
                    ));
                }
                self.write_open_fanout(topic, plan.sequence, plan.rest)
                    .await?;
            }
            return Ok(Published {
                event_id: event.id.clone(),
                sequence: plan.sequence,
                published_at: plan.now,
                subscription_count: plan.subscribers.len() as u32,
                duplicate: false,
                partitions: plan
                    .subscribers
                    .into_iter()
                    .map(|id| PartitionKey::new(topic, id))
                    .collect(),
            });
        }
        Err(StoreError::Contention(format!(
            "too many concurrent publishes on {topic}; nothing was written"
        )))
    }

    /// A duplicate's original outcome, with the topic's partitions to wake: the original's
    /// caller may have gone before it woke the worker (a partition with nothing due just goes
    /// idle).
    async fn with_partitions(
        &self,
        mut original: Published,
        topic: &str,
    ) -> Result<Published, StoreError> {
        let set = self.subscription_set().await?;
        original.partitions = set
            .index
            .matching(topic)
            .into_iter()
            .map(|id| PartitionKey::new(topic, id))
            .collect();
        Ok(original)
    }

    /// Computes one attempt: the next sequence, each subscriber's previous sequence, and the
    /// transaction (version check, topic advance, idempotency key, event, first deliveries).
    async fn plan(
        &self,
        event: &NewEvent,
        key: Option<&str>,
        window: Duration,
        now: u64,
    ) -> Result<Attempt, StoreError> {
        let topic = event.topic.as_str();
        let set = self.subscription_set().await?;
        let state = self.topic_state(topic).await?;
        let sequence = now_micros().max(state.last_sequence + 1);
        let subscribers: Vec<String> = set.index.matching(topic).into_iter().collect();
        let fanout: Vec<(String, u64)> = subscribers
            .iter()
            .map(|id| {
                let created = set.created.get(id).copied().unwrap_or(u64::MAX);
                // The previous event of the topic reached this subscription iff it was
                // published with a subscription set that already held it.
                let previous = if state.last_sequence > 0 && state.last_version >= created {
                    state.last_sequence
                } else {
                    0
                };
                (id.clone(), previous)
            })
            .collect();
        let mut deliveries: Vec<Item> = fanout
            .iter()
            .map(|(id, previous)| {
                schema::delivery_item(
                    &PartitionKey::new(topic, id.as_str()),
                    sequence,
                    *previous,
                    now,
                )
            })
            .collect();
        let fixed_items = 2
            + usize::from(key.is_some())
            + usize::from(!subscribers.is_empty())
            + usize::from(state.last_sequence == 0);
        let room = TRANSACTION_LIMIT - fixed_items;
        let chunked = deliveries.len() > room;

        let mut items = vec![
            self.check_version(set.version),
            self.advance_topic(topic, state, sequence, set.version, chunked),
        ];
        if let Some(key) = key {
            items.push(self.remember_key(
                topic,
                key,
                &event.id,
                sequence,
                now,
                subscribers.len(),
                window,
            ));
        }
        if !subscribers.is_empty() {
            let stored = Event {
                id: event.id.clone(),
                topic: topic.to_string(),
                sequence,
                payload: event.payload.clone(),
                content_type: event.content_type.clone(),
                attributes: event.attributes.clone(),
                published_at: now,
                trace: event.trace.clone(),
            };
            let fanout_record =
                chunked.then(|| serde_json::to_string(&fanout).expect("fan-out serializes"));
            items.push(self.put(schema::event_item(
                &stored,
                subscribers.len(),
                fanout_record,
            )));
        }
        if state.last_sequence == 0 {
            items.push(self.put(schema::key(schema::TOPICS_PK, topic)));
        }
        let rest = deliveries.split_off(deliveries.len().min(room));
        items.extend(deliveries.into_iter().map(|item| self.put(item)));
        Ok(Attempt {
            sequence,
            now,
            version: set.version,
            subscribers,
            items,
            rest,
        })
    }

    /// Reads a failed publish transaction: `None` if it was not a cancellation (an error to
    /// return), else what to do next; stale cached state is forgotten.
    fn cancelled(
        &self,
        error: &SdkError<TransactWriteItemsError>,
        topic: &str,
        keyed: bool,
    ) -> Option<Cancelled> {
        let reasons = cancellation_reasons(error)?;
        let failed =
            |index: usize| reasons.get(index).map(String::as_str) == Some("ConditionalCheckFailed");
        if failed(VERSION_ITEM) {
            self.forget_subscriptions();
        }
        if failed(TOPIC_ITEM) {
            self.forget_topic(topic);
        }
        if failed(VERSION_ITEM) || failed(TOPIC_ITEM) || (keyed && failed(IDEMPOTENCY_ITEM)) {
            Some(Cancelled::Stale)
        } else {
            Some(Cancelled::Conflict)
        }
    }

    /// The original outcome of a live idempotency key.
    async fn idempotent_original(
        &self,
        topic: &str,
        key: &str,
        now: u64,
    ) -> Result<Option<Published>, StoreError> {
        let Some(item) = self.get_item(schema::idempotency_key(topic, key)).await? else {
            return Ok(None);
        };
        if get_n(&item, "expires_at")? <= now {
            return Ok(None);
        }
        Ok(Some(Published {
            event_id: get_s(&item, "event_id")?.to_string(),
            sequence: get_n(&item, "sequence")?,
            published_at: get_n(&item, "published_at")?,
            subscription_count: get_n(&item, "subscription_count")? as u32,
            duplicate: true,
            partitions: Vec::new(),
        }))
    }

    pub(super) fn put(&self, item: Item) -> TransactWriteItem {
        TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .build()
                    .expect("complete put"),
            )
            .build()
    }

    /// Fails the transaction unless the subscription set is still at `version`.
    fn check_version(&self, version: u64) -> TransactWriteItem {
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(schema::meta_key()));
        let check = if version == 0 {
            check.condition_expression("attribute_not_exists(pk)")
        } else {
            check
                .condition_expression("version = :version")
                .expression_attribute_values(":version", n(version))
        };
        TransactWriteItem::builder()
            .condition_check(check.build().expect("complete condition check"))
            .build()
    }

    /// Moves the topic's last sequence from what this instance read to `sequence`; with
    /// `open_fanout`, also marks the fan-out of `sequence` as unfinished.
    fn advance_topic(
        &self,
        topic: &str,
        state: TopicState,
        sequence: u64,
        version: u64,
        open_fanout: bool,
    ) -> TransactWriteItem {
        let mut expression = "SET last_seq = :sequence, last_version = :version".to_string();
        if open_fanout {
            expression.push_str(" ADD open_fanouts :open");
        }
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(schema::topic_key(topic)))
            .update_expression(expression)
            .expression_attribute_values(":sequence", n(sequence))
            .expression_attribute_values(":version", n(version));
        let update = if open_fanout {
            update.expression_attribute_values(
                ":open",
                AttributeValue::Ns(vec![sequence.to_string()]),
            )
        } else {
            update
        };
        let update = if state.last_sequence == 0 {
            update.condition_expression("attribute_not_exists(pk)")
        } else {
            update
                .condition_expression("last_seq = :expected")
                .expression_attribute_values(":expected", n(state.last_sequence))
        };
        TransactWriteItem::builder()
            .update(update.build().expect("complete update"))
            .build()
    }

    #[allow(clippy::too_many_arguments)]
    fn remember_key(
        &self,
        topic: &str,
        key: &str,
        event_id: &str,
        sequence: u64,
        now: u64,
        subscription_count: usize,
        window: Duration,
    ) -> TransactWriteItem {
        let expires_at = now + window.as_millis() as u64;
        let mut item = schema::idempotency_key(topic, key);
        item.insert("event_id".into(), s(event_id));
        item.insert("sequence".into(), n(sequence));
        item.insert("published_at".into(), n(now));
        item.insert("subscription_count".into(), n(subscription_count));
        item.insert("expires_at".into(), n(expires_at));
        item.insert(schema::TTL.into(), n(expires_at / 1000 + 1));
        TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(pk) OR expires_at < :now")
                    .expression_attribute_values(":now", n(now))
                    .build()
                    .expect("complete put"),
            )
            .build()
    }
}

/// What this instance last saw of a topic item.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TopicState {
    pub(super) last_sequence: u64,
    pub(super) last_version: u64,
}

impl DynamoStore {
    async fn topic_state(&self, topic: &str) -> Result<TopicState, StoreError> {
        if let Some(state) = self.topics.lock().expect("cache lock").get(topic) {
            return Ok(*state);
        }
        let state = match self.get_item(schema::topic_key(topic)).await? {
            Some(item) => TopicState {
                last_sequence: get_n(&item, "last_seq")?,
                last_version: get_n(&item, "last_version")?,
            },
            None => TopicState::default(),
        };
        self.topics
            .lock()
            .expect("cache lock")
            .insert(topic.to_string(), state);
        Ok(state)
    }

    fn forget_topic(&self, topic: &str) {
        self.topics.lock().expect("cache lock").remove(topic);
    }
}
