//! Subscriptions that do not receive every event of their topics: filters, and topics
//! changed in place. Each partition's previous-sequence chain links the events it received,
//! and its backlog counts them, on both stores.

use std::sync::Arc;

use herald::model::{
    NewEvent, PartitionKey, PendingDelivery, ReplayRange, Subscription, now_millis,
};
use herald::store::{Store, SubscriptionLimits};

use super::{DAY, event, subscription};

on_backends!(
    a_filter_leaves_events_out_and_the_chain_links_those_received,
    a_filter_added_later_continues_the_chain,
    changed_topics_drop_the_removed_partitions_and_keep_their_last_link,
    a_replay_queues_only_what_the_filter_matches,
);

fn in_region(id: &str, topic: &str, region: &str) -> NewEvent {
    NewEvent {
        attributes: [("region".to_string(), region.to_string())].into(),
        ..event(id, topic, None)
    }
}

fn filtered(id: &str, topics: &[&str], filter: &str) -> Subscription {
    Subscription {
        filter: Some(filter.to_string()),
        ..subscription(id, topics)
    }
}

async fn create(store: &Arc<dyn Store>, subscription: Subscription) {
    store
        .create_subscription(&subscription, &SubscriptionLimits::NONE)
        .await
        .unwrap();
}

async fn deliveries(store: &Arc<dyn Store>, topic: &str, id: &str) -> Vec<PendingDelivery> {
    store
        .next_deliveries(&PartitionKey::new(topic, id), 1000)
        .await
        .unwrap()
}

/// The partition's backlog as the status reports it (counters, not a count of the list).
async fn backlog(store: &Arc<dyn Store>, id: &str, topic: &str) -> u64 {
    store
        .partition_status(id, 100, None)
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|status| status.partition.topic == topic)
        .map_or(0, |status| status.pending)
}

/// Checks that each delivery names the one before it, the first naming `first_previous`.
fn assert_chain(list: &[PendingDelivery], first_previous: u64) {
    let mut previous = first_previous;
    for delivery in list {
        assert_eq!(
            delivery.previous_sequence, previous,
            "chain broken at {}",
            delivery.event.sequence
        );
        previous = delivery.event.sequence;
    }
}

async fn a_filter_leaves_events_out_and_the_chain_links_those_received(store: Arc<dyn Store>) {
    create(
        &store,
        filtered("sub_eu", &["orders"], r#"attributes.region == "eu""#),
    )
    .await;
    create(&store, subscription("sub_all", &["orders"])).await;
    let mut eu = Vec::new();
    for index in 0..6 {
        let region = if index % 2 == 0 { "eu" } else { "us" };
        let published = store
            .publish(&in_region(&format!("evt_{index}"), "orders", region), DAY)
            .await
            .unwrap();
        assert_eq!(
            published.subscription_count,
            if region == "eu" { 2 } else { 1 },
            "{region}"
        );
        if region == "eu" {
            eu.push(published.sequence);
        }
    }
    // Concurrent publishes share transactions on DynamoDB: filters apply per event there too.
    let mut handles = Vec::new();
    for index in 6..30 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let region = if index % 3 == 0 { "eu" } else { "us" };
            let published = store
                .publish(&in_region(&format!("evt_{index}"), "orders", region), DAY)
                .await
                .unwrap();
            (region, published.sequence)
        }));
    }
    for handle in handles {
        let (region, sequence) = handle.await.unwrap();
        if region == "eu" {
            eu.push(sequence);
        }
    }
    eu.sort();
    let received = deliveries(&store, "orders", "sub_eu").await;
    let sequences: Vec<u64> = received.iter().map(|d| d.event.sequence).collect();
    assert_eq!(sequences, eu, "exactly the matching events, in order");
    assert_chain(&received, 0);
    assert!(
        received
            .iter()
            .all(|d| d.event.attributes.get("region").map(String::as_str) == Some("eu"))
    );
    let all = deliveries(&store, "orders", "sub_all").await;
    assert_eq!(all.len(), 30);
    assert_chain(&all, 0);
    assert_eq!(backlog(&store, "sub_eu", "orders").await, eu.len() as u64);
    assert_eq!(backlog(&store, "sub_all", "orders").await, 30);
}

async fn a_filter_added_later_continues_the_chain(store: Arc<dyn Store>) {
    create(&store, subscription("sub_x", &["t"])).await;
    let first = store
        .publish(&in_region("e1", "t", "us"), DAY)
        .await
        .unwrap();
    let second = store
        .publish(&in_region("e2", "t", "us"), DAY)
        .await
        .unwrap();
    store
        .update_subscription(
            "sub_x",
            Arc::new(|subscription| {
                subscription.filter = Some(r#"attributes.region == "eu""#.into());
                Ok(())
            }),
        )
        .await
        .unwrap();
    let skipped = store
        .publish(&in_region("e3", "t", "us"), DAY)
        .await
        .unwrap();
    assert_eq!(skipped.subscription_count, 0);
    let fourth = store
        .publish(&in_region("e4", "t", "eu"), DAY)
        .await
        .unwrap();
    assert_eq!(fourth.subscription_count, 1);
    let received = deliveries(&store, "t", "sub_x").await;
    let sequences: Vec<u64> = received.iter().map(|d| d.event.sequence).collect();
    assert_eq!(
        sequences,
        [first.sequence, second.sequence, fourth.sequence]
    );
    assert_chain(&received, 0);
    assert_eq!(backlog(&store, "sub_x", "t").await, 3);
    // Removing the filter: every event again, the chain still whole.
    store
        .update_subscription(
            "sub_x",
            Arc::new(|subscription| {
                subscription.filter = None;
                Ok(())
            }),
        )
        .await
        .unwrap();
    let fifth = store
        .publish(&in_region("e5", "t", "us"), DAY)
        .await
        .unwrap();
    let received = deliveries(&store, "t", "sub_x").await;
    assert_eq!(received.last().unwrap().event.sequence, fifth.sequence);
    assert_chain(&received, 0);
    assert_eq!(backlog(&store, "sub_x", "t").await, 4);
}

async fn changed_topics_drop_the_removed_partitions_and_keep_their_last_link(
    store: Arc<dyn Store>,
) {
    create(&store, subscription("sub_1", &["a", "b"])).await;
    let a1 = store.publish(&event("a1", "a", None), DAY).await.unwrap();
    store.publish(&event("b1", "b", None), DAY).await.unwrap();
    let b2 = store.publish(&event("b2", "b", None), DAY).await.unwrap();
    let set_topics = |topics: &'static [&'static str]| {
        Arc::new(move |subscription: &mut Subscription| {
            subscription.topics = topics.iter().map(|topic| topic.to_string()).collect();
            Ok(())
        })
    };
    let updated = store
        .update_subscription("sub_1", set_topics(&["a", "c"]))
        .await
        .unwrap();
    assert_eq!(updated.dropped, 2, "b1 and b2");
    assert_eq!(updated.subscription.topics, ["a", "c"]);
    assert!(deliveries(&store, "b", "sub_1").await.is_empty());
    assert_eq!(deliveries(&store, "a", "sub_1").await.len(), 1, "a is kept");
    assert_eq!(backlog(&store, "sub_1", "b").await, 0);
    // Events on a removed topic no longer reach it; a topic added does, from its first.
    let b3 = store.publish(&event("b3", "b", None), DAY).await.unwrap();
    assert_eq!(b3.subscription_count, 0);
    let c1 = store.publish(&event("c1", "c", None), DAY).await.unwrap();
    assert_eq!(c1.subscription_count, 1);
    let on_c = deliveries(&store, "c", "sub_1").await;
    assert_eq!(on_c.len(), 1);
    assert_eq!(on_c[0].previous_sequence, 0);
    // Added back: its chain goes on from the last event it received there.
    let updated = store
        .update_subscription("sub_1", set_topics(&["*"]))
        .await
        .unwrap();
    assert_eq!(updated.dropped, 0);
    let b4 = store.publish(&event("b4", "b", None), DAY).await.unwrap();
    assert_eq!(b4.subscription_count, 1);
    let on_b = deliveries(&store, "b", "sub_1").await;
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].event.sequence, b4.sequence);
    assert_eq!(on_b[0].previous_sequence, b2.sequence);
    assert_eq!(backlog(&store, "sub_1", "b").await, 1);
    let a2 = store.publish(&event("a2", "a", None), DAY).await.unwrap();
    let on_a = deliveries(&store, "a", "sub_1").await;
    assert_eq!(
        on_a.iter().map(|d| d.event.sequence).collect::<Vec<_>>(),
        [a1.sequence, a2.sequence]
    );
    assert_chain(&on_a, 0);
    assert_eq!(backlog(&store, "sub_1", "a").await, 2);
}

async fn a_replay_queues_only_what_the_filter_matches(store: Arc<dyn Store>) {
    let filter = r#"attributes.region == "eu""#;
    create(&store, filtered("sub_f", &["t"], filter)).await;
    // Holds the events (a store may delete an event with its last delivery).
    create(&store, subscription("sub_all", &["t"])).await;
    let first = store
        .publish(&in_region("e1", "t", "eu"), DAY)
        .await
        .unwrap();
    store
        .publish(&in_region("e2", "t", "us"), DAY)
        .await
        .unwrap();
    let third = store
        .publish(&in_region("e3", "t", "eu"), DAY)
        .await
        .unwrap();
    let partition = PartitionKey::new("t", "sub_f");
    store
        .complete_deliveries(&partition, &[first.sequence, third.sequence], None)
        .await
        .unwrap();
    assert!(deliveries(&store, "t", "sub_f").await.is_empty());
    let replayed = store
        .replay(
            &partition,
            &ReplayRange {
                from_sequence: 0,
                to_sequence: u64::MAX,
                from_time: 0,
                to_time: now_millis(),
                limit: 100,
                filter: Some(filter.to_string()),
            },
        )
        .await
        .unwrap();
    assert_eq!(replayed.count, 2);
    let again = deliveries(&store, "t", "sub_f").await;
    assert_eq!(
        again.iter().map(|d| d.event.sequence).collect::<Vec<_>>(),
        [first.sequence, third.sequence]
    );
    assert_chain(&again, 0);
}
