//! Damaged delivery records met by the writer. A record that does not decode (damage on disk,
//! or a newer Herald's format after a downgrade) fails only the command that read it (with
//! `DATA_LOSS`); the writer moves its bytes to the `quarantine` table for inspection, puts a
//! dead letter saying so in its place (the event itself is intact: a redrive sends it again),
//! and applies the rest of the batch again. Neither the batch nor the store's health suffers.

use redb::{Database, Durability, ReadableTable};

use super::schema::{DEAD_LETTERS, DELIVERIES, PARTITIONS, QUARANTINE};
use super::unavailable;
use crate::model::PartitionKey;
use crate::store::StoreError;
use crate::store::records::{DeliveryRecord, PartitionRecord};

/// Where a delivery record lies: among the pending deliveries or the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeliveryTable {
    Deliveries,
    DeadLetters,
}

impl DeliveryTable {
    fn name(self) -> &'static str {
        match self {
            DeliveryTable::Deliveries => "deliveries",
            DeliveryTable::DeadLetters => "dead_letters",
        }
    }
}

/// A delivery record that did not decode, as read.
#[derive(Debug, Clone)]
pub(super) struct Damaged {
    pub table: DeliveryTable,
    pub partition_key: String,
    pub sequence: u64,
    pub bytes: Vec<u8>,
}

impl Damaged {
    /// Its key in the quarantine table: `{table}/{partition key}/{sequence}`.
    pub fn quarantine_key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.table.name(),
            self.partition_key,
            self.sequence
        )
    }
}

/// Moves the damaged record's bytes to the quarantine table and leaves a dead letter in its
/// place whose error names `reason` and the quarantine key, in one synced transaction.
pub(super) fn quarantine(
    database: &Database,
    damaged: &Damaged,
    reason: &str,
) -> Result<(), StoreError> {
    let key = damaged.quarantine_key();
    let mut transaction = database.begin_write().map_err(unavailable)?;
    transaction
        .set_durability(Durability::Immediate)
        .map_err(|error| StoreError::Internal(error.to_string()))?;
    {
        let mut quarantined = transaction.open_table(QUARANTINE).map_err(unavailable)?;
        quarantined
            .insert(key.as_str(), damaged.bytes.as_slice())
            .map_err(unavailable)?;
        let mut record = DeliveryRecord::new(0, 0);
        record.dead_lettered = true;
        record.set_error(&format!(
            "the stored delivery record did not decode ({reason}); its bytes are kept in the \
             store's quarantine table under {key}"
        ));
        let row = (damaged.partition_key.as_str(), damaged.sequence);
        let mut dead_letters = transaction.open_table(DEAD_LETTERS).map_err(unavailable)?;
        dead_letters
            .insert(row, record.encode().as_slice())
            .map_err(unavailable)?;
        if damaged.table == DeliveryTable::Deliveries {
            let mut deliveries = transaction.open_table(DELIVERIES).map_err(unavailable)?;
            deliveries.remove(row).map_err(unavailable)?;
            // Still pending (dead letters are), one more dead letter.
            if let Some(partition) = PartitionKey::decode(&damaged.partition_key) {
                let mut partitions = transaction.open_table(PARTITIONS).map_err(unavailable)?;
                let partition_row = (partition.subscription_id.as_str(), partition.topic.as_str());
                let stored = partitions
                    .get(partition_row)
                    .map_err(unavailable)?
                    .map(|bytes| PartitionRecord::decode(bytes.value()))
                    .transpose()?;
                if let Some(mut stored) = stored {
                    stored.dead_letters += 1;
                    partitions
                        .insert(partition_row, stored.encode().as_slice())
                        .map_err(unavailable)?;
                }
            }
        }
    }
    transaction.commit().map_err(unavailable)
}
