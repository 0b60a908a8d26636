//! The DynamoDB backend: the same [`Store`] on one table that many Herald instances share.
//!
//! No operation scans the table; every read is a GetItem, BatchGetItem or Query on a key (see
//! [`schema`] for the layout). The invariants that keep delivery ordered across instances:
//!
//! - **Sequence allocation is part of the publish transaction.** A publish is one
//!   TransactWriteItems that moves the topic's `last_seq` from the value it read to the new
//!   sequence (a conditional update) and writes the event and its deliveries. Two publishers
//!   cannot both commit from the same `last_seq`, so sequence `n + 1` commits after `n`, together
//!   with its deliveries: a reader that sees delivery `n + 1` sees every delivery `n` of the
//!   topic. A publisher that stalls or dies before committing leaves nothing.
//! - **Fan-outs larger than one transaction** (100 items) open a fan-out marker on the topic in
//!   the same transaction; the rest of the deliveries follow in batches and the marker is
//!   removed last. Workers deliver only sequences below the smallest open marker, and any
//!   instance finishes a fan-out whose marker is older than the repair delay (the event item
//!   records its subscriber list), so a publisher crashing halfway delays the topic but never
//!   reorders it.
//! - **The subscription set is versioned.** Subscribe and Unsubscribe bump a version item; each
//!   publish checks, inside its transaction, the version its fan-out was computed from.
//! - **A partition is delivered by one instance at a time**, holding a lease item. Each claim
//!   writes a new token into it, and every write a worker makes for its partition (completion,
//!   failure) checks that token in the same transaction, so a worker whose lease was taken
//!   over (it was paused, or its renewals failed) cannot write over its successor's progress.

mod schema;

use std::collections::{BTreeMap, HashMap};
#[cfg(feature = "fault-injection")]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, Delete, KeySchemaElement,
    KeyType, KeysAndAttributes, Put, ScalarAttributeType, TimeToLiveSpecification,
    TransactWriteItem, Update,
};

use crate::model::{
    Event, FailureOutcome, NewEvent, Page, PartitionKey, PendingDelivery, Published, Subscription,
    now_millis,
};
use crate::store::records::{self, from_json};
use crate::store::topic_index::TopicIndex;
use crate::store::{LeaseToken, PartitionLeases, Store, StoreError};
use schema::{Item, get_n, get_s, n, s};

/// Items a transaction may hold.
const TRANSACTION_LIMIT: usize = 100;
/// Keys a batch get may hold.
const BATCH_GET_LIMIT: usize = 100;
/// Deliveries of unsubscribed subscriptions one rescan removes at most.
const SWEEP_BUDGET: usize = 500;
/// Attempts at a publish or subscription change that lose optimistic-locking races.
const MAX_CONFLICT_RETRIES: u32 = 64;

/// How to reach the table.
#[derive(Debug, Clone, Default)]
pub struct DynamoConfig {
    /// Table name.
    pub table: String,
    /// Region; the standard AWS chain decides if `None`.
    pub region: Option<String>,
    /// Endpoint override (a local DynamoDB-compatible server); `AWS_ENDPOINT_URL_DYNAMODB` and
    /// `AWS_ENDPOINT_URL` are honoured too.
    pub endpoint: Option<String>,
}

/// Builds a client from the standard AWS configuration chain (environment, profile, web
/// identity, ECS, EC2), with throttling retried (exponential backoff with jitter, 8 attempts).
pub async fn client_from_env(config: &DynamoConfig) -> Client {
    // Bounded attempts: a request that hangs (a half-open connection) must not hold a worker
    // past its lease, nor a publish forever.
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(
            aws_config::retry::RetryConfig::standard()
                .with_max_attempts(8)
                .with_initial_backoff(Duration::from_millis(25)),
        )
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(3))
                .operation_timeout(Duration::from_secs(20))
                .build(),
        );
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    Client::new(&loader.load().await)
}

/// Creates the table (PAY_PER_REQUEST, `pk`/`sk` string keys, TTL on idempotency keys) and
/// waits until it is active. `Conflict` if it exists already.
pub async fn create_table(client: &Client, table: &str) -> Result<(), StoreError> {
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("complete attribute definition")
    };
    let key = |name: &str, key_type: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(key_type)
            .build()
            .expect("complete key schema")
    };
    let created = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(schema::PK))
        .attribute_definitions(attribute(schema::SK))
        .key_schema(key(schema::PK, KeyType::Hash))
        .key_schema(key(schema::SK, KeyType::Range))
        .send()
        .await;
    if let Err(error) = created {
        if error
            .as_service_error()
            .is_some_and(|error| error.is_resource_in_use_exception())
        {
            return Err(StoreError::Conflict(format!(
                "table {table} already exists"
            )));
        }
        return Err(sdk_error(error));
    }
    for _ in 0..600 {
        let description = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(sdk_error)?;
        let active = description
            .table()
            .and_then(|table| table.table_status())
            .is_some_and(|status| status.as_str() == "ACTIVE");
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name(schema::TTL)
                .build()
                .expect("complete TTL specification"),
        )
        .send()
        .await
        .map_err(sdk_error)?;
    Ok(())
}

/// Maps an SDK error: anything that is not a bug of ours means the table cannot be used now.
fn sdk_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    error: SdkError<E>,
) -> StoreError {
    if let Some(service_error) = error.as_service_error() {
        let code = service_error.code().unwrap_or("unknown error");
        let text = format!("{code}: {}", service_error.message().unwrap_or(""));
        return match code {
            "ValidationException" | "SerializationException" => {
                StoreError::Internal(format!("DynamoDB rejected a request: {text}"))
            }
            _ => StoreError::Unavailable(format!("DynamoDB: {text}")),
        };
    }
    let text = match &error {
        SdkError::DispatchFailure(_) => "cannot reach DynamoDB".to_string(),
        SdkError::TimeoutError(_) => "DynamoDB did not answer in time".to_string(),
        other => DisplayErrorContext(other).to_string(),
    };
    StoreError::Unavailable(text)
}

/// True if the error is a failed condition of a single-item write.
fn is_condition_failure<E: ProvideErrorMetadata>(error: &SdkError<E>) -> bool {
    error
        .as_service_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == "ConditionalCheckFailedException")
}

/// Why a transaction was cancelled, per item; an empty list for a conflict with another
/// transaction; `None` if the error is not a cancellation.
fn cancellation_reasons(error: &SdkError<TransactWriteItemsError>) -> Option<Vec<String>> {
    let service_error = error.as_service_error()?;
    if let TransactWriteItemsError::TransactionCanceledException(cancelled) = service_error {
        return Some(
            cancelled
                .cancellation_reasons()
                .iter()
                .map(|reason| reason.code().unwrap_or("None").to_string())
                .collect(),
        );
    }
    match service_error.code() {
        Some("TransactionConflictException" | "TransactionInProgressException") => Some(Vec::new()),
        _ => None,
    }
}

/// A short random pause after losing a race.
async fn conflict_pause(attempt: u32) {
    let cap = 2u64 << attempt.min(6);
    let micros = rand::random_range(0..=cap * 1000);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

/// Requests sent, per DynamoDB operation.
#[derive(Default)]
pub struct RequestCounts {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl RequestCounts {
    fn add(&self, operation: &'static str) {
        *self
            .counts
            .lock()
            .expect("counts lock")
            .entry(operation)
            .or_default() += 1;
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.counts.lock().expect("counts lock").clone()
    }

    /// All requests sent.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

/// Faults armed by tests (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
#[derive(Default)]
struct Faults {
    fanout: AtomicBool,
    unsubscribe: AtomicBool,
}

/// The subscriptions as of one version of the subscription set.
struct SubscriptionSet {
    version: u64,
    index: TopicIndex,
    /// Subscription id -> the version that created it.
    created: HashMap<String, u64>,
    subscriptions: HashMap<String, Subscription>,
}

/// What the rescan last saw of a topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TopicMark {
    last_sequence: u64,
    open_fanout: bool,
}

/// What this instance last saw of a topic item.
#[derive(Debug, Clone, Copy, Default)]
struct TopicState {
    last_sequence: u64,
    last_version: u64,
}

/// The DynamoDB store.
pub struct DynamoStore {
    client: Client,
    table: String,
    /// Owner name of this instance's partition leases.
    instance: String,
    counts: Arc<RequestCounts>,
    subscriptions: Mutex<Option<Arc<SubscriptionSet>>>,
    topics: Mutex<HashMap<String, TopicState>>,
    repair_after: Duration,
    /// Each topic's last sequence at the previous `pending_partitions` call.
    /// (topic's last sequence, whether a fan-out was open) at the previous `pending_partitions`
    /// call, for every topic.
    rescanned: Mutex<Option<HashMap<String, TopicMark>>>,
    #[cfg(feature = "fault-injection")]
    faults: Faults,
    fanouts_repaired: AtomicU64,
}

impl DynamoStore {
    /// A store on `table` through `client`. The table must exist ([`create_table`]).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: table.into(),
            instance: crate::broker::new_id("ins"),
            counts: Arc::new(RequestCounts::default()),
            subscriptions: Mutex::new(None),
            topics: Mutex::new(HashMap::new()),
            repair_after: Duration::from_secs(10),
            rescanned: Mutex::new(None),
            #[cfg(feature = "fault-injection")]
            faults: Faults::default(),
            fanouts_repaired: AtomicU64::new(0),
        }
    }

    /// Sets how old an unfinished fan-out must be before another instance finishes it.
    pub fn with_repair_after(mut self, repair_after: Duration) -> Self {
        self.repair_after = repair_after;
        self
    }

    /// Fails the next fan-out that needs more than one transaction right after its first
    /// transaction, as a publisher crash there would. Test-only (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_fanout_failure(&self) {
        self.faults.fanout.store(true, Ordering::SeqCst);
    }

    /// Fails the next Unsubscribe right after the subscription is deleted, before any of its
    /// deliveries are, as a crash or outage there would. Test-only (feature
    /// `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_unsubscribe_failure(&self) {
        self.faults.unsubscribe.store(true, Ordering::SeqCst);
    }

    /// True (once) if a fan-out failure was injected.
    fn injected_fanout_failure(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.faults.fanout.swap(false, Ordering::SeqCst)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }

    /// True (once) if an unsubscribe failure was injected.
    fn injected_unsubscribe_failure(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.faults.unsubscribe.swap(false, Ordering::SeqCst)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }

    /// Unfinished fan-outs this instance has completed.
    pub fn fanouts_repaired(&self) -> u64 {
        self.fanouts_repaired.load(Ordering::SeqCst)
    }

    /// Requests sent so far, per operation.
    pub fn request_counters(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    /// Checks that the table answers.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.counts.add("DescribeTable");
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn get_item(&self, key: Item) -> Result<Option<Item>, StoreError> {
        self.counts.add("GetItem");
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(output.item)
    }

    /// Queries one partition key for sort keys strictly after `after` (all if `None`), in
    /// order, at most `limit` items.
    async fn query_after(
        &self,
        pk: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start: Option<Item> = after.map(|sk| schema::key(pk, sk));
        while items.len() < limit {
            self.counts.add("Query");
            let output = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk))
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

    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
    ) -> Result<(), SdkError<TransactWriteItemsError>> {
        self.counts.add("TransactWriteItems");
        self.client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
            .map(|_| ())
    }

    /// Reads events by sequence, keyed by sequence.
    async fn batch_get_events(
        &self,
        topic: &str,
        sequences: &[u64],
    ) -> Result<HashMap<u64, Event>, StoreError> {
        let keys = sequences
            .iter()
            .map(|sequence| schema::event_key(topic, *sequence))
            .collect();
        let mut events = HashMap::new();
        for item in self.batch_get(keys).await? {
            let event = schema::event_from_item(topic, &item)?;
            events.insert(event.sequence, event);
        }
        Ok(events)
    }

    /// Reads items by key (consistently), in batches of 100, retrying what DynamoDB leaves
    /// unprocessed. Missing items are left out.
    async fn batch_get(&self, keys: Vec<Item>) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        for chunk in keys.chunks(BATCH_GET_LIMIT) {
            let mut keys = chunk.to_vec();
            let mut attempt = 0;
            while !keys.is_empty() {
                self.counts.add("BatchGetItem");
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(
                        &self.table,
                        KeysAndAttributes::builder()
                            .set_keys(Some(keys))
                            .consistent_read(true)
                            .build()
                            .expect("complete keys"),
                    )
                    .send()
                    .await
                    .map_err(sdk_error)?;
                items.extend(
                    output
                        .responses
                        .and_then(|mut responses| responses.remove(&self.table))
                        .unwrap_or_default(),
                );
                keys = output
                    .unprocessed_keys
                    .and_then(|mut unprocessed| unprocessed.remove(&self.table))
                    .map(|keys| keys.keys)
                    .unwrap_or_default();
                if !keys.is_empty() {
                    attempt += 1;
                    if attempt > 10 {
                        return Err(StoreError::Unavailable(
                            "DynamoDB keeps leaving batch reads unprocessed".into(),
                        ));
                    }
                    conflict_pause(attempt).await;
                }
            }
        }
        Ok(items)
    }

    /// The current subscription set, loaded if this instance has none.
    async fn subscription_set(&self) -> Result<Arc<SubscriptionSet>, StoreError> {
        if let Some(set) = self.subscriptions.lock().expect("cache lock").clone() {
            return Ok(set);
        }
        let version = self.read_version().await?;
        let mut set = SubscriptionSet {
            version,
            index: TopicIndex::default(),
            created: HashMap::new(),
            subscriptions: HashMap::new(),
        };
        for item in self
            .query_after(schema::SUBSCRIPTIONS_PK, None, usize::MAX)
            .await?
        {
            let subscription: Subscription =
                from_json(get_s(&item, "data")?.as_bytes(), "subscription")?;
            set.index.add(&subscription);
            set.created
                .insert(subscription.id.clone(), get_n(&item, "version")?);
            set.subscriptions
                .insert(subscription.id.clone(), subscription);
        }
        let set = Arc::new(set);
        *self.subscriptions.lock().expect("cache lock") = Some(set.clone());
        Ok(set)
    }

    fn forget_subscriptions(&self) {
        *self.subscriptions.lock().expect("cache lock") = None;
    }

    async fn read_version(&self) -> Result<u64, StoreError> {
        match self.get_item(schema::meta_key()).await? {
            Some(item) => get_n(&item, "version"),
            None => Ok(0),
        }
    }

    /// A condition-checked move of the subscription-set version from `version` to
    /// `version + 1`.
    fn bump_version(&self, version: u64) -> TransactWriteItem {
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(schema::meta_key()))
            .update_expression("SET version = :next")
            .expression_attribute_values(":next", n(version + 1));
        let update = if version == 0 {
            update.condition_expression("attribute_not_exists(pk)")
        } else {
            update
                .condition_expression("version = :current")
                .expression_attribute_values(":current", n(version))
        };
        TransactWriteItem::builder()
            .update(update.build().expect("complete update"))
            .build()
    }

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

    /// The last sequence of each of `topics`, and whether a fan-out of it is open.
    async fn topic_marks(
        &self,
        topics: &[String],
    ) -> Result<HashMap<String, TopicMark>, StoreError> {
        let keys = topics
            .iter()
            .map(|topic| schema::topic_key(topic))
            .collect();
        let mut sequences = HashMap::new();
        for item in self.batch_get(keys).await? {
            let topic = get_s(&item, schema::PK)?
                .strip_prefix("TOPIC#")
                .ok_or_else(|| StoreError::Corrupt("topic item key".into()))?
                .to_string();
            let open_fanout = matches!(
                item.get("open_fanouts"),
                Some(AttributeValue::Ns(open)) if !open.is_empty()
            );
            sequences.insert(
                topic,
                TopicMark {
                    last_sequence: get_n(&item, "last_seq")?,
                    open_fanout,
                },
            );
        }
        Ok(sequences)
    }

    /// Every topic ever published, in name order.
    async fn topics(&self) -> Result<Vec<String>, StoreError> {
        self.query_after(schema::TOPICS_PK, None, usize::MAX)
            .await?
            .iter()
            .map(|item| get_s(item, schema::SK).map(str::to_string))
            .collect()
    }

    /// Adds the partitions whose lease ran out (their holder died, froze or handed over).
    async fn expired_leases(
        &self,
        set: &SubscriptionSet,
        found: &mut std::collections::BTreeSet<PartitionKey>,
    ) -> Result<(), StoreError> {
        let now = now_millis();
        for shard in 0..schema::LEASE_SHARDS {
            for lease in self
                .query_after(&schema::lease_shard_pk(shard), None, usize::MAX)
                .await?
            {
                if get_n(&lease, "lease_until")? < now
                    && let Some(partition) = PartitionKey::decode(get_s(&lease, schema::SK)?)
                    && set.subscriptions.contains_key(&partition.subscription_id)
                {
                    found.insert(partition);
                }
            }
        }
        Ok(())
    }

    /// Adds the partitions with pending work among the topics that changed since the last
    /// successful call (all of them on the first), and remembers what it saw.
    async fn changed_topics(
        &self,
        set: &SubscriptionSet,
        found: &mut std::collections::BTreeSet<PartitionKey>,
    ) -> Result<(), StoreError> {
        let topics = self.topics().await?;
        let marks = self.topic_marks(&topics).await?;
        let previous = self.rescanned.lock().expect("rescan lock").clone();
        for topic in &topics {
            let mark = marks.get(topic).copied().unwrap_or_default();
            // Unchanged since the last look, and no fan-out was open then (an open fan-out's
            // remaining deliveries appear without the sequence moving: its publisher or a
            // repair writes them later).
            let unchanged = previous
                .as_ref()
                .and_then(|previous| previous.get(topic))
                .is_some_and(|last| *last == mark && !last.open_fanout);
            if unchanged {
                continue;
            }
            for subscription_id in set.index.matching(topic) {
                let partition = PartitionKey::new(topic.as_str(), subscription_id);
                if !self
                    .query_after(&partition.encode(), None, 1)
                    .await?
                    .is_empty()
                {
                    found.insert(partition);
                }
            }
        }
        *self.rescanned.lock().expect("rescan lock") = Some(marks);
        Ok(())
    }

    /// A transaction item that fails unless `token` holds the partition's lease.
    fn lease_check(&self, partition: &PartitionKey, token: &LeaseToken) -> TransactWriteItem {
        TransactWriteItem::builder()
            .condition_check(
                ConditionCheck::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::lease_key(partition)))
                    .condition_expression("#token = :token")
                    .expression_attribute_names("#token", "token")
                    .expression_attribute_values(":token", s(&token.0))
                    .build()
                    .expect("complete condition check"),
            )
            .build()
    }

    /// Runs a transaction whose last item is `fence`'s lease check, if given. Returns the
    /// cancellation reasons of the other items if it was cancelled for them; `LeaseLost` if it
    /// was cancelled by the lease check.
    async fn transact_fenced(
        &self,
        mut items: Vec<TransactWriteItem>,
        fence: Option<(&PartitionKey, &LeaseToken)>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let checked = items.len();
        if let Some((partition, token)) = fence {
            items.push(self.lease_check(partition, token));
        }
        let Err(error) = self.transact(items).await else {
            return Ok(None);
        };
        let Some(reasons) = cancellation_reasons(&error) else {
            return Err(sdk_error(error));
        };
        let failed =
            |index: usize| reasons.get(index).map(String::as_str) == Some("ConditionalCheckFailed");
        let own_failure = (0..checked).any(failed);
        if let Some((partition, _)) = fence
            && failed(checked)
            && !own_failure
        {
            return Err(StoreError::LeaseLost(format!(
                "another worker holds the lease of {partition}"
            )));
        }
        if own_failure {
            return Ok(Some(reasons));
        }
        // A conflict with another transaction: nothing was written.
        Err(StoreError::Unavailable(format!(
            "transaction conflict: {}",
            DisplayErrorContext(&error)
        )))
    }

    /// Removes one pending (or dead-lettered) delivery and drops its reference to the event,
    /// deleting the event with its last reference. Returns false if it was not there.
    /// With `fence`, refused with `LeaseLost` unless the token holds the partition's lease.
    async fn remove_delivery(
        &self,
        delivery_key: Item,
        topic: &str,
        sequence: u64,
        fence: Option<(&PartitionKey, &LeaseToken)>,
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
        let Some(reasons) = self
            .transact_fenced(vec![delete_delivery(), decrement], fence)
            .await?
        else {
            return Ok(true);
        };
        if reasons.first().map(String::as_str) == Some("ConditionalCheckFailed") {
            return Ok(false);
        }
        // The decrement's condition failed: this is the last reference, so delete the event
        // with it.
        let delete_event = TransactWriteItem::builder()
            .delete(
                Delete::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::event_key(topic, sequence)))
                    .build()
                    .expect("complete delete"),
            )
            .build();
        match self
            .transact_fenced(vec![delete_delivery(), delete_event], fence)
            .await?
        {
            None => Ok(true),
            Some(_) => Ok(false),
        }
    }
}

mod publish;
mod unsubscribe;

#[async_trait]
impl Store for DynamoStore {
    async fn create_subscription(&self, subscription: &Subscription) -> Result<(), StoreError> {
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let version = self.read_version().await?;
            let mut item = schema::subscription_key(&subscription.id);
            item.insert(
                "data".into(),
                s(String::from_utf8(records::to_json(subscription)).expect("JSON is UTF-8")),
            );
            item.insert("version".into(), n(version + 1));
            let put = TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .condition_expression("attribute_not_exists(pk)")
                        .build()
                        .expect("complete put"),
                )
                .build();
            match self.transact(vec![self.bump_version(version), put]).await {
                Ok(()) => {
                    self.forget_subscriptions();
                    return Ok(());
                }
                Err(error) => match cancellation_reasons(&error) {
                    Some(reasons)
                        if reasons.get(1).map(String::as_str) == Some("ConditionalCheckFailed") =>
                    {
                        return Err(StoreError::Conflict(format!(
                            "subscription {} already exists",
                            subscription.id
                        )));
                    }
                    Some(_) => conflict_pause(attempt).await,
                    None => return Err(sdk_error(error)),
                },
            }
        }
        Err(StoreError::Contention(
            "too many concurrent subscription changes; nothing was written".into(),
        ))
    }

    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        match self.get_item(schema::subscription_key(id)).await? {
            Some(item) => from_json(get_s(&item, "data")?.as_bytes(), "subscription"),
            None => Err(StoreError::NotFound(format!("subscription {id}"))),
        }
    }

    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError> {
        let after = page_token
            .map(records::decode_subscription_token)
            .transpose()?;
        let items = self
            .query_after(schema::SUBSCRIPTIONS_PK, after.as_deref(), page_size + 1)
            .await?
            .iter()
            .map(|item| from_json::<Subscription>(get_s(item, "data")?.as_bytes(), "subscription"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(records::subscription_page(items, page_size))
    }

    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError> {
        self.unsubscribe(id).await
    }

    async fn publish(
        &self,
        event: &NewEvent,
        idempotency_window: Duration,
    ) -> Result<Published, StoreError> {
        self.publish_event(event, idempotency_window).await
    }

    async fn next_deliveries(
        &self,
        partition: &PartitionKey,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        // The head blocked by a young unfinished fan-out is not waited for here (the worker
        // lingers and reads again, and the rescan looks again at topics with a fan-out open);
        // a head committed after the topic item was read is read again, a few times.
        let mut rereads = 0;
        let fields = loop {
            let Some(horizon) = self.delivery_horizon(&partition.topic).await? else {
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
        self.remove_delivery(
            schema::delivery_key(partition, sequence),
            &partition.topic,
            sequence,
            fence.map(|token| (partition, token)),
        )
        .await
        .map(|_| ())
    }

    async fn record_failure(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        error: &str,
        outcome: FailureOutcome,
        fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        let mut holder = records::DeliveryRecord {
            attempts: 0,
            next_attempt_at: 0,
            dead_lettered: false,
            previous_sequence: 0,
            last_error: None,
        };
        holder.set_error(error);
        let error = holder.last_error.unwrap_or_default();
        let fence = fence.map(|token| (partition, token));
        let items = match outcome {
            FailureOutcome::RetryAt(at) => {
                let update = Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::delivery_key(partition, sequence)))
                    .update_expression(
                        "SET attempts = attempts + :one, next_attempt_at = :at, last_error = :error",
                    )
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":at", n(at))
                    .expression_attribute_values(":error", s(error))
                    .build()
                    .expect("complete update");
                vec![TransactWriteItem::builder().update(update).build()]
            }
            FailureOutcome::DeadLetter => {
                let Some(item) = self
                    .get_item(schema::delivery_key(partition, sequence))
                    .await?
                else {
                    return Ok(());
                };
                let mut dead = item.clone();
                dead.extend(schema::dead_key(partition, sequence));
                dead.insert("attempts".into(), n(get_n(&item, "attempts")? + 1));
                dead.insert("last_error".into(), s(error));
                vec![
                    TransactWriteItem::builder()
                        .delete(
                            Delete::builder()
                                .table_name(&self.table)
                                .set_key(Some(schema::delivery_key(partition, sequence)))
                                .condition_expression("attribute_exists(pk)")
                                .build()
                                .expect("complete delete"),
                        )
                        .build(),
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
        };
        // A cancellation for the delivery's own condition means it is no longer pending.
        self.transact_fenced(items, fence).await.map(|_| ())
    }

    async fn list_pending(
        &self,
        subscription_id: &str,
        topic: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PendingDelivery>, StoreError> {
        let after = page_token.map(records::decode_pending_token).transpose()?;
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
            let live = self
                .query_after(&partition.encode(), start.as_deref(), left)
                .await?;
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
        Ok(records::pending_page(items, page_size))
    }

    /// The first call probes every partition of every topic. Later calls probe only the
    /// partitions of topics published since the previous call (or with a fan-out open then),
    /// plus those whose lease ran out (an instance that stopped renewing or handed over), so an
    /// idle fleet costs a few requests per rescan. Expired leases are looked at first and a
    /// failure of one part does not stop the other; then a bounded share of what interrupted
    /// unsubscribes left is removed.
    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError> {
        self.forget_subscriptions();
        let set = self.subscription_set().await?;
        let mut found = std::collections::BTreeSet::new();
        let leases = self.expired_leases(&set, &mut found).await;
        let topics = self.changed_topics(&set, &mut found).await;
        if let Err(error) = self.finish_unsubscribes(SWEEP_BUDGET).await {
            // Left for the next rescan.
            tracing::warn!(%error, "cannot finish an interrupted unsubscribe yet");
        }
        match (leases, topics) {
            (Err(error), Err(_)) => Err(error),
            (Err(error), Ok(())) | (Ok(()), Err(error)) => {
                tracing::warn!(%error, "rescan incomplete; the next one tries again");
                Ok(found.into_iter().collect())
            }
            (Ok(()), Ok(())) => Ok(found.into_iter().collect()),
        }
    }

    fn request_counts(&self) -> Option<BTreeMap<&'static str, u64>> {
        Some(self.counts.snapshot())
    }

    fn leases(&self) -> Option<&dyn PartitionLeases> {
        Some(self)
    }
}

#[async_trait]
impl PartitionLeases for DynamoStore {
    async fn claim(
        &self,
        partition: &PartitionKey,
        duration: Duration,
    ) -> Result<Option<LeaseToken>, StoreError> {
        let now = now_millis();
        let token = LeaseToken::generate();
        let mut item = schema::lease_key(partition);
        item.insert("owner".into(), s(&self.instance));
        item.insert("token".into(), s(&token.0));
        item.insert("lease_until".into(), n(now + duration.as_millis() as u64));
        self.counts.add("PutItem");
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR lease_until < :now")
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(token)),
            Err(error) if is_condition_failure(&error) => Ok(None),
            Err(error) => Err(sdk_error(error)),
        }
    }

    async fn renew(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        let until = now_millis() + duration.as_millis() as u64;
        self.counts.add("UpdateItem");
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(schema::lease_key(partition)))
            .update_expression("SET lease_until = :until")
            .condition_expression("#token = :token")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":token", s(&token.0))
            .expression_attribute_values(":until", n(until))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) if is_condition_failure(&error) => Ok(false),
            Err(error) => Err(sdk_error(error)),
        }
    }

    async fn release(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        handover: bool,
    ) -> Result<(), StoreError> {
        let result = if handover {
            self.counts.add("UpdateItem");
            self.client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(schema::lease_key(partition)))
                .update_expression("SET lease_until = :expired")
                .condition_expression("#token = :token")
                .expression_attribute_names("#token", "token")
                .expression_attribute_values(":token", s(&token.0))
                .expression_attribute_values(":expired", n(0))
                .send()
                .await
                .map(|_| ())
                .map_err(|error| (is_condition_failure(&error), sdk_error(error)))
        } else {
            self.counts.add("DeleteItem");
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(schema::lease_key(partition)))
                .condition_expression("#token = :token")
                .expression_attribute_names("#token", "token")
                .expression_attribute_values(":token", s(&token.0))
                .send()
                .await
                .map(|_| ())
                .map_err(|error| (is_condition_failure(&error), sdk_error(error)))
        };
        match result {
            Ok(()) | Err((true, _)) => Ok(()),
            Err((false, error)) => Err(error),
        }
    }
}
