//! Partition leases: the contract that keeps one sender per partition when several instances
//! share a store. Only stores that several processes share implement it (DynamoDB); a store
//! that one process owns has none, and its worker delivers every partition without claiming.

use std::time::Duration;

use async_trait::async_trait;

use crate::model::PartitionKey;
use crate::store::StoreError;

/// Proof that a worker holds a partition's lease: the token its claim wrote into the lease.
/// A new claim writes a new token, so the writes of a worker whose lease was taken over are
/// refused (a fencing token).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub String);

impl LeaseToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        LeaseToken(format!("{:032x}", rand::random::<u128>()))
    }
}

/// Partition leases, for stores that several instances share: only the holder of a
/// partition's lease delivers it, which keeps one partition's deliveries sequential.
///
/// Lease expiry is judged by wall clock (`now + duration` is stored), so instances' clocks must
/// agree to well within the worker's safety margin (a third of the lease).
#[async_trait]
pub trait PartitionLeases: Send + Sync {
    /// Claims `partition` for `duration` if nobody holds a live lease on it. Returns the new
    /// lease's token, or `None` if another claim is live.
    async fn claim(
        &self,
        partition: &PartitionKey,
        duration: Duration,
    ) -> Result<Option<LeaseToken>, StoreError>;

    /// Extends the lease of `token` to `duration` from now. Returns false if the lease is no
    /// longer `token`'s (another worker claimed the partition since).
    async fn renew(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        duration: Duration,
    ) -> Result<bool, StoreError>;

    /// When the last write fenced by `token` that also extended its lease (to the duration
    /// of the claim, from the moment the write was built) was sent. A worker counts its lease
    /// from then, as from a renewal, so a busy partition needs no separate renewals. `None`
    /// (the default) for stores whose fenced writes only check the token.
    fn extended_at(&self, token: &LeaseToken) -> Option<std::time::Instant> {
        let _ = token;
        None
    }

    /// Gives the lease of `token` up (a no-op if it is no longer `token`'s). With `handover`
    /// the lease is left expired, so that every instance's rescan finds the partition (its
    /// holder stops with work left); without, it is deleted (nothing left to deliver).
    async fn release(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        handover: bool,
    ) -> Result<(), StoreError>;
}
