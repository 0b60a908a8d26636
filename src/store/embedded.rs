//! The embedded single-node backend, on redb (one file, `herald.redb`, in the data directory).
//!
//! Reads go straight to a read transaction. Every write goes through one writer thread that
//! takes all commands queued while the previous commit was syncing and applies them in one
//! transaction: group commit, so durability costs one fsync per batch, not per event. The
//! writer also owns the in-memory topic index used for fan-out, and assigns sequences, so the
//! order of sequences is the order of commits.

use std::path::Path;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use tokio::sync::{oneshot, watch};

use crate::model::{
    Event, FailureOutcome, NewEvent, Page, PartitionKey, PendingDelivery, Published, Subscription,
    now_micros, now_millis,
};
use crate::store::records::{
    self, DeliveryRecord, IdempotencyRecord, PartitionRecord, decode_event, encode_event,
    from_json, to_json,
};
use crate::store::topic_index::TopicIndex;
use crate::store::{LeaseToken, Store, StoreError};

/// Subscription id -> JSON subscription.
const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscriptions");
/// Topic -> last sequence assigned.
const TOPICS: TableDefinition<&str, u64> = TableDefinition::new("topics");
/// (topic, sequence) -> event (header + payload), kept while any delivery of it is pending.
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
/// (topic, sequence) -> number of pending deliveries of the event.
const EVENT_REFERENCES: TableDefinition<(&str, u64), u32> = TableDefinition::new("event_refs");
/// (subscription id, topic) -> partition record.
const PARTITIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("partitions");
/// (subscription id, topic) of every partition with pending deliveries.
const PENDING_PARTITIONS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("pending_partitions");
/// (`{topic}#{subscription id}`, sequence) -> delivery record.
const DELIVERIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("deliveries");
/// (topic, idempotency key) -> idempotency record.
const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
/// (expiry time, topic, key) of every idempotency record, for expiring them in order.
const IDEMPOTENCY_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");

/// One row the writer rewrites to check that the file can be written again after an error.
const PROBES: TableDefinition<&str, u64> = TableDefinition::new("probes");

/// Default page cache: enough for the hot part of a large backlog, far below redb's 1 GiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Writes waiting for the writer at most; more wait for room (backpressure).
const WRITE_QUEUE: usize = 8192;
/// How long a write waits for room in a full queue before it is refused.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Most commands applied in one transaction.
const MAX_BATCH: usize = 2048;
/// Lazily durable commits are followed by a synced one within this interval.
const MAX_LAZY_INTERVAL: Duration = Duration::from_millis(500);
/// How often expired idempotency keys are swept, and how many at most per sweep.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
const SWEEP_LIMIT: usize = 1000;

/// The open database. The writer replaces it (reopens the file) after a write fails, since
/// redb refuses every later write after an I/O error; `None` while that is under way.
type DatabaseSlot = Arc<RwLock<Option<Arc<Database>>>>;

/// How often an unhealthy store probes whether it can write again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a reopen waits for readers to let go of the old file.
const REOPEN_WAIT: Duration = Duration::from_secs(2);

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    database: DatabaseSlot,
    commands: mpsc::SyncSender<Command>,
    writer: Option<std::thread::JoinHandle<()>>,
    health: watch::Receiver<bool>,
    /// Test-only: milliseconds the writer sleeps before its next batch.
    #[cfg(feature = "fault-injection")]
    stall: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for EmbeddedStore {
    /// Stops the writer after the commands already queued and waits for it, so the database
    /// file is closed cleanly before the store is gone.
    fn drop(&mut self) {
        let (closed, _) = mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.commands, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    CreateSubscription(Subscription, Reply<()>),
    DeleteSubscription(String, Reply<u64>),
    Publish(NewEvent, Duration, Reply<Published>),
    Complete(PartitionKey, u64, Reply<()>),
    Failure(PartitionKey, u64, String, FailureOutcome, Reply<()>),
}

impl Command {
    /// Completions and failure records may be lost in a crash (the delivery is then retried);
    /// everything else is acknowledged only once synced.
    fn needs_sync(&self) -> bool {
        !matches!(self, Command::Complete(..) | Command::Failure(..))
    }
}

/// A command's result, held until the batch commits.
enum Outcome {
    Unit(Reply<()>, Result<(), StoreError>),
    Count(Reply<u64>, Result<u64, StoreError>),
    Published(Reply<Published>, Result<Published, StoreError>),
}

impl Outcome {
    fn send(self, batch_error: Option<&StoreError>) {
        // A receiver that went away (client cancelled) needs no answer.
        match self {
            Outcome::Unit(reply, result) => {
                let _ = reply.send(batch_error.map_or(result, |error| Err(error.clone())));
            }
            Outcome::Count(reply, result) => {
                let _ = reply.send(batch_error.map_or(result, |error| Err(error.clone())));
            }
            Outcome::Published(reply, result) => {
                let _ = reply.send(batch_error.map_or(result, |error| Err(error.clone())));
            }
        }
    }
}

fn unavailable(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(error.into().to_string())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir` with the default page cache.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(data_dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (creating if needed) the store in `data_dir`, with a page cache of at most
    /// `cache_bytes`, and starts its writer thread. Returns `Unavailable` if the directory or
    /// file cannot be opened (for example when another process holds it), `Internal` with what
    /// to do if the file is not a Herald store or is damaged.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            StoreError::Unavailable(format!("cannot create {}: {error}", data_dir.display()))
        })?;
        let path = data_dir.join("herald.redb");
        let database = open_database(&path, cache_bytes)?;
        let index = load_index(&database)?;
        let slot: DatabaseSlot = Arc::new(RwLock::new(Some(Arc::new(database))));
        let (commands, receiver) = mpsc::sync_channel(WRITE_QUEUE);
        let (health_sender, health) = watch::channel(true);
        #[cfg(feature = "fault-injection")]
        let stall = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = Writer {
            database: slot.clone(),
            path,
            cache_bytes,
            index,
            last_sync: Instant::now(),
            unsynced: false,
            last_sweep: Instant::now(),
            health: health_sender,
            last_probe: Instant::now(),
            #[cfg(feature = "fault-injection")]
            stall: stall.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("herald-store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|error| StoreError::Internal(format!("cannot start writer: {error}")))?;
        Ok(EmbeddedStore {
            database: slot,
            commands,
            writer: Some(writer),
            health,
            #[cfg(feature = "fault-injection")]
            stall,
        })
    }

    /// Makes the writer sleep `duration` before its next batch, as a stalled disk would.
    /// Test-only (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_writer_stall(&self, duration: Duration) {
        self.stall.store(
            duration.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Queues a command for the writer and waits for its result. A full queue is backpressure:
    /// the caller waits for room up to [`QUEUE_WAIT`], then gets `Overloaded`.
    async fn submit<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, response) = oneshot::channel();
        let mut command = command(reply);
        let deadline = Instant::now() + QUEUE_WAIT;
        loop {
            match self.commands.try_send(command) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(returned)) if Instant::now() < deadline => {
                    command = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(mpsc::TrySendError::Full(_)) => {
                    return Err(StoreError::Overloaded(format!(
                        "the store's write queue stayed full ({WRITE_QUEUE} writes waiting) for \
                         {QUEUE_WAIT:?}; nothing was written"
                    )));
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(StoreError::Unavailable("store writer stopped".into()));
                }
            }
        }
        response
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    /// Runs a read on a blocking thread (redb reads are synchronous), off the async workers.
    async fn read_with<T: Send + 'static>(
        &self,
        job: impl FnOnce(ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = self.database.clone();
        tokio::task::spawn_blocking(move || {
            let transaction = current(&slot)?.begin_read().map_err(unavailable)?;
            job(transaction)
        })
        .await
        .map_err(|error| StoreError::Internal(format!("read task failed: {error}")))?
    }
}

/// The database in the slot, or `Unavailable` while it is being reopened.
fn current(slot: &DatabaseSlot) -> Result<Arc<Database>, StoreError> {
    slot.read()
        .expect("database slot lock")
        .clone()
        .ok_or_else(|| StoreError::Unavailable("the store is reopening after a write error".into()))
}

/// Opens (or creates) the database file and its tables, explaining the failures an operator
/// can act on.
fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let database = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|error| match error {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                "{} is in use by another process (one `herald serve` per data directory)",
                path.display()
            )),
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))
            | redb::DatabaseError::UpgradeRequired(_) => damaged(path, &error),
            redb::DatabaseError::Storage(redb::StorageError::Io(ref io))
                if io.kind() == std::io::ErrorKind::InvalidData =>
            {
                damaged(path, &error)
            }
            other => StoreError::Unavailable(format!("cannot open {}: {other}", path.display())),
        })?;
    let transaction = database.begin_write().map_err(unavailable)?;
    create_tables(&transaction).map_err(unavailable)?;
    transaction.commit().map_err(unavailable)?;
    Ok(database)
}

fn damaged(path: &Path, error: &redb::DatabaseError) -> StoreError {
    StoreError::Internal(format!(
        "{} is not a Herald data file or is damaged ({error}); move it aside to start with an \
         empty store, or restore it from a backup",
        path.display()
    ))
}

fn create_tables(transaction: &WriteTransaction) -> Result<(), redb::Error> {
    transaction.open_table(SUBSCRIPTIONS)?;
    transaction.open_table(TOPICS)?;
    transaction.open_table(EVENTS)?;
    transaction.open_table(EVENT_REFERENCES)?;
    transaction.open_table(PARTITIONS)?;
    transaction.open_table(PENDING_PARTITIONS)?;
    transaction.open_table(DELIVERIES)?;
    transaction.open_table(IDEMPOTENCY)?;
    transaction.open_table(IDEMPOTENCY_EXPIRY)?;
    transaction.open_table(PROBES)?;
    Ok(())
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create_subscription(&self, subscription: &Subscription) -> Result<(), StoreError> {
        let subscription = subscription.clone();
        self.submit(|reply| Command::CreateSubscription(subscription, reply))
            .await
    }

    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        let id = id.to_string();
        self.read_with(move |transaction| {
            let id = id.as_str();
            let table = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
            let value = table.get(id).map_err(unavailable)?;
            match value {
                Some(bytes) => from_json(bytes.value(), "subscription"),
                None => Err(StoreError::NotFound(format!("subscription {id}"))),
            }
        })
        .await
    }

    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError> {
        let after = page_token
            .map(records::decode_subscription_token)
            .transpose()?;
        self.read_with(move |transaction| {
            let table = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
            let range = match after.as_deref() {
                Some(after) => table
                    .range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
                None => table.range::<&str>(..),
            }
            .map_err(unavailable)?;
            // One more than asked, to learn whether another page follows.
            let mut items = Vec::new();
            for entry in range.take(page_size + 1) {
                let (_, value) = entry.map_err(unavailable)?;
                items.push(from_json::<Subscription>(value.value(), "subscription")?);
            }
            Ok(records::subscription_page(items, page_size))
        })
        .await
    }

    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError> {
        let id = id.to_string();
        self.submit(|reply| Command::DeleteSubscription(id, reply))
            .await
    }

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
            let mut deliveries = read_partition(
                &transaction,
                partition,
                record.dead_through.saturating_add(1),
                limit,
            )?;
            deliveries.retain(|delivery| !delivery.state.dead_lettered);
            Ok(deliveries)
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
        self.submit(|reply| Command::Complete(partition, sequence, reply))
            .await
    }

    async fn record_failure(
        &self,
        partition: &PartitionKey,
        sequence: u64,
        error: &str,
        outcome: FailureOutcome,
        _fence: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        let partition = partition.clone();
        let error = error.to_string();
        self.submit(|reply| Command::Failure(partition, sequence, error, outcome, reply))
            .await
    }

    async fn list_pending(
        &self,
        subscription_id: &str,
        topic: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<PendingDelivery>, StoreError> {
        let after = page_token.map(records::decode_pending_token).transpose()?;
        let subscription_id = subscription_id.to_string();
        let topic = topic.map(str::to_string);
        self.read_with(move |transaction| {
            let subscription_id = subscription_id.as_str();
            let topic = topic.as_deref();
            {
                let subscriptions = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
                if subscriptions
                    .get(subscription_id)
                    .map_err(unavailable)?
                    .is_none()
                {
                    return Err(StoreError::NotFound(format!(
                        "subscription {subscription_id}"
                    )));
                }
            }
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
                    items = read_partition(&transaction, &partition, start_after(topic), wanted)?;
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
                        items.extend(read_partition(
                            &transaction,
                            &partition,
                            start_after(topic),
                            left,
                        )?);
                    }
                }
            }
            Ok(records::pending_page(items, page_size))
        })
        .await
    }

    fn health(&self) -> Option<watch::Receiver<bool>> {
        Some(self.health.clone())
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

/// Reads up to `limit` deliveries of a partition with sequence >= `from`, joined with events.
fn read_partition(
    transaction: &ReadTransaction,
    partition: &PartitionKey,
    from: u64,
    limit: usize,
) -> Result<Vec<PendingDelivery>, StoreError> {
    let deliveries = transaction.open_table(DELIVERIES).map_err(unavailable)?;
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
        let record: DeliveryRecord = from_json(value.value(), "delivery")?;
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
        });
    }
    Ok(result)
}

/// Builds the topic index from the stored subscriptions.
fn load_index(database: &Database) -> Result<TopicIndex, StoreError> {
    let transaction = database.begin_read().map_err(unavailable)?;
    let table = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
    let mut index = TopicIndex::default();
    for entry in table.iter().map_err(unavailable)? {
        let (_, value) = entry.map_err(unavailable)?;
        index.add(&from_json::<Subscription>(value.value(), "subscription")?);
    }
    Ok(index)
}

/// The single writer: owns the topic index and applies command batches.
struct Writer {
    database: DatabaseSlot,
    path: PathBuf,
    cache_bytes: usize,
    index: TopicIndex,
    last_sync: Instant,
    /// True while a commit made with `Durability::None` awaits a synced one.
    unsynced: bool,
    last_sweep: Instant,
    /// False from a failed write until a write succeeds again.
    health: watch::Sender<bool>,
    last_probe: Instant,
    #[cfg(feature = "fault-injection")]
    stall: Arc<std::sync::atomic::AtomicU64>,
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Command>) {
        loop {
            let first = match receiver.recv_timeout(MAX_LAZY_INTERVAL) {
                Ok(command) => {
                    #[cfg(feature = "fault-injection")]
                    {
                        let stall = self.stall.swap(0, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(stall));
                    }
                    command
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !*self.health.borrow() {
                        self.probe();
                    } else if self.unsynced {
                        // Idle: make lazily recorded completions durable too.
                        self.apply_batch(Vec::new());
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Closing: make lazily recorded completions durable before the file closes.
                    if self.unsynced {
                        self.apply_batch(Vec::new());
                    }
                    break;
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.apply_batch(batch);
        }
    }

    fn apply_batch(&mut self, batch: Vec<Command>) {
        let sync = batch.is_empty()
            || batch.iter().any(Command::needs_sync)
            || self.last_sync.elapsed() >= MAX_LAZY_INTERVAL;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut index_changed = false;
        let result = self.write_batch(batch, sync, &mut outcomes, &mut index_changed);
        let error = result.err();
        if let Some(error) = &error {
            tracing::error!(%error, "store batch failed; nothing in it was written");
            self.set_healthy(false);
            self.recover(index_changed);
        } else {
            self.set_healthy(true);
            if sync {
                self.last_sync = Instant::now();
                self.unsynced = false;
            } else {
                self.unsynced = true;
            }
        }
        for outcome in outcomes {
            outcome.send(error.as_ref());
        }
    }

    fn set_healthy(&self, healthy: bool) {
        self.health.send_if_modified(|current| {
            let changed = *current != healthy;
            *current = healthy;
            changed
        });
    }

    /// After a failed batch: reopens the file if it refuses writes (redb does after an I/O
    /// error), and rebuilds the topic index from what is stored if the batch had changed it.
    fn recover(&mut self, index_changed: bool) {
        let writable = current(&self.database)
            .and_then(|database| database.begin_write().map_err(unavailable))
            .map(|transaction| {
                let _ = transaction.abort();
            })
            .is_ok();
        if !writable {
            // Reloads the index too, when it succeeds.
            self.reopen();
            return;
        }
        if index_changed {
            match current(&self.database).and_then(|database| load_index(&database)) {
                Ok(index) => self.index = index,
                Err(error) => tracing::error!(%error, "cannot reload topic index"),
            }
        }
    }

    /// Closes and reopens the database file. Returns false if it cannot be reopened yet (the
    /// slot is then empty and every call answers `Unavailable` until a later probe succeeds).
    fn reopen(&mut self) -> bool {
        let old = self.database.write().expect("database slot lock").take();
        drop(old);
        let deadline = Instant::now() + REOPEN_WAIT;
        loop {
            match open_database(&self.path, self.cache_bytes) {
                Ok(database) => {
                    // The index follows what is stored: a batch that failed may have changed it.
                    match load_index(&database) {
                        Ok(index) => self.index = index,
                        Err(error) => {
                            tracing::error!(%error, "cannot reload the topic index");
                            return false;
                        }
                    }
                    *self.database.write().expect("database slot lock") = Some(Arc::new(database));
                    // Lazily durable commits not synced before the error may be gone: their
                    // deliveries are sent again (at-least-once).
                    self.unsynced = false;
                    tracing::warn!(path = %self.path.display(), "reopened the store after a write error");
                    return true;
                }
                // Readers still hold the old file for a moment.
                Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => {
                    tracing::error!(%error, "cannot reopen the store yet");
                    return false;
                }
            }
        }
    }

    /// While unhealthy and idle: tries a small synced write, at most every
    /// [`PROBE_INTERVAL`]; health turns back once it succeeds.
    fn probe(&mut self) {
        if self.last_probe.elapsed() < PROBE_INTERVAL {
            return;
        }
        self.last_probe = Instant::now();
        if current(&self.database).is_err() && !self.reopen() {
            return;
        }
        let result = current(&self.database).and_then(|database| {
            let transaction = database.begin_write().map_err(unavailable)?;
            {
                let mut probes = transaction.open_table(PROBES).map_err(unavailable)?;
                probes.insert("last", now_millis()).map_err(unavailable)?;
            }
            transaction.commit().map_err(unavailable)
        });
        match result {
            Ok(()) => {
                tracing::warn!("the store can write again");
                self.set_healthy(true);
            }
            Err(error) => {
                tracing::warn!(%error, "the store still cannot write");
                self.recover(false);
            }
        }
    }

    fn write_batch(
        &mut self,
        batch: Vec<Command>,
        sync: bool,
        outcomes: &mut Vec<Outcome>,
        index_changed: &mut bool,
    ) -> Result<(), StoreError> {
        let mut transaction = current(&self.database)?
            .begin_write()
            .map_err(unavailable)?;
        let durability = if sync {
            Durability::Immediate
        } else {
            Durability::None
        };
        transaction
            .set_durability(durability)
            .map_err(|error| StoreError::Internal(error.to_string()))?;
        // Saves the allocator state with each synced commit, so that reopening after a crash
        // does not walk the whole file.
        transaction.set_quick_repair(sync);
        {
            let mut tables = Tables::open(&transaction).map_err(unavailable)?;
            let now = now_millis();
            for command in batch {
                let outcome = match command {
                    Command::CreateSubscription(subscription, reply) => {
                        let result = tables.create_subscription(&subscription);
                        if matches!(result, Ok(Ok(()))) {
                            self.index.add(&subscription);
                            *index_changed = true;
                        }
                        Outcome::Unit(reply, result?)
                    }
                    Command::DeleteSubscription(id, reply) => {
                        let result = tables.delete_subscription(&id);
                        if let Ok(Ok((subscription, _))) = &result {
                            self.index.remove(subscription);
                            *index_changed = true;
                        }
                        Outcome::Count(reply, result?.map(|(_, count)| count))
                    }
                    Command::Publish(event, window, reply) => {
                        let result = tables.publish(&self.index, &event, window, now);
                        Outcome::Published(reply, result?)
                    }
                    Command::Complete(partition, sequence, reply) => {
                        Outcome::Unit(reply, Ok(tables.complete(&partition, sequence)?))
                    }
                    Command::Failure(partition, sequence, error, outcome, reply) => Outcome::Unit(
                        reply,
                        Ok(tables.record_failure(&partition, sequence, &error, &outcome)?),
                    ),
                };
                outcomes.push(outcome);
            }
            if self.last_sweep.elapsed() >= SWEEP_INTERVAL {
                tables.expire_idempotency_keys(now)?;
                self.last_sweep = Instant::now();
            }
        }
        // An error here may come after the data reached the file: the outcome is unknown.
        transaction.commit().map_err(|error| {
            let full = matches!(
                &error,
                redb::CommitError::Storage(redb::StorageError::Io(io))
                    if io.kind() == std::io::ErrorKind::StorageFull
            );
            let text = redb::Error::from(error).to_string();
            if full {
                StoreError::StorageFull(format!(
                    "the data directory's disk is full ({text}); this call may or may not have \
                     taken effect"
                ))
            } else {
                StoreError::Uncertain(text)
            }
        })
    }
}

/// Result of one command: the outer error aborts the batch, the inner one is the command's own.
type Applied<T> = Result<Result<T, StoreError>, StoreError>;

/// The tables of one write transaction.
struct Tables<'transaction> {
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
    fn open(transaction: &'transaction WriteTransaction) -> Result<Self, redb::Error> {
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

    fn create_subscription(&mut self, subscription: &Subscription) -> Applied<()> {
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
        self.subscriptions
            .insert(subscription.id.as_str(), to_json(subscription).as_slice())
            .map_err(unavailable)?;
        Ok(Ok(()))
    }

    fn delete_subscription(&mut self, id: &str) -> Applied<(Subscription, u64)> {
        let subscription: Subscription = match self.subscriptions.remove(id).map_err(unavailable)? {
            Some(bytes) => from_json(bytes.value(), "subscription")?,
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

    fn publish(
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
            let original: IdempotencyRecord = from_json(bytes.value(), "idempotency record")?;
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
            let delivery = DeliveryRecord {
                attempts: 0,
                next_attempt_at: now,
                dead_lettered: false,
                previous_sequence: record.last_enqueued,
                last_error: None,
            };
            self.deliveries
                .insert(
                    (partition.encode().as_str(), sequence),
                    to_json(&delivery).as_slice(),
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

    fn remember_key(
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
            .map(|bytes| from_json::<IdempotencyRecord>(bytes.value(), "idempotency record"));
        if let Some(previous) = previous {
            self.idempotency_expiry
                .remove((previous?.expires_at, topic, key))
                .map_err(unavailable)?;
        }
        let record = IdempotencyRecord {
            event_id: published.event_id.clone(),
            sequence: published.sequence,
            published_at: published.published_at,
            subscription_count: published.subscription_count,
            expires_at,
        };
        self.idempotency
            .insert((topic, key), to_json(&record).as_slice())
            .map_err(unavailable)?;
        self.idempotency_expiry
            .insert((expires_at, topic, key), ())
            .map_err(unavailable)?;
        Ok(())
    }

    fn expire_idempotency_keys(&mut self, now: u64) -> Result<(), StoreError> {
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

    fn partition(&self, subscription_id: &str, topic: &str) -> Result<PartitionRecord, StoreError> {
        match self
            .partitions
            .get((subscription_id, topic))
            .map_err(unavailable)?
        {
            Some(bytes) => PartitionRecord::decode(bytes.value()),
            None => Ok(PartitionRecord::default()),
        }
    }

    fn delivery(
        &self,
        partition_key: &str,
        sequence: u64,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        match self
            .deliveries
            .get((partition_key, sequence))
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(Some(from_json(bytes.value(), "delivery")?)),
            None => Ok(None),
        }
    }

    fn complete(&mut self, partition: &PartitionKey, sequence: u64) -> Result<(), StoreError> {
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

    fn record_failure(
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
                to_json(&delivery).as_slice(),
            )
            .map_err(unavailable)?;
        Ok(())
    }

    /// Drops one reference to an event, deleting it with the last.
    fn release_event(&mut self, topic: &str, sequence: u64) -> Result<(), StoreError> {
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
