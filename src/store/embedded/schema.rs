//! The redb tables of the embedded store, and opening the file.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::unavailable;
use crate::store::StoreError;
use crate::store::records::decode_subscription;
use crate::store::topic_index::TopicIndex;

/// Subscription id -> JSON subscription.
pub(super) const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("subscriptions");
/// Topic -> last sequence assigned.
pub(super) const TOPICS: TableDefinition<&str, u64> = TableDefinition::new("topics");
/// (topic, sequence) -> event (header + payload), kept while any delivery of it is pending and
/// then for the retention window.
pub(super) const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
/// (expiry time, topic, sequence) of every event kept after its last delivery (retention),
/// for deleting them in order.
pub(super) const EVENT_EXPIRY: TableDefinition<(u64, &str, u64), ()> =
    TableDefinition::new("event_expiry");
/// (topic, sequence) -> number of pending deliveries of the event.
pub(super) const EVENT_REFERENCES: TableDefinition<(&str, u64), u32> =
    TableDefinition::new("event_refs");
/// (subscription id, topic) -> partition record.
pub(super) const PARTITIONS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("partitions");
/// (subscription id, topic) of every partition with pending deliveries.
pub(super) const PENDING_PARTITIONS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("pending_partitions");
/// (`{topic}#{subscription id}`, sequence) -> delivery record.
pub(super) const DELIVERIES: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("deliveries");
/// (`{topic}#{subscription id}`, sequence) -> delivery record of a dead letter. (Before this
/// table existed, dead letters stayed in `deliveries`, flagged; those are still read.)
pub(super) const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("dead_letters");
/// (topic, idempotency key) -> idempotency record.
pub(super) const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("idempotency");
/// (expiry time, topic, key) of every idempotency record, for expiring them in order.
pub(super) const IDEMPOTENCY_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");

/// `{table}/{partition key}/{sequence}` -> the bytes of a delivery record that did not decode,
/// kept for inspection (see `quarantine`).
pub(super) const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");

/// One row the writer rewrites to check that the file can be written again after an error.
pub(super) const PROBES: TableDefinition<&str, u64> = TableDefinition::new("probes");

/// Opens (or creates) the database file and its tables, explaining the failures an operator
/// can act on.
pub(super) fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
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
    transaction.open_table(EVENT_EXPIRY)?;
    transaction.open_table(PARTITIONS)?;
    transaction.open_table(PENDING_PARTITIONS)?;
    transaction.open_table(DELIVERIES)?;
    transaction.open_table(DEAD_LETTERS)?;
    transaction.open_table(IDEMPOTENCY)?;
    transaction.open_table(IDEMPOTENCY_EXPIRY)?;
    transaction.open_table(PROBES)?;
    transaction.open_table(QUARANTINE)?;
    Ok(())
}

/// Builds the topic index from the stored subscriptions.
pub(super) fn load_index(database: &Database) -> Result<TopicIndex, StoreError> {
    let transaction = database.begin_read().map_err(unavailable)?;
    let table = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
    let mut index = TopicIndex::default();
    for entry in table.iter().map_err(unavailable)? {
        let (_, value) = entry.map_err(unavailable)?;
        index.add(&decode_subscription(value.value(), "subscription")?);
    }
    Ok(index)
}
