//! The subscription registry: which endpoints want which topics.

use async_trait::async_trait;

use crate::model::{Page, Subscription};
use crate::store::StoreError;

/// Stored subscriptions. A subscription's effect on publishing is part of the contract: after
/// [`SubscriptionStore::create_subscription`] returns, every publish on a matching topic (from
/// any instance sharing the store) fans out to it; after
/// [`SubscriptionStore::delete_subscription`] returns, none does.
#[async_trait]
pub trait SubscriptionStore: Send + Sync {
    /// Stores a new subscription, atomically and durably. From the moment this returns, every
    /// publish on a matching topic fans out to it; earlier publishes never do.
    ///
    /// Returns `Conflict` if a subscription with the same id exists.
    async fn create_subscription(&self, subscription: &Subscription) -> Result<(), StoreError>;

    /// Returns the subscription with this id, or `NotFound`.
    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError>;

    /// Lists subscriptions ordered by id, starting after `page_token` (a token returned by an
    /// earlier call). At most `page_size` entries; `next_token` is `None` on the last page.
    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError>;

    /// Deletes a subscription and all of its pending deliveries (dead-lettered included) and
    /// returns how many deliveries were dropped. `NotFound` if the id is unknown.
    ///
    /// Not atomic on every backend, but all or resumable: once the subscription is deleted no
    /// publish fans out to it any more; if removing its backlog is interrupted, the call
    /// returns `Partial` and a retry (which no longer finds the subscription but finishes the
    /// removal, returning what it removed) or the store's background sweep completes it. The
    /// embedded store does it in one transaction.
    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError>;
}
