//! Unsubscribe on DynamoDB: all or resumable. One transaction deletes the subscription, bumps
//! the subscription-set version and leaves a tombstone holding the subscription; its
//! deliveries, dead letters and event references are then removed one by one, and the
//! tombstone last. If that is interrupted (an error, a crash, a cancelled call), a retried
//! Unsubscribe or any instance's next rescan finishes it from the tombstone.
//!
//! An update that changes a subscription's topics works the same way for the partitions its
//! new patterns no longer match: the update's transaction leaves a removal record (a
//! tombstone that names the patterns kept), worked off once the change has settled.

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

    /// Works off the removal records earlier topic updates of subscription `id` left (see
    /// [`Removal`]), whatever their age; best effort, since the sweep finishes what is left
    /// and drops only the deliveries planned before each removal.
    pub(super) async fn finish_removals_of(&self, id: &str) {
        let prefix = format!("{id}#topics#");
        let records = match self
            .query_after(schema::UNSUBSCRIBING_PK, None, usize::MAX)
            .await
        {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(subscription = id, %error, "cannot read pending topic removals");
                return;
            }
        };
        for item in records {
            let removal = match get_s(&item, "sk") {
                Ok(sk) if sk.starts_with(&prefix) => Removal::from_item(&item),
                _ => continue,
            };
            let result = match removal {
                Ok(Some(_)) if self.injected_removal_failure() => {
                    Err(StoreError::Unavailable("injected fault".into()))
                }
                Ok(Some(removal)) => self.finish_removal(&removal).await.map(drop),
                Ok(None) => Ok(()),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                tracing::warn!(subscription = id, %error, "cannot finish a pending topic removal; the sweep will");
            }
        }
    }

    /// Finishes Unsubscribes left unfinished (by any instance) whose tombstone is older than
    /// the repair delay (a younger one is probably still being worked on), removing at most
    /// `budget` deliveries; the rest is left for the next call.
    pub(super) async fn finish_unsubscribes(&self, budget: usize) -> Result<(), StoreError> {
        self.finish_tombstones(budget).await
    }

    /// Removes the backlog a topic update left behind (see [`Removal`]); returns how many
    /// deliveries this call removed. An error leaves the record for a later sweep and is
    /// reported as `Partial`.
    pub(super) async fn finish_removal(&self, removal: &Removal) -> Result<u64, StoreError> {
        let mut dropped = 0;
        let result = match self
            .remove_backlog(&removal.scope(), &mut dropped, usize::MAX)
            .await
        {
            Ok(_) => self.delete_tombstone(&removal.key).await,
            Err(error) => Err(error),
        };
        result.map(|()| dropped).map_err(|error| {
            StoreError::Partial(format!(
                "subscription {} is updated and {dropped} deliveries of the topics it no longer \
                 receives are removed, the rest is not yet ({error}); any instance finishes it",
                removal.subscription.id
            ))
        })
    }

    async fn finish_tombstones(&self, budget: usize) -> Result<(), StoreError> {
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
            let scope = match Removal::from_item(&item)? {
                Some(removal) => {
                    tracing::info!(subscription = %removal.subscription.id, "finishing an interrupted topic removal");
                    removal.scope()
                }
                None => {
                    let subscription = decode(&item)?;
                    tracing::info!(subscription = %subscription.id, "finishing an interrupted unsubscribe");
                    Scope::all(subscription)
                }
            };
            let mut dropped = 0;
            let done = self.remove_backlog(&scope, &mut dropped, budget).await?;
            budget = budget.saturating_sub(dropped as usize);
            if done {
                self.delete_tombstone(get_s(&item, "sk")?).await?;
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
                    self.apply_own_change(version, sent, |set| set.remove(id));
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
            .remove_backlog(&Scope::all(subscription.clone()), &mut dropped, usize::MAX)
            .await
        {
            Ok(_) => self.delete_tombstone(&subscription.id).await,
            Err(error) => Err(error),
        };
        result
            .map(|()| dropped)
            .map_err(|error| partial(&subscription.id, dropped, error))
    }

    /// Deletes the tombstone (or removal record) with this sort key.
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

    /// Removes up to `budget` deliveries in `scope`, a page at a time. Returns true once
    /// none is left.
    async fn remove_backlog(
        &self,
        scope: &Scope,
        dropped: &mut u64,
        budget: usize,
    ) -> Result<bool, StoreError> {
        let id = scope.subscription.id.as_str();
        let mut removed = 0;
        // After a topic update: the subscription as it is now (gone: nothing to keep).
        let current = match &scope.kept {
            Some(_) => match self.read_subscription(id).await {
                Ok(subscription) => Some(subscription),
                Err(StoreError::NotFound(_)) => None,
                Err(error) => return Err(error),
            },
            None => None,
        };
        for topic in self.topics().await? {
            if !scope.covers(&topic) {
                continue;
            }
            // Everything the topic has published so far: the update has settled, so no later
            // publish fans out to the subscription, unless the topic was added back since;
            // then what was planned before the update (see `Scope::planned_before`).
            let (through, added_back) = match &scope.kept {
                None => (u64::MAX, false),
                Some(_) => {
                    let last = match self.get_item(schema::topic_key(&topic)).await? {
                        Some(item) => schema::get_n(&item, "last_seq")?,
                        None => 0,
                    };
                    let added_back = current.as_ref().is_some_and(|now| now.matches(&topic));
                    (last, added_back)
                }
            };
            // A fan-out still open would write the deliveries removed below back (its
            // publisher's remaining writes, or a repair): close them first.
            self.finish_open_fanouts(&topic, through).await?;
            let partition = PartitionKey::new(topic.as_str(), id);
            for (pk, key_of) in [
                (
                    partition.encode(),
                    schema::delivery_key as fn(&PartitionKey, u64) -> Item,
                ),
                (schema::dead_pk(&partition), schema::dead_key),
            ] {
                // Items kept are paged past; removed ones are gone from the next page.
                let mut after: Option<String> = None;
                'pages: loop {
                    if removed >= budget {
                        return Ok(false);
                    }
                    let page = self
                        .query_after(&pk, after.as_deref(), PAGE.min(budget - removed))
                        .await?;
                    if page.is_empty() {
                        break;
                    }
                    for item in page {
                        let sequence = schema::get_sequence(&item)?;
                        if sequence > through {
                            break 'pages;
                        }
                        if added_back && !scope.planned_before(&item, sequence)? {
                            after = Some(get_s(&item, "sk")?.to_string());
                            continue;
                        }
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

/// Which deliveries a tombstone removes: every partition of a deleted subscription, or those
/// of the topics a topic update no longer matches (up to a sequence, so that deliveries after
/// the topic is added back stay).
struct Scope {
    subscription: Subscription,
    /// With a topic update: the patterns kept.
    kept: Option<Vec<String>>,
    /// See [`Removal::version`].
    version: u64,
    /// See [`Removal::through`].
    through: u64,
}

impl Scope {
    fn all(subscription: Subscription) -> Scope {
        Scope {
            subscription,
            kept: None,
            version: 0,
            through: u64::MAX,
        }
    }

    /// Whether a delivery item of a topic added back since the update was planned before it.
    fn planned_before(&self, item: &Item, sequence: u64) -> Result<bool, StoreError> {
        Ok(match item.get(schema::SET_VERSION) {
            Some(_) if self.version > 0 => get_n(item, schema::SET_VERSION)? < self.version,
            _ => sequence <= self.through,
        })
    }

    fn covers(&self, topic: &str) -> bool {
        self.subscription.matches(topic)
            && !self.kept.as_ref().is_some_and(|kept| {
                kept.iter()
                    .any(|pattern| crate::model::pattern_matches(pattern, topic))
            })
    }
}

/// The record of a topic update's removal of the partitions it no longer matches, kept
/// under the tombstones' key until done.
#[derive(Debug, Clone)]
pub(super) struct Removal {
    /// Its sort key: `{id}#topics#{version}`.
    pub(super) key: String,
    /// The subscription before the update.
    pub(super) subscription: Subscription,
    /// The patterns after it.
    pub(super) kept: Vec<String>,
    /// The subscription-set version the update made. If the topic was added back since, the
    /// deliveries planned with an older set are removed and those planned with this one or a
    /// later one (after the topic came back) stay, wherever their sequences (which come from
    /// the publishers' clocks) fall. Otherwise all of them, up to the topic's last sequence.
    /// 0 in a record written before versions were kept.
    pub(super) version: u64,
    /// For deliveries that do not say which set version planned them (written by an earlier
    /// Herald), and records without `version`: the removal takes those up to this sequence
    /// (a clock reading on the updating instance plus the settle time).
    pub(super) through: u64,
}

impl Removal {
    pub(super) fn item(&self, now: u64) -> Item {
        let mut item = schema::key(schema::UNSUBSCRIBING_PK, &self.key);
        item.insert("deleted_at".into(), n(now));
        item.insert(
            "data".into(),
            s(
                String::from_utf8(records::encode_subscription(&self.subscription))
                    .expect("JSON is UTF-8"),
            ),
        );
        item.insert(
            "kept".into(),
            s(serde_json::to_string(&self.kept).expect("JSON")),
        );
        item.insert("through".into(), n(self.through));
        item.insert(schema::SET_VERSION.into(), n(self.version));
        item
    }

    fn from_item(item: &Item) -> Result<Option<Removal>, StoreError> {
        if !item.contains_key("kept") {
            return Ok(None);
        }
        Ok(Some(Removal {
            key: get_s(item, "sk")?.to_string(),
            subscription: decode(item)?,
            kept: serde_json::from_str(get_s(item, "kept")?)
                .map_err(|_| StoreError::Corrupt("kept patterns of a topic removal".into()))?,
            version: match item.get(schema::SET_VERSION) {
                Some(_) => get_n(item, schema::SET_VERSION)?,
                None => 0,
            },
            through: get_n(item, "through")?,
        }))
    }

    fn scope(&self) -> Scope {
        Scope {
            subscription: self.subscription.clone(),
            kept: Some(self.kept.clone()),
            version: self.version,
            through: self.through,
        }
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
