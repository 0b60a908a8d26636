//! The `SubscriptionStore` contract.

use std::sync::Arc;

use herald::model::{PartitionKey, Subscription};
use herald::store::{Store, StoreError, SubscriptionLimits};

use super::{DAY, event, subscription, subscription_with_time};

on_backends!(
    subscriptions_are_created_listed_and_deleted,
    deleting_a_subscription_drops_its_backlog,
    subscription_limits_hold_in_total_and_per_pattern,
    updates_change_a_subscription_in_place_or_write_nothing,
);

async fn updates_change_a_subscription_in_place_or_write_nothing(store: Arc<dyn Store>) {
    use herald::model::SubscriptionState;
    store
        .create_subscription(
            &subscription("sub_u", &["t", "u"]),
            &SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let before = store.get_subscription("sub_u").await.unwrap();
    let paused = store
        .update_subscription(
            "sub_u",
            Arc::new(|subscription| {
                subscription.control.state = SubscriptionState::Paused;
                subscription.control.reason = "maintenance".into();
                subscription.control.paused_topics.insert("u".into());
                Ok(())
            }),
        )
        .await
        .unwrap();
    let paused = paused.subscription;
    assert_eq!(paused.control.state, SubscriptionState::Paused);
    let read = store.get_subscription("sub_u").await.unwrap();
    assert_eq!(read, paused);
    assert!(!read.control.sends("t"));
    assert_eq!(
        Subscription {
            control: before.control.clone(),
            ..read.clone()
        },
        before,
        "only the control changed"
    );
    // An update that refuses writes nothing; one that changes the id is refused.
    let refused = store
        .update_subscription(
            "sub_u",
            Arc::new(|subscription| {
                subscription.control.state = SubscriptionState::Active;
                Err(StoreError::FailedPrecondition("no".into()))
            }),
        )
        .await;
    assert!(matches!(refused, Err(StoreError::FailedPrecondition(_))));
    let renamed = store
        .update_subscription(
            "sub_u",
            Arc::new(|subscription| {
                subscription.id = "sub_v".into();
                Ok(())
            }),
        )
        .await;
    assert!(
        matches!(renamed, Err(StoreError::Internal(_))),
        "{renamed:?}"
    );
    assert_eq!(store.get_subscription("sub_u").await.unwrap(), paused);
    let missing = store
        .update_subscription("sub_missing", Arc::new(|_| Ok(())))
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));
    // Listed with its control, and survives as stored.
    let listed = store.list_subscriptions(10, None).await.unwrap().items;
    assert_eq!(listed, [paused]);
}

async fn subscriptions_are_created_listed_and_deleted(store: Arc<dyn Store>) {
    for id in ["sub_a", "sub_b", "sub_c"] {
        store
            .create_subscription(
                &subscription(id, &["t"]),
                &herald::store::SubscriptionLimits::NONE,
            )
            .await
            .unwrap();
    }
    assert!(matches!(
        store
            .create_subscription(
                &subscription("sub_b", &["t"]),
                &herald::store::SubscriptionLimits::NONE
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.get_subscription("sub_b").await.unwrap(),
        subscription_with_time(&store, "sub_b").await
    );
    assert!(matches!(
        store.get_subscription("sub_x").await,
        Err(StoreError::NotFound(_))
    ));

    let first = store.list_subscriptions(2, None).await.unwrap();
    let ids: Vec<&str> = first
        .items
        .iter()
        .map(|subscription| subscription.id.as_str())
        .collect();
    assert_eq!(ids, ["sub_a", "sub_b"]);
    let second = store
        .list_subscriptions(2, first.next_token.as_deref())
        .await
        .unwrap();
    let ids: Vec<&str> = second
        .items
        .iter()
        .map(|subscription| subscription.id.as_str())
        .collect();
    assert_eq!(ids, ["sub_c"]);
    assert_eq!(second.next_token, None);
    assert!(matches!(
        store.list_subscriptions(2, Some("not a token")).await,
        Err(StoreError::InvalidArgument(_))
    ));

    assert_eq!(store.delete_subscription("sub_b").await.unwrap(), 0);
    assert!(matches!(
        store.delete_subscription("sub_b").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store
            .list_subscriptions(10, None)
            .await
            .unwrap()
            .items
            .len(),
        2
    );
}

async fn deleting_a_subscription_drops_its_backlog(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_1", &["a", "b"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    store
        .create_subscription(
            &subscription("sub_2", &["a"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    for index in 0..4 {
        store
            .publish(&event(&format!("evt_a{index}"), "a", None), DAY)
            .await
            .unwrap();
    }
    store
        .publish(&event("evt_b", "b", None), DAY)
        .await
        .unwrap();
    assert_eq!(store.delete_subscription("sub_1").await.unwrap(), 5);
    assert!(
        store
            .next_deliveries(&PartitionKey::new("a", "sub_1"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The other subscription still has its copy of the shared events.
    let kept = store
        .next_deliveries(&PartitionKey::new("a", "sub_2"), 10)
        .await
        .unwrap();
    assert_eq!(kept.len(), 4);
    assert_eq!(kept[0].event.payload, b"payload of evt_a0");
    assert_eq!(
        store.pending_partitions().await.unwrap(),
        [PartitionKey::new("a", "sub_2")]
    );
    // New publishes no longer fan out to the deleted subscription.
    let published = store
        .publish(&event("evt_a9", "a", None), DAY)
        .await
        .unwrap();
    assert_eq!(published.subscription_count, 1);
}

async fn subscription_limits_hold_in_total_and_per_pattern(store: Arc<dyn Store>) {
    let limits = SubscriptionLimits {
        total: 3,
        per_pattern: 2,
    };
    let create = |id: &'static str, pattern: &'static str| {
        let store = store.clone();
        async move {
            store
                .create_subscription(&subscription(id, &[pattern]), &limits)
                .await
        }
    };
    create("sub_a", "*").await.unwrap();
    create("sub_b", "*").await.unwrap();
    let error = create("sub_c", "*").await.unwrap_err();
    assert!(
        matches!(&error, StoreError::LimitReached(text) if text.contains("`*`")),
        "{error:?}"
    );
    create("sub_c", "t").await.unwrap();
    let error = create("sub_d", "u").await.unwrap_err();
    assert!(
        matches!(&error, StoreError::LimitReached(text) if text.contains("--max-subscriptions 3")),
        "{error:?}"
    );
    // Nothing was written by the refused calls; removing one makes room.
    assert!(matches!(
        store.get_subscription("sub_d").await,
        Err(StoreError::NotFound(_))
    ));
    store.delete_subscription("sub_a").await.unwrap();
    create("sub_d", "*").await.unwrap();
}
