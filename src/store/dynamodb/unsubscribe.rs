//! Unsubscribe on DynamoDB: all or resumable. One transaction deletes the subscription, bumps
//! the subscription-set version and leaves a tombstone holding the subscription; its
//! deliveries, dead letters and event references are then removed one by one, and the
//! tombstone last. If that is interrupted (an error, a crash, a cancelled call), a retried
//! Unsubscribe or any instance's next rescan finishes it from the tombstone.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{Delete, Put, TransactWriteItem};

use super::errors::{cancellation_reasons, conflict_pause, sdk_error};
use super::schema::{self, Item, get_n, get_s, n, s};
use super::subscriptions::settle_time;
use super::{Inner, MAX_CONFLICT_RETRIES};
use crate::model::{PartitionKey, Subscription, now_millis};
use crate::store::StoreError;
use crate::store::records;

impl Inner {
    pub(super) async fn unsubscribe(&self, id: &str) -> Result<u64, StoreError> {
        let subscription = match self.read_subscription(id).await {
            Ok(subscription) => subscription,
            // Deleted already, perhaps by an Unsubscribe that did not finish: finish it.
            Err(StoreError::NotFound(what)) => {
                let Some(subscription) = self.tombstone(id).await? else {
                    return Err(StoreError::NotFound(what));
                };
                // The deletion may be only just committed (by a call still waiting, or one
                // that failed after it): wait out the copies of the set read before it too.
                let validity = self.read_meta().await?.validity;
                tokio::time::sleep(settle_time(validity)).await;
                return self.drop_backlog(&subscription).await;
            }
            Err(error) => return Err(error),
        };
        let validity = self.delete_with_tombstone(&subscription).await?;
        if self.injected_unsubscribe_failure() {
            return Err(partial(id, 0, "injected fault"));
        }
        // Until every copy of the subscription set read before the deletion has expired,
        // another instance may still fan out to it: remove the backlog after that.
        tokio::time::sleep(settle_time(validity)).await;
        self.drop_backlog(&subscription).await
    }

    /// Finishes Unsubscribes left unfinished (by any instance) whose tombstone is older than
    /// the repair delay (a younger one is probably still being worked on), removing at most
    /// `budget` deliveries; the rest is left for the next call.
    pub(super) async fn finish_unsubscribes(&self, budget: usize) -> Result<(), StoreError> {
        let mut budget = budget;
        let now = now_millis();
        for item in self
            .query_after(schema::UNSUBSCRIBING_PK, None, usize::MAX)
            .await?
        {
            let deleted_at = get_n(&item, "deleted_at")?;
            if Duration::from_millis(now.saturating_sub(deleted_at)) < self.repair_after {
                continue;
            }
            if budget == 0 {
                break;
            }
            let subscription = decode(&item)?;
            tracing::info!(subscription = %subscription.id, "finishing an interrupted unsubscribe");
            let mut dropped = 0;
            let done = self
                .remove_backlog(&subscription, &mut dropped, budget)
                .await?;
            budget = budget.saturating_sub(dropped as usize);
            if done {
                self.delete_tombstone(&subscription.id).await?;
            }
        }
        Ok(())
    }

    async fn tombstone(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        self.get_item(schema::tombstone_key(id))
            .await?
            .map(|item| decode(&item))
            .transpose()
    }

    /// Deletes the subscription, bumps the set version and writes the tombstone, atomically.
    /// Returns the table's subscription-cache validity.
    async fn delete_with_tombstone(
        &self,
        subscription: &Subscription,
    ) -> Result<Duration, StoreError> {
        let id = subscription.id.as_str();
        let mut tombstone = schema::tombstone_key(id);
        tombstone.insert("deleted_at".into(), n(now_millis()));
        tombstone.insert(
            "data".into(),
            s(
                String::from_utf8(records::encode_subscription(subscription))
                    .expect("JSON is UTF-8"),
            ),
        );
        let _one_at_a_time = self.changes.lock().await;
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let meta = self.read_meta().await?;
            let version = meta.version;
            let sent = Instant::now();
            let delete = TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(schema::subscription_key(id)))
                        .condition_expression("attribute_exists(pk)")
                        .build()
                        .expect("complete delete"),
                )
                .build();
            let put = TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(tombstone.clone()))
                        .build()
                        .expect("complete put"),
                )
                .build();
            match self
                .transact(vec![self.bump_version(version), delete, put])
                .await
            {
                Ok(()) => {
                    self.apply_own_change(version, sent, |set| {
                        set.index.remove(subscription);
                        set.created.remove(id);
                        set.subscriptions.remove(id);
                    });
                    return Ok(meta.validity);
                }
                Err(error) => match cancellation_reasons(&error) {
                    Some(reasons)
                        if reasons.get(1).map(String::as_str) == Some("ConditionalCheckFailed") =>
                    {
                        return Err(StoreError::NotFound(format!("subscription {id}")));
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

    /// Removes what the deleted subscription had pending (dead letters included), then its
    /// tombstone. Returns how many deliveries this call removed. An error leaves the tombstone,
    /// so the work is finished later; it is reported as `Partial`.
    async fn drop_backlog(&self, subscription: &Subscription) -> Result<u64, StoreError> {
        let mut dropped = 0;
        let result = match self
            .remove_backlog(subscription, &mut dropped, usize::MAX)
            .await
        {
            Ok(_) => self.delete_tombstone(&subscription.id).await,
            Err(error) => Err(error),
        };
        result
            .map(|()| dropped)
            .map_err(|error| partial(&subscription.id, dropped, error))
    }

    async fn delete_tombstone(&self, id: &str) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(schema::tombstone_key(id)))
            .send()
            .await
            .map(|_| ())
            .map_err(sdk_error)
    }

    /// Removes up to `budget` deliveries of the deleted subscription, a page at a time.
    /// Returns true once none is left.
    async fn remove_backlog(
        &self,
        subscription: &Subscription,
        dropped: &mut u64,
        budget: usize,
    ) -> Result<bool, StoreError> {
        let id = subscription.id.as_str();
        let mut removed = 0;
        for topic in self.topics().await? {
            if !subscription.matches(&topic) {
                continue;
            }
            let partition = PartitionKey::new(topic.as_str(), id);
            for (pk, key_of) in [
                (
                    partition.encode(),
                    schema::delivery_key as fn(&PartitionKey, u64) -> Item,
                ),
                (schema::dead_pk(&partition), schema::dead_key),
            ] {
                loop {
                    if removed >= budget {
                        return Ok(false);
                    }
                    let page = self
                        .query_after(&pk, None, PAGE.min(budget - removed))
                        .await?;
                    if page.is_empty() {
                        break;
                    }
                    for item in page {
                        let sequence = schema::get_sequence(&item)?;
                        removed += 1;
                        if self
                            .remove_delivery(
                                key_of(&partition, sequence),
                                &topic,
                                sequence,
                                None,
                                None,
                            )
                            .await?
                        {
                            *dropped += 1;
                        }
                    }
                }
            }
            // The partition's counters go with it.
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(schema::stats_key(&partition)))
                .send()
                .await
                .map_err(sdk_error)?;
        }
        Ok(true)
    }
}

/// Deliveries read at a time while removing a backlog.
const PAGE: usize = 100;

fn partial(id: &str, dropped: u64, cause: impl std::fmt::Display) -> StoreError {
    StoreError::Partial(format!(
        "subscription {id} is deleted and {dropped} of its deliveries are removed, the rest is \
         not yet ({cause}); retry the call or let any instance finish it"
    ))
}

fn decode(item: &Item) -> Result<Subscription, StoreError> {
    records::decode_subscription(get_s(item, "data")?.as_bytes(), "subscription tombstone")
}
