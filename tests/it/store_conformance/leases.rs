//! The `PartitionLeases` contract, on the backends that have leases; a store that one process
//! owns has none at all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::model::{FailureOutcome, PartitionKey};
use herald::store::{LeaseToken, Store, StoreError};

use super::{DAY, event, subscription};

on_backends!(dynamodb_only:
    one_claim_at_a_time_and_only_its_token_renews_or_releases,
    a_lease_runs_out_and_a_handover_frees_it_at_once,
    writes_fenced_by_a_replaced_token_are_refused,
    a_fenced_write_extends_the_lease,
);

#[tokio::test]
async fn the_embedded_store_has_no_leases() {
    let (store, _dir) = super::embedded().await;
    assert!(store.clone().leases().is_none());
}

async fn one_claim_at_a_time_and_only_its_token_renews_or_releases(store: Arc<dyn Store>) {
    let leases = store.clone().leases().expect("a shared store has leases");
    let partition = PartitionKey::new("t", "sub_1");
    let lease = Duration::from_secs(30);
    let token = leases
        .claim(&partition, lease)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(leases.claim(&partition, lease).await.unwrap(), None);
    // Another partition is independent.
    let other = PartitionKey::new("t", "sub_2");
    assert!(leases.claim(&other, lease).await.unwrap().is_some());

    let stranger = LeaseToken::generate();
    assert!(leases.renew(&partition, &token, lease).await.unwrap());
    assert!(!leases.renew(&partition, &stranger, lease).await.unwrap());
    // Releasing with a token that does not hold the lease changes nothing.
    leases.release(&partition, &stranger, false).await.unwrap();
    assert_eq!(leases.claim(&partition, lease).await.unwrap(), None);

    leases.release(&partition, &token, false).await.unwrap();
    let again = leases
        .claim(&partition, lease)
        .await
        .unwrap()
        .expect("free");
    assert_ne!(again, token, "every claim gets a new token");
    // The old token is fenced off.
    assert!(!leases.renew(&partition, &token, lease).await.unwrap());
}

async fn a_lease_runs_out_and_a_handover_frees_it_at_once(store: Arc<dyn Store>) {
    let leases = store.clone().leases().expect("a shared store has leases");
    let partition = PartitionKey::new("t", "sub_1");
    let short = Duration::from_secs(1);
    let claimed = Instant::now();
    let first = leases
        .claim(&partition, short)
        .await
        .unwrap()
        .expect("free");
    // Nobody else gets it while it is live; once it ran out, the next claim does.
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        if let Some(token) = leases.claim(&partition, DAY).await.unwrap() {
            break token;
        }
        assert!(Instant::now() < deadline, "the lease never ran out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        claimed.elapsed() >= short,
        "claimed again before it ran out"
    );
    assert_ne!(first, second);
    assert!(!leases.renew(&partition, &first, DAY).await.unwrap());

    // A handover (a holder stopping with work left) frees it for the next claim at once,
    // although its duration (a day) has not run out.
    leases.release(&partition, &second, true).await.unwrap();
    let third = leases.claim(&partition, DAY).await.unwrap();
    assert!(third.is_some(), "a handed-over lease is free at once");
}

async fn writes_fenced_by_a_replaced_token_are_refused(store: Arc<dyn Store>) {
    let leases = store.clone().leases().expect("a shared store has leases");
    store
        .create_subscription(
            &subscription("sub_1", &["t"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    for index in 0..2 {
        store
            .publish(&event(&format!("evt_{index}"), "t", None), DAY)
            .await
            .unwrap();
    }
    let partition = PartitionKey::new("t", "sub_1");
    let old = leases.claim(&partition, DAY).await.unwrap().expect("free");
    leases.release(&partition, &old, true).await.unwrap();
    let current = leases
        .claim(&partition, DAY)
        .await
        .unwrap()
        .expect("handed over");
    let head = store.next_deliveries(&partition, 2).await.unwrap();
    let (first, second) = (head[0].event.sequence, head[1].event.sequence);

    let refused = store.complete_delivery(&partition, first, Some(&old)).await;
    assert!(
        matches!(refused, Err(StoreError::LeaseLost(_))),
        "{refused:?}"
    );
    let refused = store
        .record_failure(
            &partition,
            first,
            1,
            "late",
            FailureOutcome::DeadLetter,
            Some(&old),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::LeaseLost(_))),
        "{refused:?}"
    );
    // Nothing was written: both deliveries are still pending, untouched.
    let pending = store.next_deliveries(&partition, 2).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].state.attempts, 0);

    // The holder's writes go through.
    store
        .complete_delivery(&partition, first, Some(&current))
        .await
        .unwrap();
    store
        .record_failure(
            &partition,
            second,
            1,
            "boom",
            FailureOutcome::RetryAt(1),
            Some(&current),
        )
        .await
        .unwrap();
    let pending = store.next_deliveries(&partition, 2).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].event.sequence, second);
    assert_eq!(pending[0].state.attempts, 1);
}

/// A completion fenced by the lease extends it by the claimed duration, as a renewal would
/// (the store says when it was sent): a partition kept busy needs no separate renewals, and
/// nobody else can claim it meanwhile.
async fn a_fenced_write_extends_the_lease(store: Arc<dyn Store>) {
    let leases = store.clone().leases().expect("a shared store has leases");
    store
        .create_subscription(
            &subscription("sub_1", &["t"]),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let mut sequences = Vec::new();
    for index in 0..2 {
        let published = store
            .publish(&event(&format!("evt_{index}"), "t", None), DAY)
            .await
            .unwrap();
        sequences.push(published.sequence);
    }
    let partition = PartitionKey::new("t", "sub_1");
    let lease = Duration::from_secs(2);
    let claimed = Instant::now();
    let token = leases
        .claim(&partition, lease)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(leases.extended_at(&token), None);
    // Past half the lease, a completion extends it.
    tokio::time::sleep_until((claimed + lease / 2).into()).await;
    let sent = Instant::now();
    store
        .complete_delivery(&partition, sequences[0], Some(&token))
        .await
        .unwrap();
    let extended = leases
        .extended_at(&token)
        .expect("the completion extended the lease");
    // Counted from when the write was sent (less the millisecond the table's end is truncated
    // to), never earlier than that, never later.
    assert!(
        extended + Duration::from_millis(1) >= sent && extended <= Instant::now(),
        "counted from when the write was sent"
    );
    // Beyond the claim's own end, but within the extension, nobody else can claim it.
    tokio::time::sleep_until((claimed + lease + Duration::from_millis(300)).into()).await;
    assert!(extended + lease > Instant::now() + Duration::from_millis(200));
    assert_eq!(
        leases.claim(&partition, lease).await.unwrap(),
        None,
        "the extended lease was claimed by another"
    );
    // And the holder's next fenced write still goes through.
    store
        .record_failure(
            &partition,
            sequences[1],
            1,
            "503",
            FailureOutcome::RetryAt(0),
            Some(&token),
        )
        .await
        .unwrap();
}
