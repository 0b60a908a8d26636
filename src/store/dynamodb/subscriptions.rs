//! Subscriptions on DynamoDB: one item each under the `SUBSCRIPTION` partition key, a version
//! item that every change bumps, and each instance's copy of the set, usable for a bounded
//! time after it was last found current (see the module doc).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{TransactWriteItem, Update};

use super::schema::{self, get_n, get_s, n};
use super::{DynamoStore, Inner, MAX_CONFLICT_RETRIES};
use crate::model::{Page, Subscription};
use crate::store::pages;
use crate::store::records;
use crate::store::topic_index::TopicIndex;
use crate::store::{StoreError, SubscriptionLimits, SubscriptionStore, SubscriptionUpdate};

/// How long a read of the subscription set may be used to fan out publishes, unless the
/// table's version item says otherwise (`cache_validity_ms`, written when the table is
/// created; every instance of a table must use the same value, so it lives there).
pub const DEFAULT_CACHE_VALIDITY: Duration = Duration::from_secs(1);

/// Tracked subscriptions (with a filter, or whose topics changed) a table keeps at most. Each
/// keeps its chain on the topic items of the topics it receives, about 80 bytes at most per
/// topic item (a `chains` entry: its id, a sequence and an ordinal), so at most about 240 KB
/// of a topic item's 400 KB: no number of subscriptions can make a topic item too large to
/// write, which would make every publish on the topic fail. Subscribe with a filter, and an
/// update that gives a subscription a filter or new topics, are refused beyond it.
pub const MAX_TRACKED_SUBSCRIPTIONS: usize = 3_000;

/// Refuses to track one more subscription when `tracked` already are, of at most `limit`.
pub(super) fn check_tracked(tracked: usize, limit: usize) -> Result<(), StoreError> {
    if tracked >= limit {
        return Err(StoreError::LimitReached(format!(
            "{tracked} subscriptions have a filter or changed topics, the most one DynamoDB \
             table keeps (each keeps its own chain position on the items of its topics); \
             unsubscribe one of them or subscribe without a filter"
        )));
    }
    Ok(())
}

/// What Subscribe and Unsubscribe wait after their change commits, before returning: every
/// subscription set read before the change has expired by then. The margin covers clock-rate
/// differences between machines (parts per million) and timer slack, generously.
pub(super) fn settle_time(validity: Duration) -> Duration {
    validity + validity / 10 + Duration::from_millis(20)
}

/// The subscriptions as of one version of the subscription set.
#[derive(Clone)]
pub(super) struct SubscriptionSet {
    pub(super) version: u64,
    /// How long a read of the set may be used (see [`DEFAULT_CACHE_VALIDITY`]).
    pub(super) validity: Duration,
    pub(super) index: TopicIndex,
    /// Subscription id -> the version that created it.
    pub(super) created: HashMap<String, u64>,
    pub(super) subscriptions: HashMap<String, Subscription>,
    /// The subscriptions whose partitions keep their own chain on the topic item (see
    /// [`Tracking`]).
    pub(super) tracked: HashMap<String, Tracking>,
    /// The tracked subscriptions under the patterns they had before they were tracked.
    pub(super) before_index: TopicIndex,
}

/// Since when a subscription does not receive every event of its topics (it has a filter,
/// or its topics changed), so that each of its partitions keeps its last sequence and
/// ordinal on the topic item (`chains`) instead of following the topic's. Until `since` its
/// topics were `topics_before` and it had no filter (a subscription created with a filter
/// has no such time: `topics_before` is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tracking {
    /// The subscription-set version from which it is tracked.
    pub(super) since: u64,
    /// Its topic patterns before that.
    pub(super) topics_before: Vec<String>,
}

impl Tracking {
    /// The tracking stored on a subscription item (`tracked_since`, `topics_before`), or, for
    /// a subscription created with a filter, from its creation.
    pub(super) fn of_item(
        item: &schema::Item,
        subscription: &Subscription,
        created: u64,
    ) -> Result<Option<Tracking>, StoreError> {
        if item.contains_key("tracked_since") {
            let topics_before = serde_json::from_str(get_s(item, "topics_before")?)
                .map_err(|_| StoreError::Corrupt("topics_before of a subscription".into()))?;
            return Ok(Some(Tracking {
                since: get_n(item, "tracked_since")?,
                topics_before,
            }));
        }
        Ok(subscription.filter.is_some().then(|| Tracking {
            since: created,
            topics_before: Vec::new(),
        }))
    }
}

impl SubscriptionSet {
    /// Adds (or replaces) a subscription.
    pub(super) fn insert(
        &mut self,
        subscription: &Subscription,
        created: u64,
        tracking: Option<Tracking>,
    ) {
        self.remove(&subscription.id);
        self.index.add(subscription);
        self.created.insert(subscription.id.clone(), created);
        self.subscriptions
            .insert(subscription.id.clone(), subscription.clone());
        if let Some(tracking) = tracking {
            self.before_index.add(&before(subscription, &tracking));
            self.tracked.insert(subscription.id.clone(), tracking);
        }
    }

    /// Removes a subscription, if present.
    pub(super) fn remove(&mut self, id: &str) {
        if let Some(old) = self.subscriptions.remove(id) {
            self.index.remove(&old);
            if let Some(tracking) = self.tracked.remove(id) {
                self.before_index.remove(&before(&old, &tracking));
            }
        }
        self.created.remove(id);
    }

    /// Whether the subscription's patterns as of set version `version` matched `topic`, for a
    /// subscription untracked then (its patterns before tracking, or its current ones).
    pub(super) fn matched_at(&self, id: &str, topic: &str, version: u64) -> bool {
        match self.tracked.get(id) {
            Some(tracking) if version < tracking.since => tracking
                .topics_before
                .iter()
                .any(|pattern| crate::model::pattern_matches(pattern, topic)),
            _ => self
                .subscriptions
                .get(id)
                .is_some_and(|subscription| subscription.matches(topic)),
        }
    }
}

/// The subscription as it was before it was tracked: its old patterns, no filter.
fn before(subscription: &Subscription, tracking: &Tracking) -> Subscription {
    Subscription {
        topics: tracking.topics_before.clone(),
        filter: None,
        ..subscription.clone()
    }
}

/// This instance's copy of the subscription set.
pub(super) struct CachedSet {
    pub(super) set: Arc<SubscriptionSet>,
    /// When the read that last found `set` current was sent: the set may be used to fan out
    /// until `confirmed + set.validity`.
    pub(super) confirmed: Instant,
}

/// The version item: the subscription-set version and the table's cache validity.
pub(super) struct Meta {
    pub(super) version: u64,
    pub(super) validity: Duration,
}

impl Inner {
    /// The subscription set, current as of less than its validity ago: the cached copy while
    /// it is young enough, else refreshed (a read of the version item, and of every
    /// subscription if the version moved). A publish fanned out from this set reaches every
    /// subscription whose Subscribe returned before the call, since Subscribe waits out the
    /// validity of every copy read before its change.
    /// Callers that find the copy expired at once (every partition delivering, after a
    /// change) wait for one reload and share it.
    pub(super) async fn subscription_set(&self) -> Result<Arc<SubscriptionSet>, StoreError> {
        if let Some(set) = self.young_set() {
            return Ok(set);
        }
        self.reload_once(true).await
    }

    /// The cached copy, while it may still be used.
    fn young_set(&self) -> Option<Arc<SubscriptionSet>> {
        self.subscriptions
            .lock()
            .expect("cache lock")
            .as_ref()
            .filter(|cached| cached.confirmed.elapsed() < cached.set.validity)
            .map(|cached| cached.set.clone())
    }

    /// When `set` was last found current, if it is still the cached copy.
    pub(super) fn subscriptions_confirmed(&self, set: &Arc<SubscriptionSet>) -> Option<Instant> {
        self.subscriptions
            .lock()
            .expect("cache lock")
            .as_ref()
            .filter(|cached| Arc::ptr_eq(&cached.set, set))
            .map(|cached| cached.confirmed)
    }

    /// Reads the version item and, if the version moved since the cached copy (or there is
    /// none), every subscription; a reload by another caller that began after this call
    /// serves it too.
    pub(super) async fn refresh_subscriptions(&self) -> Result<Arc<SubscriptionSet>, StoreError> {
        self.reload_once(false).await
    }

    /// One reload at a time. A caller that waited for another's takes its result if that
    /// reload began after this call (its set is current as of then, whatever it took; its
    /// error is this call's too), or, with `young_enough`, if the copy may be used anyway.
    async fn reload_once(&self, young_enough: bool) -> Result<Arc<SubscriptionSet>, StoreError> {
        let called = Instant::now();
        let mut last_failure = self.refreshing.lock().await;
        if young_enough && let Some(set) = self.young_set() {
            return Ok(set);
        }
        if let Some(cached) = self.subscriptions.lock().expect("cache lock").as_ref()
            && cached.confirmed >= called
        {
            return Ok(cached.set.clone());
        }
        if let Some((started, error)) = last_failure.as_ref()
            && *started >= called
        {
            return Err(error.clone());
        }
        let started = Instant::now();
        let result = self.reload_subscriptions().await;
        *last_failure = result.as_ref().err().map(|error| (started, error.clone()));
        result
    }

    /// [`Inner::refresh_subscriptions`] for a caller holding `refreshing`.
    async fn reload_subscriptions(&self) -> Result<Arc<SubscriptionSet>, StoreError> {
        let started = Instant::now();
        let meta = self.read_meta().await?;
        let cached = self
            .subscriptions
            .lock()
            .expect("cache lock")
            .as_ref()
            .map(|cached| cached.set.clone());
        let set = match cached {
            Some(set) if set.version == meta.version && set.validity == meta.validity => set,
            _ => Arc::new(self.load_subscriptions(meta).await?),
        };
        let mut cache = self.subscriptions.lock().expect("cache lock");
        // A concurrent refresh may have stored a newer set; keep the newest.
        let keep_theirs = cache
            .as_ref()
            .is_some_and(|cached| cached.set.version > set.version);
        if !keep_theirs {
            *cache = Some(CachedSet {
                set: set.clone(),
                confirmed: started,
            });
        }
        Ok(set)
    }

    /// Every subscription, as of `meta.version`: the query is repeated until the version item
    /// reads the same after it as before (any change in between bumps it).
    async fn load_subscriptions(&self, mut meta: Meta) -> Result<SubscriptionSet, StoreError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let mut set = SubscriptionSet {
                version: meta.version,
                validity: meta.validity,
                index: TopicIndex::default(),
                created: HashMap::new(),
                subscriptions: HashMap::new(),
                tracked: HashMap::new(),
                before_index: TopicIndex::default(),
            };
            for item in self
                .query_after(schema::SUBSCRIPTIONS_PK, None, usize::MAX)
                .await?
            {
                let subscription: Subscription =
                    records::decode_subscription(get_s(&item, "data")?.as_bytes(), "subscription")?;
                let created = get_n(&item, "version")?;
                let tracking = Tracking::of_item(&item, &subscription, created)?;
                set.insert(&subscription, created, tracking);
            }
            let after = self.read_meta().await?;
            if after.version == meta.version {
                return Ok(set);
            }
            meta = after;
        }
        Err(StoreError::Contention(
            "the subscriptions keep changing while being read; try again".into(),
        ))
    }

    /// One subscription, read from the table.
    pub(super) async fn read_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        match self.get_item(schema::subscription_key(id)).await? {
            Some(item) => {
                records::decode_subscription(get_s(&item, "data")?.as_bytes(), "subscription")
            }
            None => Err(StoreError::NotFound(format!("subscription {id}"))),
        }
    }

    /// Brings the cached set from `version` to `version + 1` after this instance's own change
    /// (which moved the version by exactly one), so a run of changes does not reload every
    /// subscription each time. Forgets the cache if it was not at `version`.
    pub(super) fn apply_own_change(
        &self,
        version: u64,
        sent: Instant,
        change: impl FnOnce(&mut SubscriptionSet),
    ) {
        let mut cache = self.subscriptions.lock().expect("cache lock");
        match cache.as_mut() {
            Some(cached) if cached.set.version == version => {
                let mut set = (*cached.set).clone();
                change(&mut set);
                set.version = version + 1;
                cached.set = Arc::new(set);
                cached.confirmed = cached.confirmed.max(sent);
            }
            _ => *cache = None,
        }
    }

    pub(super) async fn read_meta(&self) -> Result<Meta, StoreError> {
        Ok(match self.get_item(schema::meta_key()).await? {
            Some(item) => Meta {
                version: get_n(&item, "version")?,
                validity: match get_n(&item, "cache_validity_ms")? {
                    0 => DEFAULT_CACHE_VALIDITY,
                    millis => Duration::from_millis(millis),
                },
            },
            None => Meta {
                version: 0,
                validity: DEFAULT_CACHE_VALIDITY,
            },
        })
    }

    /// A condition-checked move of the subscription-set version from `version` to
    /// `version + 1`.
    pub(super) fn bump_version(&self, version: u64) -> TransactWriteItem {
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(schema::meta_key()))
            .update_expression("SET version = :next")
            .expression_attribute_values(":next", n(version + 1));
        let update = if version == 0 {
            update.condition_expression("attribute_not_exists(version)")
        } else {
            update
                .condition_expression("version = :current")
                .expression_attribute_values(":current", n(version))
        };
        TransactWriteItem::builder()
            .update(update.build().expect("complete update"))
            .build()
    }
}

#[async_trait]
impl SubscriptionStore for DynamoStore {
    async fn create_subscription(
        &self,
        subscription: &Subscription,
        limits: &SubscriptionLimits,
    ) -> Result<(), StoreError> {
        // In its own task, so a caller that goes away cannot stop a commit that carries
        // other callers' subscriptions too.
        let task = tokio::spawn(super::create::create(
            self.inner.clone(),
            subscription.clone(),
            *limits,
        ));
        task.await
            .map_err(|error| StoreError::Internal(format!("subscription commit failed: {error}")))?
    }

    async fn update_subscription(
        &self,
        id: &str,
        update: SubscriptionUpdate,
    ) -> Result<crate::store::Updated, StoreError> {
        // In its own task, so that a caller going away does not leave the change half-seen.
        let task = tokio::spawn(super::operate::update_and_settle(
            self.inner.clone(),
            id.to_string(),
            update,
        ));
        task.await
            .map_err(|error| StoreError::Internal(format!("subscription update failed: {error}")))?
    }

    /// From the current copy of the set (no request while it is young), else from the
    /// table. Subscribe waits out every copy read before it, so this sees a subscription
    /// whose Subscribe returned before the call, on any instance.
    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        if let Some(subscription) = self.subscription_set().await?.subscriptions.get(id) {
            return Ok(subscription.clone());
        }
        self.read_subscription(id).await
    }

    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError> {
        let after = page_token
            .map(pages::decode_subscription_token)
            .transpose()?;
        let items = self
            .query_after(schema::SUBSCRIPTIONS_PK, after.as_deref(), page_size + 1)
            .await?
            .iter()
            .map(|item| {
                records::decode_subscription(get_s(item, "data")?.as_bytes(), "subscription")
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pages::subscription_page(items, page_size))
    }

    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError> {
        self.unsubscribe(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most tracked subscriptions, each with the largest chain entry a topic item can hold
    /// for it, leave the topic item far below DynamoDB's 400 KB.
    #[test]
    fn the_largest_chains_fit_a_topic_item() {
        let chains: super::super::publish::Chains = (0..MAX_TRACKED_SUBSCRIPTIONS)
            .map(|_| (crate::ids::new_id("sub"), (u64::MAX, u64::MAX)))
            .collect();
        let bytes = serde_json::to_string(&chains).expect("JSON").len();
        assert!(bytes <= 300_000, "{bytes} bytes");
    }

    #[test]
    fn tracking_is_refused_at_the_limit() {
        assert!(check_tracked(2, 3).is_ok());
        assert!(matches!(
            check_tracked(3, 3),
            Err(StoreError::LimitReached(message)) if message.contains("filter")
        ));
    }
}
