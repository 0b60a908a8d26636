//! The embedded store's subscription registry: reads in read transactions, writes through the
//! writer (which also keeps the topic index).

use async_trait::async_trait;

use super::EmbeddedStore;
use super::schema::SUBSCRIPTIONS;
use super::unavailable;
use super::writer::Command;
use crate::model::{Page, Subscription};
use crate::store::pages;
use crate::store::records;
use crate::store::{
    StoreError, SubscriptionLimits, SubscriptionStore, SubscriptionUpdate, Updated,
};

#[async_trait]
impl SubscriptionStore for EmbeddedStore {
    async fn create_subscription(
        &self,
        subscription: &Subscription,
        limits: &SubscriptionLimits,
    ) -> Result<(), StoreError> {
        let subscription = subscription.clone();
        let limits = *limits;
        self.submit(|reply| Command::CreateSubscription(subscription, limits, reply))
            .await
    }

    async fn update_subscription(
        &self,
        id: &str,
        update: SubscriptionUpdate,
    ) -> Result<Updated, StoreError> {
        let id = id.to_string();
        self.submit(|reply| Command::UpdateSubscription(id, update, reply))
            .await
    }

    async fn get_subscription(&self, id: &str) -> Result<Subscription, StoreError> {
        let id = id.to_string();
        self.read_with(move |transaction| {
            let id = id.as_str();
            let table = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
            let value = table.get(id).map_err(unavailable)?;
            match value {
                Some(bytes) => records::decode_subscription(bytes.value(), "subscription"),
                None => Err(StoreError::NotFound(format!("subscription {id}"))),
            }
        })
        .await
    }

    async fn list_subscriptions(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError> {
        let after = page_token
            .map(pages::decode_subscription_token)
            .transpose()?;
        self.read_with(move |transaction| {
            let table = transaction.open_table(SUBSCRIPTIONS).map_err(unavailable)?;
            let range = match after.as_deref() {
                Some(after) => table
                    .range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
                None => table.range::<&str>(..),
            }
            .map_err(unavailable)?;
            // One more than asked, to learn whether another page follows.
            let mut items = Vec::new();
            for entry in range.take(page_size + 1) {
                let (_, value) = entry.map_err(unavailable)?;
                items.push(records::decode_subscription(value.value(), "subscription")?);
            }
            Ok(pages::subscription_page(items, page_size))
        })
        .await
    }

    async fn delete_subscription(&self, id: &str) -> Result<u64, StoreError> {
        let id = id.to_string();
        self.submit(|reply| Command::DeleteSubscription(id, reply))
            .await
    }
}
