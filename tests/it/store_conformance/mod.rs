//! One conformance suite for every store backend, one module per trait of the contract:
//! [`subscriptions`] (`SubscriptionStore`), [`delivery_log`] (`DeliveryLog`) and [`leases`]
//! (`PartitionLeases`, on the backends that have leases). Each case takes a fresh store.

use std::sync::Arc;
use std::time::Duration;

use herald::model::{NewEvent, OnExhausted, RetryPolicy, Subscription, now_millis};
use herald::store::{EmbeddedStore, Store};

pub(crate) fn subscription(id: &str, topics: &[&str]) -> Subscription {
    Subscription {
        id: id.into(),
        endpoint: "http://127.0.0.1:9/hook".into(),
        topics: topics.iter().map(|topic| topic.to_string()).collect(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        retry_policy: RetryPolicy::default(),
        on_exhausted: OnExhausted::DeadLetter,
        created_at: now_millis(),
        control: Default::default(),
        previous_secret: None,
        pacing: Default::default(),
        filter: None,
    }
}

pub(crate) fn event(id: &str, topic: &str, key: Option<&str>) -> NewEvent {
    NewEvent {
        id: id.into(),
        topic: topic.into(),
        payload: format!("payload of {id}").into_bytes(),
        content_type: "application/json".into(),
        idempotency_key: key.map(str::to_string),
        attributes: [("source".to_string(), "test".to_string())].into(),
        trace: None,
    }
}

const DAY: Duration = Duration::from_secs(86400);

/// Generates one `#[tokio::test]` per case and backend, each case an `async fn(Arc<dyn Store>)`
/// of the invoking module; `dynamodb_only` for contracts only a shared store has.
macro_rules! on_backends {
    (@backend $backend:ident, $factory:path, $($case:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _guard) = $factory().await;
                    super::$case(store).await;
                }
            )*
        }
    };
    (dynamodb_only: $($case:ident),* $(,)?) => {
        on_backends!(@backend dynamodb_store, crate::store_conformance::dynamodb, $($case),*);
    };
    ($($case:ident),* $(,)?) => {
        on_backends!(@backend embedded_store, crate::store_conformance::embedded, $($case),*);
        on_backends!(@backend dynamodb_store, crate::store_conformance::dynamodb, $($case),*);
    };
}

/// A subscription stored with `id`, as read back.
async fn subscription_with_time(store: &Arc<dyn Store>, id: &str) -> Subscription {
    // created_at is set by the test helper; read it back to compare the rest.
    let stored = store.get_subscription(id).await.unwrap();
    Subscription {
        created_at: stored.created_at,
        ..subscription(id, &["t"])
    }
}

mod delivery_log;
mod leases;
mod retarget;
mod subscriptions;

async fn embedded() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (Arc::new(store), dir)
}

async fn dynamodb() -> (Arc<dyn Store>, String) {
    let (store, table) = crate::support::dynamo::fresh_store().await;
    (Arc::new(store), table)
}
