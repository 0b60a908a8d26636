//! The `DeliveryLog` contract: fan-out, order, the delivery lifecycle, idempotency.

use std::sync::Arc;
use std::time::Duration;

use herald::model::{FailureOutcome, PartitionKey, now_millis};
use herald::store::{Store, StoreError};

use super::{DAY, event, subscription};

on_backends!(
    publish_fans_out_to_matching_partitions_in_sequence_order,
    sequences_increase_per_topic_under_concurrency,
    completion_and_failure_move_the_partition_head,
    list_pending_pages_over_topics_and_includes_dead_letters,
    idempotency_returns_the_original_outcome,
    fan_out_reaches_a_thousand_subscriptions_in_order,
    fan_out_reaches_ten_thousand_subscriptions_with_the_largest_event,
    the_largest_payload_round_trips,
    a_redriven_dead_letter_stays_ahead_of_a_later_dead_letter,
);

/// A dead letter redriven while the partition's head is about to be dead-lettered too stays
/// readable, in front: dead-lettering the later head must not move the head mark past it.
async fn a_redriven_dead_letter_stays_ahead_of_a_later_dead_letter(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_1", &["t"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let mut sequences = Vec::new();
    for index in 0..3 {
        sequences.push(
            store
                .publish(&event(&format!("evt_{index}"), "t", None), DAY)
                .await
                .unwrap()
                .sequence,
        );
    }
    let partition = PartitionKey::new("t", "sub_1");
    store
        .record_failure(
            &partition,
            sequences[0],
            1,
            "HTTP 500",
            FailureOutcome::DeadLetter,
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.redrive(&partition, None).await.unwrap(), 1);
    // The worker's attempt at the head it had read (the second event) fails for good.
    store
        .record_failure(
            &partition,
            sequences[1],
            1,
            "HTTP 500",
            FailureOutcome::DeadLetter,
            None,
        )
        .await
        .unwrap();
    let next: Vec<u64> = store
        .next_deliveries(&partition, 10)
        .await
        .unwrap()
        .iter()
        .map(|delivery| delivery.event.sequence)
        .collect();
    assert_eq!(
        next,
        [sequences[0], sequences[2]],
        "the redriven one first, none lost"
    );
    let status = store.partition_status("sub_1", 10, None).await.unwrap();
    assert_eq!(status.items[0].pending, 2);
    assert_eq!(status.items[0].dead_letters, 1);
    assert_eq!(
        status.items[0].head.as_ref().unwrap().sequence,
        sequences[0]
    );
}

/// Creates subscriptions 200 at a time, as many Subscribe calls in flight would.
async fn create_all(store: &Arc<dyn Store>, subscriptions: Vec<herald::model::Subscription>) {
    let mut subscriptions = subscriptions.into_iter().peekable();
    while subscriptions.peek().is_some() {
        let mut calls = tokio::task::JoinSet::new();
        for subscription in subscriptions.by_ref().take(200) {
            let store = store.clone();
            calls.spawn(async move {
                store
                    .create_subscription(&subscription, &herald::store::SubscriptionLimits::NONE)
                    .await
            });
        }
        while let Some(created) = calls.join_next().await {
            created.unwrap().unwrap();
        }
    }
}

async fn publish_fans_out_to_matching_partitions_in_sequence_order(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_exact", &["user:new"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    store
        .create_subscription(
            &subscription("sub_prefix", &["user:*", "user:new"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    store
        .create_subscription(
            &subscription("sub_all", &["*"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    store
        .create_subscription(
            &subscription("sub_other", &["fin:*"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();

    let first = store
        .publish(&event("evt_1", "user:new", None), DAY)
        .await
        .unwrap();
    let second = store
        .publish(&event("evt_2", "user:new", None), DAY)
        .await
        .unwrap();
    let online = store
        .publish(&event("evt_3", "user:online", None), DAY)
        .await
        .unwrap();
    assert_eq!(
        first.subscription_count, 3,
        "each matching subscription once"
    );
    assert_eq!(online.subscription_count, 2);
    assert!(second.sequence > first.sequence);
    let mut partitions = first.partitions.clone();
    partitions.sort();
    assert_eq!(
        partitions,
        [
            PartitionKey::new("user:new", "sub_all"),
            PartitionKey::new("user:new", "sub_exact"),
            PartitionKey::new("user:new", "sub_prefix"),
        ]
    );

    let partition = PartitionKey::new("user:new", "sub_prefix");
    let deliveries = store.next_deliveries(&partition, 10).await.unwrap();
    let sequences: Vec<u64> = deliveries
        .iter()
        .map(|delivery| delivery.event.sequence)
        .collect();
    assert_eq!(sequences, [first.sequence, second.sequence]);
    assert_eq!(deliveries[0].previous_sequence, 0);
    assert_eq!(deliveries[1].previous_sequence, first.sequence);
    assert_eq!(deliveries[0].event.id, "evt_1");
    assert_eq!(deliveries[0].event.payload, b"payload of evt_1");
    assert_eq!(deliveries[0].event.attributes["source"], "test");
    assert_eq!(deliveries[0].state.attempts, 0);
    assert_eq!(store.next_deliveries(&partition, 1).await.unwrap().len(), 1);
    assert!(
        store
            .next_deliveries(&PartitionKey::new("fin:x", "sub_other"), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let mut pending = store.pending_partitions().await.unwrap();
    pending.sort();
    assert_eq!(pending.len(), 5, "{pending:?}");
}

async fn sequences_increase_per_topic_under_concurrency(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_1", &["*"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut sequences = Vec::new();
            for index in 0..50 {
                let published = store
                    .publish(&event(&format!("evt_{writer}_{index}"), "t", None), DAY)
                    .await
                    .unwrap();
                sequences.push(published.sequence);
            }
            sequences
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let sequences = task.await.unwrap();
        assert!(
            sequences.windows(2).all(|pair| pair[0] < pair[1]),
            "one writer's publishes are ordered"
        );
        all.extend(sequences);
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 400);
    let deliveries = store
        .next_deliveries(&PartitionKey::new("t", "sub_1"), 1000)
        .await
        .unwrap();
    let sequences: Vec<u64> = deliveries
        .iter()
        .map(|delivery| delivery.event.sequence)
        .collect();
    assert_eq!(
        sequences, all,
        "the partition holds every event in sequence order"
    );
    let mut previous = 0;
    for delivery in &deliveries {
        assert_eq!(delivery.previous_sequence, previous);
        previous = delivery.event.sequence;
    }
}

async fn completion_and_failure_move_the_partition_head(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_1", &["t"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let partition = PartitionKey::new("t", "sub_1");
    let mut sequences = Vec::new();
    for index in 0..3 {
        sequences.push(
            store
                .publish(&event(&format!("evt_{index}"), "t", None), DAY)
                .await
                .unwrap()
                .sequence,
        );
    }
    store
        .complete_delivery(&partition, sequences[0], None)
        .await
        .unwrap();
    store
        .complete_delivery(&partition, sequences[0], None)
        .await
        .unwrap(); // harmless repeat
    let head = store.next_deliveries(&partition, 10).await.unwrap();
    assert_eq!(head[0].event.sequence, sequences[1]);

    let retry_at = now_millis() + 60_000;
    store
        .record_failure(
            &partition,
            sequences[1],
            1,
            "HTTP 500",
            FailureOutcome::RetryAt(retry_at),
            None,
        )
        .await
        .unwrap();
    let head = store.next_deliveries(&partition, 10).await.unwrap();
    assert_eq!(
        head[0].event.sequence, sequences[1],
        "a retried event stays at the head"
    );
    assert_eq!(head[0].state.attempts, 1);
    assert_eq!(head[0].state.next_attempt_at, retry_at);
    assert_eq!(head[0].last_error.as_deref(), Some("HTTP 500"));
    // The same record again, as a worker repeats it after an ambiguous error (its first try
    // committed): the attempt is counted once.
    store
        .record_failure(
            &partition,
            sequences[1],
            1,
            "HTTP 500",
            FailureOutcome::RetryAt(retry_at),
            None,
        )
        .await
        .unwrap();
    let head = store.next_deliveries(&partition, 10).await.unwrap();
    assert_eq!(head[0].state.attempts, 1, "a repeated record counts once");

    store
        .record_failure(
            &partition,
            sequences[1],
            2,
            "HTTP 502",
            FailureOutcome::DeadLetter,
            None,
        )
        .await
        .unwrap();
    let head = store.next_deliveries(&partition, 10).await.unwrap();
    let remaining: Vec<u64> = head
        .iter()
        .map(|delivery| delivery.event.sequence)
        .collect();
    assert_eq!(
        remaining,
        [sequences[2]],
        "dead-lettered events leave the head"
    );
    assert_eq!(head[0].previous_sequence, sequences[1]);
    // A repeated dead-letter record changes nothing either.
    store
        .record_failure(
            &partition,
            sequences[1],
            2,
            "HTTP 502",
            FailureOutcome::DeadLetter,
            None,
        )
        .await
        .unwrap();
    // Failures of events that are not pending are ignored.
    store
        .record_failure(&partition, 12345, 1, "x", FailureOutcome::DeadLetter, None)
        .await
        .unwrap();
    store
        .complete_delivery(&partition, sequences[2], None)
        .await
        .unwrap();
    assert!(
        store
            .next_deliveries(&partition, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The dead letter is still listed as pending.
    let pending = store
        .list_pending("sub_1", None, false, 10, None)
        .await
        .unwrap();
    assert_eq!(pending.items.len(), 1);
    assert_eq!(pending.items[0].event.sequence, sequences[1]);
    assert!(pending.items[0].state.dead_lettered);
    assert_eq!(pending.items[0].state.attempts, 2);
}

async fn list_pending_pages_over_topics_and_includes_dead_letters(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_1", &["*"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let mut expected = Vec::new();
    for topic in ["c", "a", "b"] {
        for index in 0..3 {
            let published = store
                .publish(&event(&format!("evt_{topic}{index}"), topic, None), DAY)
                .await
                .unwrap();
            expected.push((topic.to_string(), published.sequence));
        }
    }
    expected.sort();
    let dead = expected[1].clone();
    store
        .record_failure(
            &PartitionKey::new(&dead.0, "sub_1"),
            dead.1,
            1,
            "gone",
            FailureOutcome::DeadLetter,
            None,
        )
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    // Dead-lettering is only ever done at the head; complete the head first for realism.
    let mut listed = Vec::new();
    let mut token = None;
    loop {
        let page = store
            .list_pending("sub_1", None, false, 4, token.as_deref())
            .await
            .unwrap();
        assert!(page.items.len() <= 4);
        listed.extend(page.items.iter().map(|item| {
            (
                item.event.topic.clone(),
                item.event.sequence,
                item.state.dead_lettered,
            )
        }));
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    let keys: Vec<(String, u64)> = listed
        .iter()
        .map(|(topic, sequence, _)| (topic.clone(), *sequence))
        .collect();
    assert_eq!(
        keys, expected,
        "every pending delivery once, in (topic, sequence) order"
    );
    assert!(
        listed
            .iter()
            .any(|(topic, sequence, dead_lettered)| *dead_lettered
                && (topic, sequence) == (&dead.0, &dead.1))
    );

    let only_b = store
        .list_pending("sub_1", Some("b"), false, 10, None)
        .await
        .unwrap();
    assert_eq!(only_b.items.len(), 3);
    assert!(only_b.next_token.is_none());
    assert!(matches!(
        store.list_pending("sub_x", None, false, 10, None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .list_pending("sub_1", None, false, 10, Some("@@"))
            .await,
        Err(StoreError::InvalidArgument(_))
    ));
}

async fn idempotency_returns_the_original_outcome(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_1", &["t"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let original = store
        .publish(&event("evt_1", "t", Some("key")), DAY)
        .await
        .unwrap();
    let repeat = store
        .publish(&event("evt_2", "t", Some("key")), DAY)
        .await
        .unwrap();
    assert!(repeat.duplicate && !original.duplicate);
    assert_eq!(
        (repeat.event_id.as_str(), repeat.sequence),
        ("evt_1", original.sequence)
    );
    assert_eq!(repeat.subscription_count, 1);
    // A duplicate wakes the topic's partitions again, in case the original's caller went away
    // before waking them; it writes nothing.
    assert_eq!(repeat.partitions, original.partitions);
    let other_topic = store
        .publish(&event("evt_3", "u", Some("key")), DAY)
        .await
        .unwrap();
    assert!(!other_topic.duplicate);
    assert_eq!(
        store
            .next_deliveries(&PartitionKey::new("t", "sub_1"), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // A zero window remembers nothing.
    store
        .publish(&event("evt_4", "t", Some("brief")), Duration::ZERO)
        .await
        .unwrap();
    let again = store
        .publish(&event("evt_5", "t", Some("brief")), Duration::ZERO)
        .await
        .unwrap();
    assert!(!again.duplicate);
}

async fn fan_out_reaches_a_thousand_subscriptions_in_order(store: Arc<dyn Store>) {
    let ids: Vec<String> = (0..1000).map(|index| format!("sub_{index:04}")).collect();
    // Half by exact name, half by pattern.
    let subscriptions = ids
        .iter()
        .enumerate()
        .map(|(index, id)| {
            subscription(
                id,
                &[if index % 2 == 0 {
                    "big:fanout"
                } else {
                    "big:*"
                }],
            )
        })
        .collect();
    create_all(&store, subscriptions).await;
    let mut sequences = Vec::new();
    for index in 0..3 {
        let published = store
            .publish(&event(&format!("evt_{index}"), "big:fanout", None), DAY)
            .await
            .unwrap();
        assert_eq!(published.subscription_count, 1000);
        assert_eq!(published.partitions.len(), 1000);
        sequences.push(published.sequence);
    }
    for id in &ids {
        let deliveries = store
            .next_deliveries(&PartitionKey::new("big:fanout", id.as_str()), 10)
            .await
            .unwrap();
        let got: Vec<(u64, u64)> = deliveries
            .iter()
            .map(|delivery| (delivery.event.sequence, delivery.previous_sequence))
            .collect();
        assert_eq!(
            got,
            [
                (sequences[0], 0),
                (sequences[1], sequences[0]),
                (sequences[2], sequences[1])
            ],
            "partition of {id}"
        );
    }
}

/// The largest event the API accepts (256 KiB payload, 64 attributes of the longest key and
/// value) fanned out to 10,000 subscriptions: the publish succeeds, and partitions across the
/// whole range hold their delivery (on DynamoDB, only once the fan-out is complete).
async fn fan_out_reaches_ten_thousand_subscriptions_with_the_largest_event(store: Arc<dyn Store>) {
    const SUBSCRIPTIONS: usize = 10_000;
    let ids: Vec<String> = (0..SUBSCRIPTIONS)
        .map(|index| format!("sub_{index:05}"))
        .collect();
    let subscriptions = ids
        .iter()
        .map(|id| subscription(id, &["huge:fanout"]))
        .collect();
    create_all(&store, subscriptions).await;
    let mut largest = event("evt_huge", "huge:fanout", None);
    largest.payload = vec![b'p'; herald::config::defaults::MAX_PAYLOAD_BYTES];
    largest.attributes = (0..herald::validate::MAX_ATTRIBUTES)
        .map(|index| {
            let key = format!(
                "{index:02}{}",
                "k".repeat(herald::validate::MAX_ATTRIBUTE_KEY_LEN - 2)
            );
            (key, "v".repeat(herald::validate::MAX_ATTRIBUTE_VALUE_LEN))
        })
        .collect();
    let published = store.publish(&largest, DAY).await.unwrap();
    assert_eq!(published.subscription_count as usize, SUBSCRIPTIONS);
    assert_eq!(published.partitions.len(), SUBSCRIPTIONS);
    for id in ids.iter().step_by(97).chain(ids.last()) {
        let deliveries = store
            .next_deliveries(&PartitionKey::new("huge:fanout", id.as_str()), 10)
            .await
            .unwrap();
        assert_eq!(deliveries.len(), 1, "partition of {id}");
        assert_eq!(deliveries[0].event.sequence, published.sequence);
        assert_eq!(deliveries[0].event.payload, largest.payload);
        assert_eq!(deliveries[0].event.attributes, largest.attributes);
    }
}

async fn the_largest_payload_round_trips(store: Arc<dyn Store>) {
    store
        .create_subscription(
            &subscription("sub_1", &["big"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    // The default limit, 256 KiB, of bytes that are not UTF-8.
    let payload: Vec<u8> = (0..256 * 1024).map(|index| (index % 251) as u8).collect();
    let mut large = event("evt_large", "big", None);
    large.payload = payload.clone();
    store.publish(&large, DAY).await.unwrap();
    let deliveries = store
        .next_deliveries(&PartitionKey::new("big", "sub_1"), 10)
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].event.payload, payload);
}
