//! The embedded single-node backend, on redb (one file, `herald.redb`, in the data directory).
//!
//! Reads run on a fixed pool of reader threads (`readers`), each in its own read transaction.
//! Every write goes through one writer thread (`writer`) that takes all commands queued while
//! the previous commit was syncing and applies them in one transaction (`tables`): group
//! commit, so durability costs one fsync per batch, not per event. The writer also owns the
//! in-memory topic index used for fan-out, and assigns sequences, so the order of sequences is
//! the order of commits.
//!
//! One process owns the file, so the store has no partition leases.

mod delivery_log;
mod quarantine;
mod readers;
mod schema;
mod subscriptions;
mod tables;
mod writer;

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, ReadableDatabase};
use tokio::sync::{oneshot, watch};

use crate::store::{PartitionLeases, Store, StoreError};
use writer::{Command, Reply, Writer};

/// Writes waiting for the writer at most; more wait for room (backpressure).
const WRITE_QUEUE: usize = 8192;
/// How long a write waits for room in a full queue before it is refused.
const QUEUE_WAIT: Duration = Duration::from_secs(2);

/// The open database. The writer replaces it (reopens the file) after a write fails, since
/// redb refuses every later write after an I/O error; `None` while that is under way.
type DatabaseSlot = Arc<RwLock<Option<Arc<Database>>>>;

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    database: DatabaseSlot,
    commands: mpsc::SyncSender<Command>,
    writer: Option<std::thread::JoinHandle<()>>,
    health: watch::Receiver<bool>,
    /// The threads that run reads: a fixed few, so that a thousand partitions reading at once
    /// do not start hundreds of threads (each with its own allocator caches and stack).
    readers: readers::ReaderPool,
    /// How long events are kept after their last delivery, in milliseconds (see
    /// [`EmbeddedStore::set_retention`]).
    retention_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Test-only: the writer's hooks (a stall before its next batch, batches applied).
    #[cfg(feature = "fault-injection")]
    faults: writer::WriterFaults,
}

impl Drop for EmbeddedStore {
    /// Stops the readers and the writer after the reads and commands already queued and waits
    /// for them, so that nothing but the store holds the database when it closes the file.
    fn drop(&mut self) {
        self.readers.close();
        let (closed, _) = mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.commands, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn unavailable(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(error.into().to_string())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir` with the default page cache.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(data_dir, crate::config::defaults::store_cache_bytes())
    }

    /// Opens (creating if needed) the store in `data_dir`, with a page cache of at most
    /// `cache_bytes`, and starts its writer thread. Returns `Unavailable` if the directory or
    /// file cannot be opened (for example when another process holds it), `Internal` with what
    /// to do if the file is not a Herald store or is damaged.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::open_with(
            data_dir,
            cache_bytes,
            crate::config::defaults::store_readers(),
        )
    }

    /// As [`EmbeddedStore::open_with_cache`], with `readers` threads to run reads (reads in
    /// flight at once; at least one).
    pub fn open_with(
        data_dir: &Path,
        cache_bytes: usize,
        readers: usize,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            StoreError::Unavailable(format!("cannot create {}: {error}", data_dir.display()))
        })?;
        let path = data_dir.join("herald.redb");
        let database = schema::open_database(&path, cache_bytes)?;
        let index = schema::load_index(&database)?;
        let slot: DatabaseSlot = Arc::new(RwLock::new(Some(Arc::new(database))));
        let (commands, receiver) = mpsc::sync_channel(WRITE_QUEUE);
        let (health_sender, health) = watch::channel(true);
        let retention_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        #[cfg(feature = "fault-injection")]
        let faults = writer::WriterFaults::default();
        let writer = Writer::new(
            slot.clone(),
            path,
            cache_bytes,
            index,
            health_sender,
            retention_ms.clone(),
            #[cfg(feature = "fault-injection")]
            faults.clone(),
        );
        let readers = readers::ReaderPool::start(readers.max(1))?;
        let writer = std::thread::Builder::new()
            .name("herald-store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|error| StoreError::Internal(format!("cannot start writer: {error}")))?;
        Ok(EmbeddedStore {
            database: slot,
            commands,
            writer: Some(writer),
            health,
            readers,
            retention_ms,
            #[cfg(feature = "fault-injection")]
            faults,
        })
    }

    /// Keeps events for `retention` after their last delivery, so that they can be replayed
    /// (a sweep deletes them once it ends); zero (the default) deletes them with their last
    /// delivery.
    pub fn set_retention(&self, retention: Duration) {
        self.retention_ms.store(
            retention.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Makes the writer sleep `duration` before its next batch, as a stalled disk would.
    /// Test-only (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_writer_stall(&self, duration: Duration) {
        self.faults.stall.store(
            duration.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Writer batches applied so far (an empty one syncs lazily committed records). Test-only
    /// (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn batches_applied(&self) -> u64 {
        self.faults
            .batches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Overwrites the stored record of a pending delivery with bytes no version of Herald
    /// decodes (a format version from the future), as a downgrade or damage on disk would
    /// leave it. Test-only (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn damage_delivery(
        &self,
        partition: &crate::model::PartitionKey,
        sequence: u64,
    ) -> Result<(), StoreError> {
        let database = current(&self.database)?;
        let transaction = database.begin_write().map_err(unavailable)?;
        {
            let mut deliveries = transaction
                .open_table(schema::DELIVERIES)
                .map_err(unavailable)?;
            deliveries
                .insert((partition.encode().as_str(), sequence), &[9u8, 0, 0][..])
                .map_err(unavailable)?;
        }
        transaction.commit().map_err(unavailable)
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

    /// Runs a read on a reader thread (redb reads are synchronous), off the async workers.
    async fn read_with<T: Send + 'static>(
        &self,
        job: impl FnOnce(ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = self.database.clone();
        self.readers
            .run(move || {
                let transaction = current(&slot)?.begin_read().map_err(unavailable)?;
                job(transaction)
            })
            .await
    }
}

/// The database in the slot, or `Unavailable` while it is being reopened.
fn current(slot: &DatabaseSlot) -> Result<Arc<Database>, StoreError> {
    slot.read()
        .expect("database slot lock")
        .clone()
        .ok_or_else(|| StoreError::Unavailable("the store is reopening after a write error".into()))
}

impl Store for EmbeddedStore {
    fn leases(self: Arc<Self>) -> Option<Arc<dyn PartitionLeases>> {
        None
    }

    fn health(&self) -> Option<watch::Receiver<bool>> {
        Some(self.health.clone())
    }
}
