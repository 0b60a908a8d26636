//! Criterion micro-benchmarks of the hot paths: signing, building a delivery request, key and
//! record encoding, and the embedded store's append (durable publish) and drain (reading a
//! partition's head).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use herald::delivery::webhook;
use herald::model::{
    DeliveryState, Event, FailureOutcome, NewEvent, OnExhausted, PartitionKey, PendingDelivery,
    RetryPolicy, Subscription,
};
use herald::signing;
use herald::store::records;
use herald::store::{EmbeddedStore, Store};

fn signing(criterion: &mut Criterion) {
    let key = signing::decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let body = vec![b'x'; 1024];
    let mut group = criterion.benchmark_group("signing");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("sign 1 KiB", |bencher| {
        bencher.iter(|| {
            signing::sign(
                &key,
                black_box("evt_01a2210f7dd2760f377bcaca7d4f"),
                1_795_850_993,
                black_box(&body),
            )
        })
    });
    group.finish();
}

/// A subscription of `topic` with the standard-webhooks test secret and default policies.
fn subscription(id: &str, endpoint: &str, topic: &str) -> Subscription {
    Subscription {
        id: id.into(),
        endpoint: endpoint.into(),
        topics: vec![topic.into()],
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        retry_policy: RetryPolicy::default(),
        on_exhausted: OnExhausted::DeadLetter,
        created_at: 0,
        control: Default::default(),
        previous_secret: None,
        pacing: Default::default(),
        filter: None,
    }
}

/// Building one signed attempt (headers, signature, body): done for every delivery.
fn delivery_request(criterion: &mut Criterion) {
    let subscription = subscription(
        "sub_01a2210f7dc640c5644924600a0e",
        "http://127.0.0.1:9/hook",
        "fin:purchase",
    );
    let key = signing::decode_secret(&subscription.secret).unwrap();
    let delivery = PendingDelivery {
        partition: PartitionKey::new("fin:purchase", &subscription.id),
        event: Event {
            id: "evt_01a2210f7dd2760f377bcaca7d4f".into(),
            topic: "fin:purchase".into(),
            sequence: 1_795_850_993_106_281,
            payload: vec![b'x'; 1024],
            content_type: "application/json".into(),
            attributes: BTreeMap::new(),
            published_at: 1_795_850_993_106,
            trace: None,
        },
        state: DeliveryState {
            attempts: 0,
            next_attempt_at: 0,
            dead_lettered: false,
        },
        last_error: None,
        previous_sequence: 1_795_850_993_106_280,
        redelivery: None,
    };
    let uri: http::Uri = subscription.endpoint.parse().unwrap();
    criterion.bench_function("delivery request 1 KiB", |bencher| {
        bencher.iter(|| {
            webhook::request(
                black_box(&uri),
                &subscription,
                &key,
                black_box(&delivery),
                1_795_850_993_106,
            )
            .unwrap()
        })
    });
}

fn encoding(criterion: &mut Criterion) {
    let partition = PartitionKey::new("fin:purchase", "sub_01a2210f7dc640c5644924600a0e");
    criterion.bench_function("partition key encode", |bencher| {
        bencher.iter(|| black_box(&partition).encode())
    });
    let event = Event {
        id: "evt_01a2210f7dd2760f377bcaca7d4f".into(),
        topic: "fin:purchase".into(),
        sequence: 1_795_850_993_106_281,
        payload: vec![b'x'; 1024],
        content_type: "application/json".into(),
        attributes: BTreeMap::from([("source".to_string(), "checkout".to_string())]),
        published_at: 1_795_850_993_106,
        trace: None,
    };
    criterion.bench_function("event record encode 1 KiB", |bencher| {
        bencher.iter(|| records::encode_event(black_box(&event)))
    });
    let encoded = records::encode_event(&event);
    criterion.bench_function("event record decode 1 KiB", |bencher| {
        bencher.iter(|| records::decode_event("fin:purchase", 1, black_box(&encoded)).unwrap())
    });
    // Written for every delivery of every event, read when it is sent and when it completes.
    let delivery = records::DeliveryRecord::new(1_795_850_993_106, 1_795_850_993_106_280);
    criterion.bench_function("delivery record encode", |bencher| {
        bencher.iter(|| black_box(&delivery).encode())
    });
    let encoded = delivery.encode();
    criterion.bench_function("delivery record decode", |bencher| {
        bencher.iter(|| records::DeliveryRecord::decode(black_box(&encoded)).unwrap())
    });
}

fn store(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let subscription = subscription("sub_1", "http://127.0.0.1:9/", "t");
    runtime
        .block_on(
            store.create_subscription(&subscription, &herald::store::SubscriptionLimits::NONE),
        )
        .unwrap();
    let event = NewEvent {
        id: "evt_1".into(),
        topic: "t".into(),
        payload: vec![b'x'; 1024],
        content_type: "application/json".into(),
        idempotency_key: None,
        attributes: BTreeMap::new(),
        trace: None,
    };
    let day = Duration::from_secs(86400);
    let mut group = criterion.benchmark_group("embedded store");
    group.sample_size(20);
    group.bench_function("append: one durable publish, fan-out 1", |bencher| {
        bencher.iter(|| runtime.block_on(store.publish(&event, day)).unwrap())
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function(
        "append: 64 concurrent durable publishes (group commit)",
        |bencher| {
            bencher.iter(|| {
                runtime.block_on(async {
                    let tasks: Vec<_> = (0..64)
                        .map(|_| {
                            let store = store.clone();
                            let event = event.clone();
                            tokio::spawn(async move { store.publish(&event, day).await.unwrap() })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                })
            })
        },
    );
    let partition = PartitionKey::new("t", "sub_1");
    group.bench_function(
        "drain: read a page of 64 from the partition head",
        |bencher| {
            bencher.iter(|| {
                runtime
                    .block_on(store.next_deliveries(&partition, 64))
                    .unwrap()
            })
        },
    );
    // Completing a partition's batch of 16: one write per delivery (as on a shared store)
    // against one write for the batch (the embedded store's worker).
    let publish_16 = || {
        runtime.block_on(async {
            let mut sequences = Vec::new();
            for _ in 0..16 {
                sequences.push(store.publish(&event, day).await.unwrap().sequence);
            }
            sequences
        })
    };
    group.throughput(Throughput::Elements(16));
    group.bench_function("complete: 16 deliveries one by one", |bencher| {
        bencher.iter_batched(
            publish_16,
            |sequences| {
                runtime.block_on(async {
                    for sequence in sequences {
                        store
                            .complete_delivery(&partition, sequence, None)
                            .await
                            .unwrap();
                    }
                })
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.bench_function("complete: 16 deliveries in one call", |bencher| {
        bencher.iter_batched(
            publish_16,
            |sequences| {
                runtime
                    .block_on(store.complete_deliveries(&partition, &sequences, None))
                    .unwrap()
            },
            criterion::BatchSize::PerIteration,
        )
    });
    // Recording a failed attempt: one that schedules a retry is committed lazily, one that
    // dead-letters is synced before it returns (the partition's next event is sent after it).
    let publish_1 = || {
        runtime
            .block_on(store.publish(&event, day))
            .unwrap()
            .sequence
    };
    for (name, outcome) in [
        (
            "fail: retry later (lazy)",
            FailureOutcome::RetryAt(u64::MAX / 2),
        ),
        ("fail: dead-letter (synced)", FailureOutcome::DeadLetter),
    ] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(name, |bencher| {
            bencher.iter_batched(
                publish_1,
                |sequence| {
                    runtime
                        .block_on(
                            store
                                .record_failure(&partition, sequence, 1, "HTTP 500", outcome, None),
                        )
                        .unwrap()
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, signing, delivery_request, encoding, store);
criterion_main!(benches);
