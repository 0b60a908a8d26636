//! Publishing on DynamoDB: group commit per topic.
//!
//! A publish joins its topic's queue. One committer task per topic and instance (started by the
//! first publish that finds no queue, gone once the queue is empty) takes the waiting publishes
//! and commits as many as fit into one transaction: the topic's `last_seq` moves by a block of
//! sequences (a conditional update, so publishers on other instances stay ordered), with every
//! event item, delivery and idempotency key of the block. A hot topic thus costs one
//! transaction per batch, not per event; publishes arriving while one commits form the next
//! batch. Fan-outs larger than one transaction continue in `fanout`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use tokio::sync::oneshot;

use super::errors::{cancellation_reasons, conflict_pause, refused, sdk_error};
use super::schema::{self, Item, get_n, get_s, n, s};
use super::subscriptions::{SubscriptionSet, Tracking};
use super::{Inner, MAX_CONFLICT_RETRIES, TRANSACTION_LIMIT};
use crate::model::{Event, NewEvent, PartitionKey, Published, now_millis};
use crate::store::StoreError;

/// Publishes one transaction takes at most.
const BATCH_EVENTS: usize = 64;
/// Estimated bytes one transaction carries at most (DynamoDB's limit is 4 MB).
const BATCH_BYTES: usize = 3 << 20;

/// The publishes waiting for their topic's committer.
#[derive(Default)]
pub(super) struct Queue {
    waiting: VecDeque<Waiting>,
}

/// One publish call waiting for its outcome.
struct Waiting {
    event: NewEvent,
    /// Its idempotency key, if it has one and the idempotency window is not zero.
    key: Option<String>,
    window: Duration,
    reply: oneshot::Sender<Result<Published, StoreError>>,
}

impl Waiting {
    /// Estimated size in a transaction.
    fn size(&self) -> usize {
        self.event.payload.len()
            + self
                .event
                .attributes
                .iter()
                .map(|(key, value)| key.len() + value.len() + 8)
                .sum::<usize>()
            + 1024
    }

    fn answer(self, outcome: Result<Published, StoreError>) {
        // The caller may have gone; the outcome stands either way.
        let _ = self.reply.send(outcome);
    }
}

/// One transaction's worth of a batch.
struct Plan {
    /// How many of the batch's publishes it holds (a prefix, at least one).
    count: usize,
    /// The first publish's sequence; the others follow one by one.
    first_sequence: u64,
    /// The topic's event count before the batch: the first publish's ordinal is one more.
    events_before: u64,
    now: u64,
    version: u64,
    /// The subscriptions matching the topic.
    subscribers: Vec<String>,
    /// For each publish, the positions in `subscribers` of those it is delivered to (its
    /// filter may leave some out).
    receivers: Vec<Vec<usize>>,
    /// The tracked partitions' links after the batch.
    chains: Arc<Chains>,
    items: Vec<TransactWriteItem>,
    /// For each item, the publish it belongs to (`None`: the topic's own items).
    owners: Vec<Option<usize>>,
    /// Position of each publish's idempotency item.
    key_items: Vec<Option<usize>>,
    /// Deliveries of the (only) publish beyond this transaction: its fan-out stays open.
    rest: Vec<Item>,
    /// When the subscription set used was last found current, and its validity.
    confirmed: (Instant, Duration),
}

/// What a failed transaction says about the batch.
enum Verdict {
    /// Retry the batch at once (after dropping what was answered).
    Again,
    /// A conflict with another transaction: pause, then retry.
    Pause,
    /// Answer every publish of the batch with this error.
    Fail(StoreError),
}

/// Publishes `event` through its topic's committer.
pub(super) async fn publish(
    inner: &Arc<Inner>,
    event: NewEvent,
    window: Duration,
) -> Result<Published, StoreError> {
    let topic = event.topic.clone();
    let key = event.idempotency_key.clone().filter(|_| !window.is_zero());
    let (reply, outcome) = oneshot::channel();
    let waiting = Waiting {
        event,
        key,
        window,
        reply,
    };
    let start = {
        let mut queues = inner.queues.lock().expect("queue lock");
        match queues.get_mut(&topic) {
            Some(queue) => {
                queue.waiting.push_back(waiting);
                false
            }
            None => {
                queues.insert(
                    topic.clone(),
                    Queue {
                        waiting: VecDeque::from([waiting]),
                    },
                );
                true
            }
        }
    };
    if start {
        tokio::spawn(commit_loop(inner.clone(), topic));
    }
    outcome.await.unwrap_or_else(|_| {
        Err(StoreError::Internal(
            "the topic's publish committer stopped".into(),
        ))
    })
}

/// Commits the topic's queue, batch by batch, until it is empty.
async fn commit_loop(inner: Arc<Inner>, topic: String) {
    // If this task ends early (a panic), the queue goes with it: its callers get an error
    // and the next publish starts a new committer.
    let mut guard = QueueGuard {
        inner: &inner,
        topic: &topic,
        armed: true,
    };
    loop {
        let batch = {
            let mut queues = inner.queues.lock().expect("queue lock");
            let queue = queues.get_mut(&topic).expect("the committer's queue");
            let batch = take_batch(&mut queue.waiting);
            if batch.is_empty() {
                queues.remove(&topic);
                guard.armed = false;
                return;
            }
            batch
        };
        inner.commit(&topic, batch).await;
    }
}

struct QueueGuard<'a> {
    inner: &'a Inner,
    topic: &'a str,
    armed: bool,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut queues) = self.inner.queues.lock()
        {
            queues.remove(self.topic);
        }
    }
}

/// The next batch: waiting publishes in order, skipping those whose caller has gone (they
/// were not acknowledged, so not publishing them is allowed), within the count and size
/// bounds, and stopping before a second use of one idempotency key (two writes of one item
/// cannot share a transaction; the second is then found a duplicate in the next batch).
fn take_batch(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut keys = HashSet::new();
    while let Some(next) = waiting.front() {
        if next.reply.is_closed() {
            waiting.pop_front();
            continue;
        }
        let size = next.size();
        let repeated = next.key.as_ref().is_some_and(|key| keys.contains(key));
        if !batch.is_empty()
            && (batch.len() >= BATCH_EVENTS || bytes + size > BATCH_BYTES || repeated)
        {
            break;
        }
        bytes += size;
        if let Some(key) = &next.key {
            keys.insert(key.clone());
        }
        batch.push(waiting.pop_front().expect("front exists"));
    }
    batch
}

impl Inner {
    /// Commits `batch` (in one or more transactions), answering every publish in it.
    async fn commit(&self, topic: &str, mut batch: Vec<Waiting>) {
        let mut attempt = 0;
        while !batch.is_empty() {
            batch.retain(|waiting| !waiting.reply.is_closed());
            if batch.is_empty() {
                return;
            }
            if attempt == MAX_CONFLICT_RETRIES {
                let error = StoreError::Contention(format!(
                    "too many concurrent publishes on {topic}; nothing was written"
                ));
                for waiting in batch {
                    waiting.answer(Err(error.clone()));
                }
                return;
            }
            attempt += 1;
            let mut plan = match self.plan(topic, &batch).await {
                Ok(plan) => plan,
                Err(error) => {
                    for waiting in batch {
                        waiting.answer(Err(error.clone()));
                    }
                    return;
                }
            };
            let items = std::mem::take(&mut plan.items);
            self.injected_commit_delay().await;
            match self.transact(items).await {
                Ok(()) => {
                    let later = batch.split_off(plan.count);
                    self.committed(topic, plan, batch).await;
                    batch = later;
                    attempt = 0;
                }
                Err(error) => match self.cancelled(topic, &plan, &mut batch, error).await {
                    Verdict::Again => {}
                    Verdict::Pause => conflict_pause(attempt).await,
                    Verdict::Fail(error) => {
                        for waiting in batch {
                            waiting.answer(Err(error.clone()));
                        }
                        return;
                    }
                },
            }
        }
    }

    /// After a commit: remembers the topic's new state, finishes an open fan-out, undoes
    /// deliveries to subscriptions deleted meanwhile, and answers each publish.
    async fn committed(&self, topic: &str, plan: Plan, batch: Vec<Waiting>) {
        let last = plan.first_sequence + plan.count as u64 - 1;
        self.topics.lock().expect("cache lock").insert(
            topic.to_string(),
            TopicState {
                last_sequence: last,
                last_version: plan.version,
                events: plan.events_before + plan.count as u64,
                chains: plan.chains.clone(),
            },
        );
        if !plan.subscribers.is_empty() {
            // The workers about to deliver these need not read them back.
            let mut cache = self.events.lock().expect("event cache lock");
            for (index, waiting) in batch.iter().enumerate() {
                let receivers = plan.receivers[index].len() as u64;
                if receivers == 0 {
                    continue;
                }
                cache.insert(
                    Event {
                        id: waiting.event.id.clone(),
                        topic: topic.to_string(),
                        sequence: plan.first_sequence + index as u64,
                        payload: waiting.event.payload.clone(),
                        content_type: waiting.event.content_type.clone(),
                        attributes: waiting.event.attributes.clone(),
                        published_at: plan.now,
                        trace: waiting.event.trace.clone(),
                    },
                    receivers,
                );
            }
        }
        let mut fanout_error = None;
        if !plan.rest.is_empty() {
            fanout_error = if self.injected_fanout_failure() {
                Some(StoreError::Unavailable(
                    "injected fault: publisher stopped after the first fan-out transaction".into(),
                ))
            } else {
                self.write_open_fanout(topic, last, plan.rest)
                    .await
                    .err()
                    .map(|error| {
                        StoreError::Uncertain(format!(
                            "the event is published and its fan-out is not finished yet ({error}); \
                             any instance finishes it"
                        ))
                    })
            };
        }
        let (confirmed, validity) = plan.confirmed;
        if confirmed.elapsed() >= validity {
            self.undo_deleted(topic, &plan.subscribers, plan.first_sequence, plan.count)
                .await;
        }
        for (index, waiting) in batch.into_iter().enumerate() {
            if let Some(error) = fanout_error.take() {
                waiting.answer(Err(error));
                continue;
            }
            let receivers = &plan.receivers[index];
            let outcome = Published {
                event_id: waiting.event.id.clone(),
                sequence: plan.first_sequence + index as u64,
                published_at: plan.now,
                subscription_count: receivers.len() as u32,
                duplicate: false,
                partitions: receivers
                    .iter()
                    .map(|position| PartitionKey::new(topic, plan.subscribers[*position].as_str()))
                    .collect(),
            };
            waiting.answer(Ok(outcome));
        }
    }

    /// The commit returned after the subscription set it used could have gone stale, so an
    /// Unsubscribe or a topic removal may have returned (and swept the partition) in between:
    /// removes the deliveries just written for subscriptions that no longer exist or no longer
    /// receive the topic (best effort; workers do not deliver to either).
    async fn undo_deleted(&self, topic: &str, subscribers: &[String], first: u64, count: usize) {
        let Ok(set) = self.refresh_subscriptions().await else {
            return;
        };
        for id in subscribers {
            if set
                .subscriptions
                .get(id)
                .is_some_and(|subscription| subscription.matches(topic))
            {
                continue;
            }
            let partition = PartitionKey::new(topic, id.as_str());
            for sequence in first..first + count as u64 {
                let key = schema::delivery_key(&partition, sequence);
                if let Err(error) = self.remove_delivery(key, topic, sequence, None, None).await {
                    tracing::warn!(%partition, sequence, %error, "cannot remove a delivery to a deleted subscription");
                }
            }
        }
    }

    /// Reads a failed transaction of `plan` (which holds a prefix of `batch`). Publishes it
    /// settles (duplicates, invalid events) are answered and removed from `batch`; stale
    /// cached state is forgotten.
    async fn cancelled(
        &self,
        topic: &str,
        plan: &Plan,
        batch: &mut Vec<Waiting>,
        error: SdkError<TransactWriteItemsError>,
    ) -> Verdict {
        let Some(reasons) = cancellation_reasons(&error) else {
            let validation = error
                .as_service_error()
                .and_then(|error| error.code())
                .is_some_and(|code| code == "ValidationException");
            if !validation {
                return Verdict::Fail(sdk_error(error));
            }
            // The transaction as a whole is refused (its size, say): alone, an event either
            // fits or is invalid.
            if batch.len() > 1 {
                let rest = batch.split_off(1);
                self.requeue_front(topic, rest);
                return Verdict::Again;
            }
            return Verdict::Fail(match sdk_error(error) {
                StoreError::InvalidArgument(why) => {
                    StoreError::InvalidArgument(format!("event {}: {why}", batch[0].event.id))
                }
                other => other,
            });
        };
        let reason = |index: usize| reasons.get(index).map(String::as_str).unwrap_or("None");
        let mut settled: Vec<(usize, Option<StoreError>)> = Vec::new();
        for (item, owner) in plan.owners.iter().enumerate() {
            if let Some(owner) = owner
                && let Some(StoreError::InvalidArgument(why)) = refused(&[reason(item).to_string()])
            {
                let id = &batch[*owner].event.id;
                let error = StoreError::InvalidArgument(format!("event {id}: {why}"));
                settled.push((*owner, Some(error)));
            }
        }
        if settled.is_empty()
            && let Some(error) = refused(&reasons)
        {
            // Refused, but not for an item of one event (the topic's own items).
            return Verdict::Fail(error);
        }
        for (index, key_item) in plan.key_items.iter().enumerate() {
            if key_item.is_some_and(|item| reason(item) == "ConditionalCheckFailed") {
                settled.push((index, None));
            }
        }
        let topic_failed = reason(0) == "ConditionalCheckFailed";
        if topic_failed {
            self.forget_topic(topic);
        }
        if settled.is_empty() {
            return if topic_failed {
                Verdict::Again
            } else {
                Verdict::Pause
            };
        }
        settled.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        settled.dedup_by_key(|(index, _)| *index);
        for (index, error) in settled {
            let outcome = match error {
                Some(error) => Err(error),
                None => match self.duplicate(topic, &batch[index], plan.now).await {
                    Ok(Some(original)) => Ok(original),
                    // The key expired between the transaction and the read: the publish is
                    // not a duplicate after all, and goes again with the batch.
                    Ok(None) => continue,
                    Err(error) => Err(error),
                },
            };
            batch.remove(index).answer(outcome);
        }
        Verdict::Again
    }

    /// Puts publishes back at the front of the topic's queue, in order.
    fn requeue_front(&self, topic: &str, publishes: Vec<Waiting>) {
        let mut queues = self.queues.lock().expect("queue lock");
        let queue = queues.entry(topic.to_string()).or_default();
        for waiting in publishes.into_iter().rev() {
            queue.waiting.push_front(waiting);
        }
    }

    /// The outcome of a publish whose idempotency key is taken: the original's, with the
    /// topic's partitions to wake (the original's caller may have gone before it woke the
    /// worker; a partition with nothing due just goes idle).
    /// Judged at `now`, the time the transaction's condition used: `None` only if the key's
    /// item is gone since (deleted by its TTL), and the publish then goes again.
    async fn duplicate(
        &self,
        topic: &str,
        waiting: &Waiting,
        now: u64,
    ) -> Result<Option<Published>, StoreError> {
        let key = waiting
            .key
            .as_deref()
            .expect("only keyed publishes are duplicates");
        let Some(mut original) = self.idempotent_original(topic, key, now).await? else {
            return Ok(None);
        };
        let set = self.subscription_set().await?;
        original.partitions = set
            .index
            .matching(topic)
            .into_iter()
            .map(|id| PartitionKey::new(topic, id))
            .collect();
        Ok(Some(original))
    }

    /// Plans one transaction for a prefix of `batch`: the sequences, each receiver's
    /// previous sequence and ordinal, and the items (topic advance, idempotency keys, events,
    /// deliveries).
    async fn plan(&self, topic: &str, batch: &[Waiting]) -> Result<Plan, StoreError> {
        let mut set = self.subscription_set().await?;
        let state = self.topic_state(topic).await?;
        if state.last_version > set.version {
            // Another instance published with a newer subscription set than this copy.
            set = self.refresh_subscriptions().await?;
        }
        // Replaced meanwhile by another refresh: treat it as expired, so the commit is checked.
        let confirmed = (
            self.subscriptions_confirmed(&set)
                .or_else(|| Instant::now().checked_sub(set.validity))
                .unwrap_or_else(Instant::now),
            set.validity,
        );
        let now = now_millis();
        let first_sequence = self.sequence_clock().max(state.last_sequence + 1);
        let subscribers: Vec<String> = set.index.matching(topic).into_iter().collect();
        let mut links = Links::start(&set, topic, &subscribers, &state);
        let filtered = subscribers.iter().any(|id| set.index.has_filter(id));

        let mut plan = Plan {
            count: 0,
            first_sequence,
            events_before: state.events,
            now,
            version: set.version,
            subscribers,
            receivers: Vec::new(),
            chains: state.chains.clone(),
            items: Vec::new(),
            owners: Vec::new(),
            key_items: Vec::new(),
            rest: Vec::new(),
            confirmed,
        };
        // The topic item first (its position is how a cancellation is read), then the
        // topic directory entry of a new topic.
        let mut fixed = 1;
        if state.last_sequence == 0 {
            fixed += 1;
        }
        let mut used = fixed;
        let mut events = Vec::new();
        for (index, waiting) in batch.iter().enumerate() {
            let sequence = first_sequence + index as u64;
            let ordinal = state.events + index as u64 + 1;
            let receivers: Vec<usize> = if filtered {
                let matched = set.index.matching_event(topic, &waiting.event.attributes);
                (0..plan.subscribers.len())
                    .filter(|position| matched.contains(&plan.subscribers[*position]))
                    .collect()
            } else {
                (0..plan.subscribers.len()).collect()
            };
            let deliveries = receivers.len();
            let needed =
                usize::from(waiting.key.is_some()) + usize::from(deliveries > 0) + deliveries;
            if used + needed > TRANSACTION_LIMIT && index > 0 {
                break;
            }
            used += needed;
            let mut items = Vec::new();
            if let Some(key) = &waiting.key {
                plan.key_items.push(Some(fixed + events_len(&events)));
                items.push(self.remember_key(topic, key, waiting, sequence, now, deliveries));
            } else {
                plan.key_items.push(None);
            }
            if deliveries > 0 {
                let chunked = used > TRANSACTION_LIMIT;
                let stored = Event {
                    id: waiting.event.id.clone(),
                    topic: topic.to_string(),
                    sequence,
                    payload: waiting.event.payload.clone(),
                    content_type: waiting.event.content_type.clone(),
                    attributes: waiting.event.attributes.clone(),
                    published_at: now,
                    trace: waiting.event.trace.clone(),
                };
                let repair = chunked.then_some(schema::FanoutRecord {
                    version: set.version,
                    previous_sequence: state.last_sequence,
                    previous_version: state.last_version,
                });
                let mut all: Vec<(usize, u64, u64)> = receivers
                    .iter()
                    .map(|position| {
                        let (previous, ordinal) = links.advance(*position, sequence, ordinal);
                        (*position, previous, ordinal)
                    })
                    .collect();
                let mut rest = Vec::new();
                if chunked {
                    let room = TRANSACTION_LIMIT - (used - deliveries);
                    rest = all.split_off(room.min(all.len()));
                }
                let mut event_item = schema::event_item(&stored, ordinal, deliveries, repair);
                // Which tracked subscriptions receive it, and their links, cannot be
                // recomputed from the set (filters, changed topics): a repair takes those
                // beyond this transaction from a list, and recomputes the others.
                let listed: Vec<(&str, u64, u64)> = rest
                    .iter()
                    .filter(|(position, ..)| set.tracked.contains_key(&plan.subscribers[*position]))
                    .map(|(position, previous, ordinal)| {
                        (plan.subscribers[*position].as_str(), *previous, *ordinal)
                    })
                    .collect();
                if !listed.is_empty() {
                    event_item.insert(
                        "fanout_tracked".into(),
                        s(serde_json::to_string(&listed).expect("JSON")),
                    );
                }
                items.push(self.put(event_item));
                let item_of = |(position, previous, ordinal): &(usize, u64, u64)| {
                    schema::delivery_item(
                        &PartitionKey::new(topic, plan.subscribers[*position].as_str()),
                        sequence,
                        *previous,
                        now,
                        *ordinal,
                        set.version,
                    )
                };
                plan.rest = rest.iter().map(item_of).collect();
                items.extend(all.iter().map(item_of).map(|item| self.put(item)));
            }
            plan.receivers.push(receivers);
            events.push(items);
            plan.count += 1;
            if !plan.rest.is_empty() {
                break;
            }
        }
        let chains = links.chains(&set, topic, &plan.subscribers, &state);
        let last = first_sequence + plan.count as u64 - 1;
        let open = (!plan.rest.is_empty()).then_some(last);
        let count = state.events + plan.count as u64;
        plan.items.push(self.advance_topic(
            topic,
            &state,
            (last, count),
            set.version,
            open,
            chains.as_ref(),
        ));
        plan.owners.push(None);
        if let Some(chains) = chains {
            plan.chains = Arc::new(chains);
        }
        if state.last_sequence == 0 {
            plan.items
                .push(self.put(schema::key(schema::TOPICS_PK, topic)));
            plan.owners.push(None);
        }
        for (index, items) in events.into_iter().enumerate() {
            plan.owners
                .extend(std::iter::repeat_n(Some(index), items.len()));
            plan.items.extend(items);
        }
        Ok(plan)
    }

    /// The original outcome of a key live at `now` (as the publish condition judges it: a key
    /// expires once `expires_at < now`).
    async fn idempotent_original(
        &self,
        topic: &str,
        key: &str,
        now: u64,
    ) -> Result<Option<Published>, StoreError> {
        let Some(item) = self.get_item(schema::idempotency_key(topic, key)).await? else {
            return Ok(None);
        };
        if get_n(&item, "expires_at")? < now {
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

    /// Moves the topic's last sequence from what this instance read to `last` and its event
    /// count to `events`, provided no publish on it used a newer subscription set (the set
    /// versions a topic's publishes use only grow, which keeps each subscription's `previous`
    /// chain whole); with `open_fanout`, also marks the fan-out of that sequence as unfinished.
    fn advance_topic(
        &self,
        topic: &str,
        state: &TopicState,
        (last, events): (u64, u64),
        version: u64,
        open_fanout: Option<u64>,
        chains: Option<&Chains>,
    ) -> TransactWriteItem {
        let mut expression =
            "SET last_seq = :sequence, last_version = :version, events = :events".to_string();
        if chains.is_some() {
            expression.push_str(", chains = :chains");
        }
        if open_fanout.is_some() {
            expression.push_str(" ADD open_fanouts :open");
        }
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(schema::topic_key(topic)))
            .update_expression(expression)
            .expression_attribute_values(":sequence", n(last))
            .expression_attribute_values(":events", n(events))
            .expression_attribute_values(":version", n(version));
        let update = match chains {
            Some(chains) => update.expression_attribute_values(
                ":chains",
                s(serde_json::to_string(chains).expect("JSON")),
            ),
            None => update,
        };
        let update = match open_fanout {
            Some(sequence) => update.expression_attribute_values(
                ":open",
                AttributeValue::Ns(vec![sequence.to_string()]),
            ),
            None => update,
        };
        let update = if state.last_sequence == 0 {
            update.condition_expression("attribute_not_exists(pk)")
        } else {
            update
                .condition_expression("last_seq = :expected AND last_version <= :version")
                .expression_attribute_values(":expected", n(state.last_sequence))
        };
        TransactWriteItem::builder()
            .update(update.build().expect("complete update"))
            .build()
    }

    fn remember_key(
        &self,
        topic: &str,
        key: &str,
        waiting: &Waiting,
        sequence: u64,
        now: u64,
        subscription_count: usize,
    ) -> TransactWriteItem {
        let expires_at = now + waiting.window.as_millis() as u64;
        let mut item = schema::idempotency_key(topic, key);
        item.insert("event_id".into(), s(&waiting.event.id));
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

/// Items planned so far for earlier publishes of the batch.
fn events_len(events: &[Vec<TransactWriteItem>]) -> usize {
    events.iter().map(Vec::len).sum()
}

/// For each subscriber, the sequence of the topic's previous event it received, for a
/// subscription that receives every event of its topics: the topic's last event reached it
/// iff that was published with a subscription set that already held it.
pub(super) fn previous_sequences(
    set: &SubscriptionSet,
    subscribers: &[String],
    state: &TopicState,
) -> Vec<u64> {
    subscribers
        .iter()
        .map(|id| {
            let created = set.created.get(id).copied().unwrap_or(u64::MAX);
            if state.last_sequence > 0 && state.last_version >= created {
                state.last_sequence
            } else {
                0
            }
        })
        .collect()
}

/// Tracked partitions' links, by subscription id: the sequence and the partition's own
/// ordinal of the last event each received on the topic.
pub(super) type Chains = BTreeMap<String, (u64, u64)>;

/// Where a tracked subscription's chain on `topic` stands before the topic's next event:
/// its entry on the topic item; without one, what it received while it was untracked (the
/// topic's last event, if that was published after its creation and before its tracking and
/// its old patterns matched), or nothing.
fn chain_start(
    set: &SubscriptionSet,
    id: &str,
    tracking: &Tracking,
    topic: &str,
    state: &TopicState,
) -> (u64, u64) {
    if let Some(link) = state.chains.get(id) {
        return *link;
    }
    let created = set.created.get(id).copied().unwrap_or(u64::MAX);
    let received_last = state.last_sequence > 0
        && state.last_version >= created
        && state.last_version < tracking.since
        && tracking
            .topics_before
            .iter()
            .any(|pattern| crate::model::pattern_matches(pattern, topic));
    if received_last {
        (state.last_sequence, state.events)
    } else {
        (0, 0)
    }
}

/// Each subscriber's link while a batch is planned: the previous sequence its next delivery
/// names and, for a tracked subscription, the ordinal of its last delivery (an untracked
/// one's deliveries take the topic's ordinal).
struct Links {
    links: Vec<(u64, Option<u64>)>,
}

impl Links {
    fn start(
        set: &SubscriptionSet,
        topic: &str,
        subscribers: &[String],
        state: &TopicState,
    ) -> Links {
        let previous = previous_sequences(set, subscribers, state);
        let links = subscribers
            .iter()
            .zip(previous)
            .map(|(id, previous)| match set.tracked.get(id) {
                Some(tracking) => {
                    let (sequence, ordinal) = chain_start(set, id, tracking, topic, state);
                    (sequence, Some(ordinal))
                }
                None => (previous, None),
            })
            .collect();
        Links { links }
    }

    /// Records a delivery of the event `sequence`, the topic's `ordinal`-th, to the
    /// subscriber at `position`; returns its previous sequence and ordinal.
    fn advance(&mut self, position: usize, sequence: u64, ordinal: u64) -> (u64, u64) {
        let (previous, own) = &mut self.links[position];
        let delivered = match own {
            Some(last) => *last + 1,
            None => ordinal,
        };
        let link = (*previous, delivered);
        *previous = sequence;
        if let Some(last) = own {
            *last = delivered;
        }
        link
    }

    /// The topic item's new `chains`, if they change: the tracked subscribers' links, and
    /// those of tracked subscriptions whose old patterns match the topic and that have no
    /// entry yet (so that what they received while untracked is kept once the topic moves
    /// past their tracking version). Entries of deleted subscriptions are dropped then.
    fn chains(
        &self,
        set: &SubscriptionSet,
        topic: &str,
        subscribers: &[String],
        state: &TopicState,
    ) -> Option<Chains> {
        let mut chains = (*state.chains).clone();
        let mut changed = false;
        for (id, (sequence, own)) in subscribers.iter().zip(&self.links) {
            if let Some(ordinal) = own
                && (*sequence, *ordinal) != (0, 0)
                && chains.get(id) != Some(&(*sequence, *ordinal))
            {
                chains.insert(id.clone(), (*sequence, *ordinal));
                changed = true;
            }
        }
        for id in set.before_index.matching(topic) {
            if chains.contains_key(&id) {
                continue;
            }
            if let Some(tracking) = set.tracked.get(&id) {
                let link = chain_start(set, &id, tracking, topic, state);
                if link != (0, 0) {
                    chains.insert(id, link);
                    changed = true;
                }
            }
        }
        if !changed {
            return None;
        }
        chains.retain(|id, _| set.subscriptions.contains_key(id));
        Some(chains)
    }
}

/// What this instance last saw of a topic item.
#[derive(Debug, Clone, Default)]
pub(super) struct TopicState {
    pub(super) last_sequence: u64,
    pub(super) last_version: u64,
    /// Events published on the topic (counted since this attribute exists): each event's
    /// ordinal, stored on its deliveries, so that a partition's backlog is the difference
    /// of its tail's and its head's ordinals.
    pub(super) events: u64,
    /// The tracked partitions' links.
    pub(super) chains: Arc<Chains>,
}

impl Inner {
    pub(super) async fn topic_state(&self, topic: &str) -> Result<TopicState, StoreError> {
        if let Some(state) = self.topics.lock().expect("cache lock").get(topic) {
            return Ok(state.clone());
        }
        let state = match self.get_item(schema::topic_key(topic)).await? {
            Some(item) => TopicState {
                last_sequence: get_n(&item, "last_seq")?,
                last_version: get_n(&item, "last_version")?,
                events: get_n(&item, "events")?,
                chains: Arc::new(match item.get("chains") {
                    Some(AttributeValue::S(chains)) => serde_json::from_str(chains)
                        .map_err(|_| StoreError::Corrupt(format!("chains of topic {topic}")))?,
                    _ => Chains::new(),
                }),
            },
            None => TopicState::default(),
        };
        self.topics
            .lock()
            .expect("cache lock")
            .insert(topic.to_string(), state.clone());
        Ok(state)
    }

    fn forget_topic(&self, topic: &str) {
        self.topics.lock().expect("cache lock").remove(topic);
    }
}
