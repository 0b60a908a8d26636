//! Subscriptions on DynamoDB: one item each under the `SUBSCRIPTION` partition key, and a
//! version item that every change bumps and every publish checks (see the module doc).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem, Update};

use super::errors::{cancellation_reasons, conflict_pause, sdk_error};
use super::schema::{self, get_n, get_s, n, s};
use super::{DynamoStore, MAX_CONFLICT_RETRIES};
use crate::model::{Page, Subscription};
use crate::store::pages;
use crate::store::records;
use crate::store::topic_index::TopicIndex;
use crate::store::{StoreError, SubscriptionLimits, SubscriptionStore};

/// The subscriptions as of one version of the subscription set.
pub(super) struct SubscriptionSet {
    pub(super) version: u64,
    pub(super) index: TopicIndex,
    /// Subscription id -> the version that created it.
    pub(super) created: HashMap<String, u64>,
    pub(super) subscriptions: HashMap<String, Subscription>,
}

impl DynamoStore {
    /// The current subscription set, loaded if this instance has none.
    pub(super) async fn subscription_set(&self) -> Result<Arc<SubscriptionSet>, StoreError> {
        if let Some(set) = self.subscriptions.lock().expect("cache lock").clone() {
            return Ok(set);
        }
        let version = self.read_version().await?;
        let mut set = SubscriptionSet {
            version,
            index: TopicIndex::default(),
            created: HashMap::new(),
            subscriptions: HashMap::new(),
        };
        for item in self
            .query_after(schema::SUBSCRIPTIONS_PK, None, usize::MAX)
            .await?
        {
            let subscription: Subscription =
                records::decode_subscription(get_s(&item, "data")?.as_bytes(), "subscription")?;
            set.index.add(&subscription);
            set.created
                .insert(subscription.id.clone(), get_n(&item, "version")?);
            set.subscriptions
                .insert(subscription.id.clone(), subscription);
        }
        let set = Arc::new(set);
        *self.subscriptions.lock().expect("cache lock") = Some(set.clone());
        Ok(set)
    }

    pub(super) fn forget_subscriptions(&self) {
        *self.subscriptions.lock().expect("cache lock") = None;
    }

    pub(super) async fn read_version(&self) -> Result<u64, StoreError> {
        match self.get_item(schema::meta_key()).await? {
            Some(item) => get_n(&item, "version"),
            None => Ok(0),
        }
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
            update.condition_expression("attribute_not_exists(pk)")
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
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let set = self.subscription_set().await?;
            limits.check(subscription, set.subscriptions.len(), |pattern| {
                set.index.with_pattern(pattern)
            })?;
            let version = self.read_version().await?;
            let mut item = schema::subscription_key(&subscription.id);
            item.insert(
                "data".into(),
                s(
                    String::from_utf8(records::encode_subscription(subscription))
                        .expect("JSON is UTF-8"),
                ),
            );
            item.insert("version".into(), n(version + 1));
            let put = TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .condition_expression("attribute_not_exists(pk)")
                        .build()
                        .expect("complete put"),
                )
                .build();
            match self.transact(vec![self.bump_version(version), put]).await {
                Ok(()) => {
                    self.forget_subscriptions();
                    return Ok(());
                }
                Err(error) => match cancellation_reasons(&error) {
                    Some(reasons)
                        if reasons.get(1).map(String::as_str) == Some("ConditionalCheckFailed") =>
                    {
                        return Err(StoreError::Conflict(format!(
                            "subscription {} already exists",
                            subscription.id
                        )));
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

    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        match self.get_item(schema::subscription_key(id)).await? {
            Some(item) => {
                records::decode_subscription(get_s(&item, "data")?.as_bytes(), "subscription")
            }
            None => Err(StoreError::NotFound(format!("subscription {id}"))),
        }
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
