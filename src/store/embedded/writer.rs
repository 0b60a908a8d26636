//! The writer thread: takes queued commands in batches and applies each batch in one redb
//! transaction (group commit); turns the store unhealthy after a failed write, reopens the file
//! and probes until it can write again.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use redb::Durability;
use tokio::sync::{oneshot, watch};

use super::quarantine::{self, Damaged};
use super::schema::{PROBES, load_index, open_database};
use super::tables::Tables;
use super::{DatabaseSlot, current, unavailable};
use crate::model::{
    FailureOutcome, NewEvent, PartitionKey, Published, ReplayRange, Replayed, Subscription,
    now_millis,
};
use crate::store::topic_index::TopicIndex;
use crate::store::{StoreError, SubscriptionLimits, SubscriptionUpdate, Updated};

/// Most commands applied in one transaction.
const MAX_BATCH: usize = 2048;
/// Lazily durable commits are followed by a synced one within this interval.
const MAX_LAZY_INTERVAL: Duration = Duration::from_millis(500);
/// How often expired idempotency keys and events are swept (with the next write).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often an unhealthy store probes whether it can write again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a reopen waits for readers to let go of the old file.
const REOPEN_WAIT: Duration = Duration::from_secs(2);

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Command {
    CreateSubscription(Subscription, SubscriptionLimits, Reply<()>),
    DeleteSubscription(String, Reply<u64>),
    Publish(NewEvent, Duration, Reply<Published>),
    Complete(PartitionKey, Vec<u64>, Reply<()>),
    Failure(PartitionKey, Failure, Reply<()>),
    UpdateSubscription(String, SubscriptionUpdate, Reply<Updated>),
    RetryNow(PartitionKey, Reply<Option<u64>>),
    SkipHead(PartitionKey, u64, Reply<()>),
    Redrive(PartitionKey, Option<Vec<u64>>, Reply<u64>),
    Purge(PartitionKey, Option<Vec<u64>>, Reply<u64>),
    Replay(PartitionKey, ReplayRange, Reply<Replayed>),
}

/// A failed attempt to record (see [`crate::store::DeliveryLog::record_failure`]).
pub(super) struct Failure {
    pub sequence: u64,
    /// The attempt's number, 1 for the first.
    pub attempt: u32,
    pub error: String,
    pub outcome: FailureOutcome,
}

impl Command {
    /// Completions and failures that leave the delivery pending may be lost in a crash (the
    /// delivery is then sent again, in order: a repeat). Everything else is acknowledged only
    /// once synced; a dead letter above all, since the partition's next event is sent after
    /// it: lost, it would be sent again after its successor.
    fn needs_sync(&self) -> bool {
        match self {
            Command::Complete(..) => false,
            Command::Failure(_, failure, _) => failure.outcome == FailureOutcome::DeadLetter,
            _ => true,
        }
    }
}

/// A command's result, held until its batch commits.
enum Answer {
    Unit(Result<(), StoreError>),
    Count(Result<u64, StoreError>),
    Published(Result<Published, StoreError>),
    Updated(Result<Box<Updated>, StoreError>),
    Head(Result<Option<u64>, StoreError>),
    Replayed(Result<Replayed, StoreError>),
}

impl Command {
    /// Sends the command its answer. A receiver that went away (a client that gave up) needs
    /// none.
    fn answer(self, answer: Answer) {
        match (self, answer) {
            (
                Command::CreateSubscription(.., reply)
                | Command::Complete(.., reply)
                | Command::Failure(.., reply)
                | Command::SkipHead(.., reply),
                Answer::Unit(result),
            ) => {
                let _ = reply.send(result);
            }
            (
                Command::DeleteSubscription(.., reply)
                | Command::Redrive(.., reply)
                | Command::Purge(.., reply),
                Answer::Count(result),
            ) => {
                let _ = reply.send(result);
            }
            (Command::Publish(.., reply), Answer::Published(result)) => {
                let _ = reply.send(result);
            }
            (Command::UpdateSubscription(.., reply), Answer::Updated(result)) => {
                let _ = reply.send(result.map(|updated| *updated));
            }
            (Command::RetryNow(.., reply), Answer::Head(result)) => {
                let _ = reply.send(result);
            }
            (Command::Replay(.., reply), Answer::Replayed(result)) => {
                let _ = reply.send(result);
            }
            _ => unreachable!("each command is answered by the kind its apply produced"),
        }
    }

    /// Answers the command with `error`.
    fn fail(self, error: StoreError) {
        match self {
            Command::CreateSubscription(.., reply)
            | Command::Complete(.., reply)
            | Command::Failure(.., reply)
            | Command::SkipHead(.., reply) => {
                let _ = reply.send(Err(error));
            }
            Command::DeleteSubscription(.., reply)
            | Command::Redrive(.., reply)
            | Command::Purge(.., reply) => {
                let _ = reply.send(Err(error));
            }
            Command::Publish(.., reply) => {
                let _ = reply.send(Err(error));
            }
            Command::UpdateSubscription(.., reply) => {
                let _ = reply.send(Err(error));
            }
            Command::RetryNow(.., reply) => {
                let _ = reply.send(Err(error));
            }
            Command::Replay(.., reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// How a batch failed: the error, and, if one command's damaged record caused it, which.
struct BatchFailure {
    error: StoreError,
    damaged: Option<(usize, Damaged)>,
}

/// The writer's test hooks (feature `fault-injection`), shared with the store's handle.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Default)]
pub(super) struct WriterFaults {
    /// Milliseconds to sleep before the next batch.
    pub stall: Arc<std::sync::atomic::AtomicU64>,
    /// Batches applied so far (each counted once, however often it was applied again).
    pub batches: Arc<std::sync::atomic::AtomicU64>,
}

/// The single writer: owns the topic index and applies command batches.
pub(super) struct Writer {
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
    /// How long events are kept after their last delivery, in milliseconds.
    retention_ms: Arc<std::sync::atomic::AtomicU64>,
    #[cfg(feature = "fault-injection")]
    faults: WriterFaults,
}

impl Writer {
    pub(super) fn new(
        database: DatabaseSlot,
        path: PathBuf,
        cache_bytes: usize,
        index: TopicIndex,
        health: watch::Sender<bool>,
        retention_ms: Arc<std::sync::atomic::AtomicU64>,
        #[cfg(feature = "fault-injection")] faults: WriterFaults,
    ) -> Self {
        Writer {
            database,
            path,
            cache_bytes,
            index,
            last_sync: Instant::now(),
            unsynced: false,
            last_sweep: Instant::now(),
            health,
            last_probe: Instant::now(),
            retention_ms,
            #[cfg(feature = "fault-injection")]
            faults,
        }
    }

    pub(super) fn run(mut self, receiver: mpsc::Receiver<Command>) {
        loop {
            let first = match receiver.recv_timeout(MAX_LAZY_INTERVAL) {
                Ok(command) => {
                    #[cfg(feature = "fault-injection")]
                    {
                        let stall = self
                            .faults
                            .stall
                            .swap(0, std::sync::atomic::Ordering::SeqCst);
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

    fn apply_batch(&mut self, mut batch: Vec<Command>) {
        #[cfg(feature = "fault-injection")]
        self.faults
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sync = batch.is_empty()
            || batch.iter().any(Command::needs_sync)
            || self.last_sync.elapsed() >= MAX_LAZY_INTERVAL;
        loop {
            let mut index_changed = false;
            match self.write_batch(&batch, sync, &mut index_changed) {
                Ok(answers) => {
                    self.set_healthy(true);
                    if sync {
                        self.last_sync = Instant::now();
                        self.unsynced = false;
                    } else {
                        self.unsynced = true;
                    }
                    for (command, answer) in batch.into_iter().zip(answers) {
                        command.answer(answer);
                    }
                    return;
                }
                Err(BatchFailure {
                    error,
                    damaged: Some((index, damaged)),
                }) => {
                    // Nothing was written: the topic index follows what is stored again, the
                    // command that met the record fails alone, and the rest is applied again.
                    self.recover(index_changed);
                    self.quarantine(&damaged, &error);
                    batch.remove(index).fail(error);
                }
                Err(BatchFailure { error, .. }) => {
                    tracing::error!(%error, "store batch failed; nothing in it was written");
                    self.set_healthy(false);
                    self.recover(index_changed);
                    for command in batch {
                        command.fail(error.clone());
                    }
                    return;
                }
            }
        }
    }

    /// Moves a damaged delivery record aside (see [`super::quarantine`]).
    fn quarantine(&self, damaged: &Damaged, error: &StoreError) {
        let key = damaged.quarantine_key();
        let result = current(&self.database)
            .and_then(|database| quarantine::quarantine(&database, damaged, &error.to_string()));
        match result {
            Ok(()) => {
                tracing::error!(%error, quarantined = %key, "a delivery record did not decode: kept in the quarantine table, a dead letter in its place")
            }
            Err(quarantine_error) => {
                tracing::error!(%error, %quarantine_error, record = %key, "a delivery record did not decode and cannot be quarantined")
            }
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

    /// Applies `batch` in one transaction and commits it; returns each command's answer.
    fn write_batch(
        &mut self,
        batch: &[Command],
        sync: bool,
        index_changed: &mut bool,
    ) -> Result<Vec<Answer>, BatchFailure> {
        let failed = |error: StoreError| BatchFailure {
            error,
            damaged: None,
        };
        let mut transaction = current(&self.database)
            .map_err(failed)?
            .begin_write()
            .map_err(|error| failed(unavailable(error)))?;
        let durability = if sync {
            Durability::Immediate
        } else {
            Durability::None
        };
        transaction
            .set_durability(durability)
            .map_err(|error| failed(StoreError::Internal(error.to_string())))?;
        // Saves the allocator state with each synced commit, so that reopening after a crash
        // does not walk the whole file.
        transaction.set_quick_repair(sync);
        let mut answers = Vec::with_capacity(batch.len());
        {
            let retention = self.retention_ms.load(std::sync::atomic::Ordering::Relaxed);
            let mut tables = Tables::open(&transaction, retention)
                .map_err(|error| failed(unavailable(error)))?;
            let now = now_millis();
            for (index, command) in batch.iter().enumerate() {
                let answer = self
                    .apply(&mut tables, command, now, index_changed)
                    .map_err(|error| BatchFailure {
                        damaged: tables.take_damaged().map(|damaged| (index, damaged)),
                        error,
                    })?;
                answers.push(answer);
            }
            tables.settle().map_err(failed)?;
            if self.last_sweep.elapsed() >= SWEEP_INTERVAL {
                tables.expire_idempotency_keys(now).map_err(failed)?;
                tables.expire_events(now).map_err(failed)?;
                self.last_sweep = Instant::now();
            }
        }
        self.commit(transaction).map_err(failed)?;
        Ok(answers)
    }

    /// Applies one command; an error fails the whole batch.
    fn apply(
        &mut self,
        tables: &mut Tables,
        command: &Command,
        now: u64,
        index_changed: &mut bool,
    ) -> Result<Answer, StoreError> {
        if !matches!(
            command,
            Command::Complete(..) | Command::Failure(..) | Command::Publish(..)
        ) {
            // It reads and writes the tables directly.
            tables.settle()?;
        }
        Ok(match command {
            Command::CreateSubscription(subscription, limits, _) => {
                let result = tables.create_subscription(subscription, limits, &self.index);
                if matches!(result, Ok(Ok(()))) {
                    self.index.add(subscription);
                    *index_changed = true;
                }
                Answer::Unit(result?)
            }
            Command::DeleteSubscription(id, _) => {
                let result = tables.delete_subscription(id);
                if let Ok(Ok((subscription, _))) = &result {
                    self.index.remove(subscription);
                    *index_changed = true;
                }
                Answer::Count(result?.map(|(_, count)| count))
            }
            Command::Publish(event, window, _) => {
                Answer::Published(tables.publish(&self.index, event, *window, now)?)
            }
            Command::Complete(partition, sequences, _) => {
                Answer::Unit(Ok(tables.complete(partition, sequences)?))
            }
            Command::Failure(partition, failure, _) => {
                Answer::Unit(Ok(tables.record_failure(partition, failure)?))
            }
            Command::UpdateSubscription(id, update, _) => {
                let result = tables.update_subscription(id, update)?;
                if let Ok((old, updated)) = &result
                    && (old.topics != updated.subscription.topics
                        || old.filter != updated.subscription.filter)
                {
                    self.index.remove(old);
                    self.index.add(&updated.subscription);
                    *index_changed = true;
                }
                Answer::Updated(result.map(|(_, updated)| Box::new(updated)))
            }
            Command::RetryNow(partition, _) => Answer::Head(tables.retry_now(partition, now)?),
            Command::SkipHead(partition, sequence, _) => {
                Answer::Unit(tables.skip_head(partition, *sequence)?)
            }
            Command::Redrive(partition, sequences, _) => {
                Answer::Count(tables.redrive(partition, sequences.as_deref(), now)?)
            }
            Command::Purge(partition, sequences, _) => {
                Answer::Count(tables.purge(partition, sequences.as_deref())?)
            }
            Command::Replay(partition, range, _) => {
                Answer::Replayed(tables.replay(partition, range, now)?)
            }
        })
    }

    /// Commits; a failed commit's outcome is unknown.
    fn commit(&self, transaction: redb::WriteTransaction) -> Result<(), StoreError> {
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
