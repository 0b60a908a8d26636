//! The subscription registry: which endpoints want which topics.

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{Page, Subscription};
use crate::store::StoreError;

/// Bounds on the number of subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionLimits {
    /// Subscriptions in total.
    pub total: usize,
    /// Subscriptions with any one topic pattern (such as `*` or `fin:*`).
    pub per_pattern: usize,
}

impl SubscriptionLimits {
    /// No limits.
    pub const NONE: SubscriptionLimits = SubscriptionLimits {
        total: usize::MAX,
        per_pattern: usize::MAX,
    };

    /// Checks a new subscription against the current counts: `total` subscriptions, and
    /// `with_pattern(pattern)` of them holding each of its patterns.
    pub fn check(
        &self,
        subscription: &Subscription,
        total: usize,
        with_pattern: impl Fn(&str) -> usize,
    ) -> Result<(), StoreError> {
        if total >= self.total {
            return Err(StoreError::LimitReached(format!(
                "{total} subscriptions exist, the most this server keeps \
                 (--max-subscriptions {}); unsubscribe one first",
                self.total
            )));
        }
        for pattern in &subscription.topics {
            let count = with_pattern(pattern);
            if count >= self.per_pattern {
                return Err(StoreError::LimitReached(format!(
                    "{count} subscriptions have the pattern `{pattern}`, the most this server \
                     keeps (--max-subscriptions-per-pattern {})",
                    self.per_pattern
                )));
            }
        }
        Ok(())
    }
}

/// The outcome of [`SubscriptionStore::update_subscription`].
#[derive(Debug, Clone)]
pub struct Updated {
    /// The subscription as it now is.
    pub subscription: Subscription,
    /// Pending deliveries (dead letters included) dropped because their topic is no longer
    /// matched by the subscription's topics; 0 unless the topics changed.
    pub dropped: u64,
}

/// A change to a subscription: applied to the current stored value, it edits it in place or
/// refuses with an error (which the update returns, writing nothing). It may be applied more
/// than once (a lost optimistic race is retried with the newer value).
pub type SubscriptionUpdate =
    Arc<dyn Fn(&mut Subscription) -> Result<(), StoreError> + Send + Sync>;

/// Stored subscriptions. A subscription's effect on publishing is part of the contract: after
/// [`SubscriptionStore::create_subscription`] returns, every publish on a matching topic (from
/// any instance sharing the store) fans out to it; after
/// [`SubscriptionStore::delete_subscription`] returns, none does.
#[async_trait]
pub trait SubscriptionStore: Send + Sync {
    /// Stores a new subscription, atomically and durably. From the moment this returns, every
    /// publish on a matching topic fans out to it; earlier publishes never do.
    ///
    /// Returns `Conflict` if a subscription with the same id exists, `LimitReached` if it
    /// would exceed `limits` (checked in the same transaction on the embedded store; from this
    /// instance's current view on DynamoDB, so concurrent creations on several instances can
    /// pass a limit by the number in flight).
    async fn create_subscription(
        &self,
        subscription: &Subscription,
        limits: &SubscriptionLimits,
    ) -> Result<(), StoreError>;

    /// Applies `update` to the stored subscription atomically (read, change, write, with no
    /// other change in between) and returns the new value; writes nothing if the value did
    /// not change. `NotFound` if the id is unknown. The id and creation time cannot change
    /// (`Internal`).
    ///
    /// A change of topics or filter takes effect for events published after it returns;
    /// the pending deliveries (dead letters included) of topics the new patterns no longer
    /// match are dropped and counted in [`Updated::dropped`]. Each partition's
    /// previous-sequence chain stays whole: it links the events the subscription received.
    ///
    /// Like Subscribe, the change is seen by every instance sharing the store once this
    /// returns: on DynamoDB the call waits out the copies of the subscription set that other
    /// instances may hold.
    async fn update_subscription(
        &self,
        id: &str,
        update: SubscriptionUpdate,
    ) -> Result<Updated, StoreError>;

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

/// Refuses an update that changes what a subscription cannot change in place.
pub fn unchanged_identity(
    current: &Subscription,
    updated: &Subscription,
) -> Result<(), StoreError> {
    if updated.id != current.id || updated.created_at != current.created_at {
        return Err(StoreError::Internal(
            "a subscription update may not change its id or creation time".into(),
        ));
    }
    Ok(())
}
