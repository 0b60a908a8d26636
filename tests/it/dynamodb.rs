//! DynamoDB only: several instances on one table, a publisher failing halfway through a large
//! fan-out, an outage, and the request cost per event.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use herald::model::{FailureOutcome, NewEvent, PartitionKey, now_millis};
use herald::proto;
use herald::store::{
    DeliveryLog, DynamoStore, PartitionLeases, Store, StoreError, SubscriptionStore,
};
use tonic::Code;

use crate::support::dynamo::{self, PrivateServer};
use crate::support::receiver::Received;
use crate::support::{
    Backend, Deployment, HeraldProcess, Receiver, Reply, all_pending, connect, eventually,
    publish_request, spawn_app_with_store, subscribe_request,
};

/// Asserts per topic: first deliveries in increasing sequence order, chain without holes.
fn assert_chain(delivered: &[Received]) -> BTreeMap<String, Vec<u64>> {
    let mut seen = HashSet::new();
    let mut chains: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for received in delivered {
        if !seen.insert((received.path.clone(), received.id.clone())) {
            continue;
        }
        let chain = chains
            .entry(format!("{} {}", received.path, received.topic))
            .or_default();
        let last = chain.last().copied().unwrap_or(0);
        assert_eq!(
            received.previous, last,
            "hole before {} on {}",
            received.sequence, received.path
        );
        assert!(received.sequence > last);
        chain.push(received.sequence);
    }
    chains
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_publishing_to_one_topic_keep_every_subscriber_in_order() {
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let first = HeraldProcess::start(&deployment).await;
    let second = HeraldProcess::start(&deployment).await;
    let receivers = [Receiver::start().await, Receiver::start().await];
    let mut client = connect(first.address).await;
    for receiver in &receivers {
        client
            .subscribe(subscribe_request(&receiver.url(), &["orders:*"]))
            .await
            .unwrap();
    }
    // 4 publishers on each instance, all on the same two topics at once.
    let mut publishers = Vec::new();
    for publisher in 0..8 {
        let address = if publisher % 2 == 0 {
            first.address
        } else {
            second.address
        };
        let mut client = connect(address).await;
        publishers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for index in 0..40 {
                let topic = if index % 2 == 0 {
                    "orders:eu"
                } else {
                    "orders:us"
                };
                let response = client
                    .publish(publish_request(topic, format!("{publisher}-{index}")))
                    .await
                    .unwrap()
                    .into_inner();
                acknowledged.push((topic, response.sequence, response.event_id));
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.unwrap());
    }
    let unique: HashSet<(&str, u64)> = acknowledged
        .iter()
        .map(|(topic, sequence, _)| (*topic, *sequence))
        .collect();
    assert_eq!(
        unique.len(),
        320,
        "sequences are unique per topic across instances"
    );
    let wanted: HashSet<String> = acknowledged.iter().map(|(_, _, id)| id.clone()).collect();
    for receiver in &receivers {
        eventually(
            Duration::from_secs(60),
            "every event at every subscriber",
            || async {
                let got: HashSet<String> = receiver
                    .delivered()
                    .into_iter()
                    .map(|received| received.id)
                    .collect();
                wanted.is_subset(&got)
            },
        )
        .await;
        let chains = assert_chain(&receiver.delivered());
        let total: usize = chains.values().map(Vec::len).sum();
        assert_eq!(total, 320);
    }
    first.kill_9().await;
    second.kill_9().await;
}

#[cfg(feature = "fault-injection")]
/// A server on its own DynamoStore (repair delay 1 s, fault injection at hand) with 150
/// subscriptions to topic `big`: more than one transaction can hold.
async fn large_fan_out() -> (crate::support::TestApp, Arc<DynamoStore>, Receiver) {
    large_fan_out_filtered(|_| None).await
}

/// [`large_fan_out`] with a filter for some of the subscriptions (by index).
#[cfg(feature = "fault-injection")]
async fn large_fan_out_filtered(
    filter: impl Fn(usize) -> Option<&'static str>,
) -> (crate::support::TestApp, Arc<DynamoStore>, Receiver) {
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let config = deployment.config();
    let store = Arc::new(
        DynamoStore::new(
            dynamo::client(deployment.endpoint.as_deref().unwrap()),
            deployment.table.as_deref().unwrap(),
        )
        .with_repair_after(Duration::from_secs(1)),
    );
    let app = spawn_app_with_store(deployment, config, store.clone() as Arc<dyn Store>).await;
    let receiver = Receiver::start().await;
    let mut client = app.client().await;
    for index in 0..150 {
        let url = format!("http://{}/hook/{index}", receiver.address);
        let mut request = subscribe_request(&url, &["big"]);
        request.filter = filter(index).unwrap_or_default().to_string();
        client.subscribe(request).await.unwrap();
    }
    (app, store, receiver)
}

/// The same with every other subscription filtered: the repair of a fan-out left half-done
/// writes the filtered subscriptions' deliveries from the event's list, with their own
/// links, and recomputes the others; an event the filter refuses leaves no hole.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repaired_fan_out_keeps_filtered_chains_whole() {
    let (app, store, receiver) =
        large_fan_out_filtered(|index| (index % 2 == 1).then_some("!has(attributes.skip)")).await;
    let mut client = app.client().await;
    client.publish(publish_request("big", "one")).await.unwrap();
    store.inject_fanout_failure();
    let status = client
        .publish(publish_request("big", "two"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut skipped = publish_request("big", "three");
    skipped.attributes.insert("skip".into(), "yes".into());
    let three = client.publish(skipped).await.unwrap().into_inner();
    assert_eq!(three.subscription_count, 75);
    client
        .publish(publish_request("big", "four"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(90),
        "every event at every subscriber that takes it",
        || async {
            let distinct: HashSet<(String, String)> = receiver
                .delivered()
                .into_iter()
                .map(|received| (received.path, received.id))
                .collect();
            distinct.len() >= 75 * 4 + 75 * 3
        },
    )
    .await;
    assert!(store.fanouts_repaired() >= 1);
    let chains = assert_chain(&receiver.delivered());
    assert_eq!(chains.len(), 150);
    for (path, chain) in chains {
        let index: usize = path
            .split(' ')
            .next()
            .and_then(|path| path.rsplit('/').next())
            .and_then(|index| index.parse().ok())
            .unwrap();
        assert_eq!(chain.len(), if index % 2 == 1 { 3 } else { 4 }, "{path}");
    }
    app.stop().await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publisher_failing_halfway_through_a_large_fan_out_breaks_no_order() {
    let (app, store, receiver) = large_fan_out().await;
    let mut client = app.client().await;
    let first = client
        .publish(publish_request("big", "one"))
        .await
        .unwrap()
        .into_inner();
    store.inject_fanout_failure();
    let status = client
        .publish(publish_request("big", "two"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let third = client
        .publish(publish_request("big", "three"))
        .await
        .unwrap()
        .into_inner();
    assert!(third.sequence > first.sequence);

    // The half-written event is finished by the store (roll-forward) and every subscriber
    // gets all three, in order: nothing after it overtook it.
    // Distinct (subscriber, event) pairs: repeats (at-least-once) do not count.
    eventually(
        Duration::from_secs(90),
        "all three events at all 150 subscribers",
        || async {
            let distinct: HashSet<(String, String)> = receiver
                .delivered()
                .into_iter()
                .map(|received| (received.path, received.id))
                .collect();
            distinct.len() >= 450
        },
    )
    .await;
    assert!(store.fanouts_repaired() >= 1);
    let chains = assert_chain(&receiver.delivered());
    assert_eq!(chains.len(), 150);
    let bodies: BTreeMap<String, Vec<String>> =
        receiver
            .delivered()
            .iter()
            .fold(BTreeMap::new(), |mut bodies, received| {
                let body = String::from_utf8(received.body.to_vec()).unwrap();
                let path: &mut Vec<String> = bodies.entry(received.path.clone()).or_default();
                // A repeat right after the first delivery is at-least-once, not disorder.
                if path.last() != Some(&body) {
                    path.push(body);
                }
                bodies
            });
    for (path, bodies) in bodies {
        assert_eq!(bodies, ["one", "two", "three"], "{path}");
    }
    app.stop().await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repaired_fan_out_is_delivered_without_a_later_publish() {
    let (app, store, receiver) = large_fan_out().await;
    let mut client = app.client().await;
    store.inject_fanout_failure();
    let status = client
        .publish(publish_request("big", "half"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Nothing else is published: the deliveries the repair writes must still be found.
    eventually(
        Duration::from_secs(90),
        "the half-written event at all 150 subscribers",
        || async {
            let distinct: HashSet<String> = receiver
                .delivered()
                .into_iter()
                .map(|received| received.path)
                .collect();
            distinct.len() >= 150
        },
    )
    .await;
    assert!(store.fanouts_repaired() >= 1);
    app.stop().await;
}

/// Items under one partition key of the table.
#[cfg(feature = "fault-injection")]
async fn count_items(endpoint: &str, table: &str, pk: &str) -> usize {
    dynamo::client(endpoint)
        .query()
        .table_name(table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(
            ":pk",
            aws_sdk_dynamodb::types::AttributeValue::S(pk.to_string()),
        )
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .count as usize
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unsubscribe_interrupted_halfway_is_finished_by_a_retry_or_the_sweep() {
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let endpoint = deployment.endpoint.clone().unwrap();
    let table = deployment.table.clone().unwrap();
    let config = deployment.config();
    let store = Arc::new(DynamoStore::new(dynamo::client(&endpoint), &table));
    let app = spawn_app_with_store(deployment, config, store.clone() as Arc<dyn Store>).await;
    // The receiver is down: every event stays pending.
    let receiver = Receiver::scripted(|_| Reply::Status(503)).await;
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let subscription = client
            .subscribe(subscribe_request(&receiver.url(), &["t"]))
            .await
            .unwrap()
            .into_inner();
        ids.push(subscription.id);
    }
    for index in 0..20 {
        client
            .publish(publish_request("t", format!("{index}")))
            .await
            .unwrap();
    }
    let backlog = |id: &str| {
        let (endpoint, table) = (endpoint.clone(), table.clone());
        let pk = PartitionKey::new("t", id).encode();
        async move { count_items(&endpoint, &table, &pk).await }
    };
    assert_eq!(backlog(&ids[0]).await, 20);
    for id in &ids {
        store.inject_unsubscribe_failure();
        let status = client
            .unsubscribe(proto::UnsubscribeRequest { id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("is deleted"), "{status:?}");
        assert!(
            !status.message().contains("nothing was written"),
            "{status:?}"
        );
        let status = client
            .get_subscription(proto::GetSubscriptionRequest { id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    // The first is retried: the retry finishes it and says how much it removed (the sweep,
    // running every rescan, may have removed some of the 20 first). Like the first call, it
    // returns only once the subscription-set copies read before the deletion have expired.
    let retried_at = std::time::Instant::now();
    let retried = client
        .unsubscribe(proto::UnsubscribeRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(retried_at.elapsed() >= dynamo::TEST_CACHE_VALIDITY);
    assert!(retried.dropped_deliveries <= 20, "{retried:?}");
    assert_eq!(backlog(&ids[0]).await, 0);
    // The second is left alone: the rescan's sweep finishes it.
    eventually(
        Duration::from_secs(15),
        "the sweep removes the rest",
        || async { backlog(&ids[1]).await == 0 },
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "tombstones and events are gone",
        || async {
            count_items(&endpoint, &table, "UNSUBSCRIBING").await == 0
                && count_items(&endpoint, &table, "EVENT#t").await == 0
        },
    )
    .await;
    let status = client
        .unsubscribe(proto::UnsubscribeRequest { id: ids[1].clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_fails_publishes_with_unavailable_and_delivery_resumes_after_it() {
    let mut server = PrivateServer::start();
    let endpoint = server.endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let deployment = Deployment {
        backend: Backend::Dynamodb,
        data_dir: tempfile::tempdir().unwrap(),
        endpoint: Some(endpoint.clone()),
        table: Some(table.clone()),

        partition_lease: crate::support::TEST_LEASE,
    };
    let config = deployment.config();
    let store: Arc<dyn Store> = Arc::new(DynamoStore::new(dynamo::client(&endpoint), &table));
    let app = spawn_app_with_store(deployment, config, store).await;
    let receiver = Receiver::start().await;
    let mut client = app.client().await;
    let subscription = client
        .subscribe(subscribe_request(&receiver.url(), &["t"]))
        .await
        .unwrap()
        .into_inner();
    let before = client
        .publish(publish_request("t", "before"))
        .await
        .unwrap()
        .into_inner();
    eventually(
        Duration::from_secs(10),
        "first event delivered and recorded",
        || {
            let mut client = client.clone();
            let id = subscription.id.clone();
            let receiver = receiver.clone();
            async move {
                receiver.delivered_count() == 1 && all_pending(&mut client, &id).await.is_empty()
            }
        },
    )
    .await;

    // A Watch stream sees the same flips as Check, without polling.
    let watched = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut stream = {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.address))
            .unwrap()
            .connect()
            .await
            .unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "herald.v1.BrokerService".into(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let watcher = tokio::spawn({
        let watched = watched.clone();
        async move {
            while let Ok(Some(update)) = stream.message().await {
                watched.lock().unwrap().push(update.status);
            }
        }
    });
    eventually(
        Duration::from_secs(10),
        "the watch starts with SERVING",
        || async {
            watched.lock().unwrap().first().copied()
                == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
        },
    )
    .await;

    server.stop();
    let status = client
        .publish(publish_request("t", "during"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("store unavailable"),
        "{}",
        status.message()
    );
    let status = client
        .list_pending(proto::ListPendingRequest {
            subscription_id: "sub_x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // Health follows: NOT_SERVING while the table cannot be reached, SERVING once it answers
    // again (the store probes it; no traffic is needed).
    let serving = |app_address: std::net::SocketAddr| async move {
        use tonic_health::pb::health_check_response::ServingStatus;
        let channel = tonic::transport::Channel::from_shared(format!("http://{app_address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: "herald.v1.BrokerService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        status == ServingStatus::Serving as i32
    };
    eventually(
        Duration::from_secs(30),
        "health reports NOT_SERVING",
        || async { !serving(app.address).await },
    )
    .await;

    server.resume();
    eventually(
        Duration::from_secs(30),
        "health reports SERVING again",
        || async { serving(app.address).await },
    )
    .await;
    {
        use tonic_health::pb::health_check_response::ServingStatus;
        eventually(
            Duration::from_secs(10),
            "the watch saw SERVING, NOT_SERVING, SERVING",
            || async {
                let seen = watched.lock().unwrap().clone();
                let not_serving = seen
                    .iter()
                    .position(|status| *status == ServingStatus::NotServing as i32);
                not_serving.is_some_and(|at| seen[at..].contains(&(ServingStatus::Serving as i32)))
            },
        )
        .await;
    }
    watcher.abort();
    let after = client
        .publish(publish_request("t", "after"))
        .await
        .unwrap()
        .into_inner();
    eventually(Duration::from_secs(20), "delivery resumes", || async {
        receiver.delivered_count() >= 2
    })
    .await;
    let delivered = receiver.delivered();
    assert_eq!(delivered[1].sequence, after.sequence);
    // The failed publish left nothing behind: the chain goes straight from before to after.
    assert_eq!(delivered[1].previous, before.sequence);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_publish_and_per_delivery_do_not_grow_with_the_table() {
    let (store, _table) = dynamo::fresh_store().await;
    let counts = store.request_counters();
    for index in 0..10 {
        let subscription = plain_subscription(&format!("sub_{index}"), "t");
        store
            .create_subscription(&subscription, &herald::store::SubscriptionLimits::NONE)
            .await
            .unwrap();
    }
    let event = |index: usize| NewEvent {
        id: format!("evt_{index}"),
        topic: "t".into(),
        payload: vec![b'x'; 1024],
        content_type: "application/json".into(),
        idempotency_key: None,
        attributes: Default::default(),
        trace: None,
    };
    let day = Duration::from_secs(86400);
    store.publish(&event(0), day).await.unwrap();

    let transactions = || {
        counts
            .snapshot()
            .get("TransactWriteItems")
            .copied()
            .unwrap_or(0)
    };
    // Besides its own requests, a caller reads the version item each time its subscription-set
    // copy has expired (300 ms on test tables): at most once per expiry, however slow the shared
    // server is, so the requests a run of calls may add depend on how long it took.
    let expiries =
        |took: Duration| (took.as_millis() / dynamo::TEST_CACHE_VALIDITY.as_millis()) as u64 + 1;
    let mut per_publish = Vec::new();
    for round in 0..3 {
        // The table grows by 1,000 deliveries a round; the cost per publish must not.
        let (before, before_transactions) = (counts.total(), transactions());
        let started = std::time::Instant::now();
        for index in 0..100 {
            store
                .publish(&event(1 + round * 100 + index), day)
                .await
                .unwrap();
        }
        let (all, transactions) = (
            counts.total() - before,
            transactions() - before_transactions,
        );
        per_publish.push((all as f64 / 100.0, transactions as f64 / 100.0));
        // One transaction each, and nothing else but the version reads.
        assert_eq!(transactions, 100, "round {round}");
        assert!(
            all - transactions <= expiries(started.elapsed()),
            "round {round}: {} requests besides the transactions in {:?}",
            all - transactions,
            started.elapsed()
        );
    }
    println!(
        "DynamoDB requests per publish (fan-out 10), all and transactions, by round: \
         {per_publish:?}; {:?}",
        counts.snapshot()
    );

    // Drain one partition as the worker does: pages of 16 (its batch), then one fenced write
    // per delivery. This partition never holds an event's last reference (nine others do),
    // which would cost a second transaction for that delivery.
    let partition = PartitionKey::new("t", "sub_3");
    let token = store
        .claim(&partition, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("granted");
    let before = counts.total();
    let started = std::time::Instant::now();
    let (mut delivered, mut pages) = (0, 0);
    loop {
        let page = store.next_deliveries(&partition, 16).await.unwrap();
        pages += 1;
        if page.is_empty() {
            break;
        }
        for delivery in page {
            store
                .complete_delivery(&partition, delivery.event.sequence, Some(&token))
                .await
                .unwrap();
            delivered += 1;
        }
    }
    assert_eq!(delivered, 301);
    let requests = counts.total() - before;
    println!(
        "DynamoDB requests per delivered event (store calls, pages of 16, fenced): {:.3}",
        requests as f64 / delivered as f64
    );
    // A page costs a GetItem of the topic, a Query and a BatchGetItem (3/16 per delivery), a
    // delivery one fenced write; besides, the version reads.
    let most = delivered + 3 * pages + expiries(started.elapsed());
    assert!(
        requests <= most,
        "{requests} requests for {delivered} deliveries in {pages} pages (at most {most})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_slower_than_the_lease_keeps_its_partition() {
    // The test deployment's lease is 2 s; the first attempt of "slow" takes 3 s to answer.
    let deployment = Deployment::new(Backend::Dynamodb).await;
    let first = HeraldProcess::start(&deployment).await;
    let second = HeraldProcess::start(&deployment).await;
    let receiver = Receiver::scripted(|received| {
        if received.body.as_ref() == b"slow" && received.attempt == 1 {
            Reply::Slow(3000)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut client = connect(first.address).await;
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    request.retry_policy.as_mut().unwrap().request_timeout = Some(crate::support::millis(10_000));
    client.subscribe(request).await.unwrap();
    client.publish(publish_request("t", "slow")).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the slow delivery is in flight",
        || async { !receiver.received().is_empty() },
    )
    .await;
    // Publishing through the other instance wakes its worker on the same partition.
    let mut other = connect(second.address).await;
    for index in 0..3 {
        other
            .publish(publish_request("t", format!("{index}")))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(30), "all four delivered", || async {
        receiver.delivered_count() >= 4
    })
    .await;
    let received = receiver.received();
    let slow = &received[0];
    assert_eq!(slow.body.as_ref(), b"slow");
    let answered = slow.at + Duration::from_millis(3000);
    for later in &received[1..] {
        assert!(
            later.at >= answered,
            "{:?} was sent {:?} before the slow delivery was answered",
            String::from_utf8_lossy(&later.body),
            answered - later.at
        );
    }
    let bodies: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|received| String::from_utf8(received.body.to_vec()).unwrap())
        .collect();
    assert_eq!(bodies, ["slow", "0", "1", "2"]);
    assert_chain(&receiver.delivered());
    first.kill_9().await;
    second.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rescan_probes_changed_topics_and_partitions_whose_lease_ran_out() {
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let holder = DynamoStore::new(dynamo::client(&endpoint), &table);
    let scanner = DynamoStore::new(dynamo::client(&endpoint), &table);
    let mut subscription = plain_subscription("sub_1", "quiet");
    subscription.topics.push("busy".into());
    holder
        .create_subscription(&subscription, &herald::store::SubscriptionLimits::NONE)
        .await
        .unwrap();
    let event = |id: &str, topic: &str| NewEvent {
        id: id.into(),
        topic: topic.into(),
        payload: b"{}".to_vec(),
        content_type: "application/json".into(),
        idempotency_key: None,
        attributes: Default::default(),
        trace: None,
    };
    let day = Duration::from_secs(86400);
    let quiet = PartitionKey::new("quiet", "sub_1");
    let busy = PartitionKey::new("busy", "sub_1");
    holder.publish(&event("evt_1", "quiet"), day).await.unwrap();

    // The first rescan probes everything.
    assert_eq!(
        scanner.pending_partitions().await.unwrap(),
        std::slice::from_ref(&quiet)
    );
    // An instance claims the quiet partition (and, say, dies without releasing it).
    let lease = Duration::from_secs(3);
    // Before the call: the lease runs from when the store took the claim, at the earliest now.
    let claimed = std::time::Instant::now();
    let first = holder.claim(&quiet, lease).await.unwrap().expect("granted");
    assert_eq!(scanner.claim(&quiet, lease).await.unwrap(), None);
    // Nothing changed and the lease is live: nothing to take over.
    assert!(scanner.pending_partitions().await.unwrap().is_empty());
    // A publish is found through its topic's new sequence.
    holder.publish(&event("evt_2", "busy"), day).await.unwrap();
    assert_eq!(
        scanner.pending_partitions().await.unwrap(),
        std::slice::from_ref(&busy)
    );
    // Once the lease runs out, the quiet partition is found again, without any publish.
    eventually(
        Duration::from_secs(15),
        "the expired lease is found",
        || async { scanner.pending_partitions().await.unwrap().contains(&quiet) },
    )
    .await;
    assert!(claimed.elapsed() >= lease);
    let second = scanner
        .claim(&quiet, lease)
        .await
        .unwrap()
        .expect("granted");
    assert_ne!(first, second);

    // The first holder wakes up: its token is fenced off everywhere.
    assert!(!holder.renew(&quiet, &first, lease).await.unwrap());
    let sequence = holder.next_deliveries(&quiet, 1).await.unwrap()[0]
        .event
        .sequence;
    assert!(matches!(
        holder
            .complete_delivery(&quiet, sequence, Some(&first))
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(matches!(
        holder
            .record_failure(
                &quiet,
                sequence,
                1,
                "late",
                FailureOutcome::DeadLetter,
                Some(&first)
            )
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    holder.release(&quiet, &first, false).await.unwrap();
    assert_eq!(holder.claim(&quiet, lease).await.unwrap(), None);
    assert_eq!(holder.next_deliveries(&quiet, 5).await.unwrap().len(), 1);

    // The new holder stops with work left: it hands over, and the rescan finds it at once.
    assert!(scanner.renew(&quiet, &second, lease).await.unwrap());
    scanner.release(&quiet, &second, true).await.unwrap();
    assert!(scanner.pending_partitions().await.unwrap().contains(&quiet));
    let third = holder.claim(&quiet, lease).await.unwrap().expect("granted");
    holder
        .record_failure(
            &quiet,
            sequence,
            1,
            "HTTP 500",
            FailureOutcome::RetryAt(now_millis()),
            Some(&third),
        )
        .await
        .unwrap();
    holder
        .complete_delivery(&quiet, sequence, Some(&third))
        .await
        .unwrap();
    // Nothing left: released for good, and no longer found.
    holder.release(&quiet, &third, false).await.unwrap();
    assert!(!scanner.pending_partitions().await.unwrap().contains(&quiet));

    // A partition with a live lease is its holder's to read: a publish on its topic does not
    // make the rescan probe it. Once the holder lets go (here right after that publish, which
    // it did not see), a later rescan probes it although nothing was published since.
    let held = holder.claim(&busy, day).await.unwrap().expect("granted");
    holder.publish(&event("evt_3", "busy"), day).await.unwrap();
    assert!(!scanner.pending_partitions().await.unwrap().contains(&busy));
    assert!(!scanner.pending_partitions().await.unwrap().contains(&busy));
    holder.release(&busy, &held, false).await.unwrap();
    assert!(scanner.pending_partitions().await.unwrap().contains(&busy));
}

fn plain_subscription(id: &str, topic: &str) -> herald::model::Subscription {
    herald::model::Subscription {
        id: id.to_string(),
        endpoint: "http://127.0.0.1:9/".into(),
        topics: vec![topic.to_string()],
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        retry_policy: Default::default(),
        on_exhausted: herald::model::OnExhausted::DeadLetter,
        created_at: now_millis(),
        control: Default::default(),
        previous_secret: None,
        pacing: Default::default(),
        filter: None,
    }
}

fn small_event(id: String, topic: &str) -> NewEvent {
    NewEvent {
        id,
        topic: topic.to_string(),
        payload: vec![b'x'; 256],
        content_type: "application/json".into(),
        idempotency_key: None,
        attributes: Default::default(),
        trace: None,
    }
}

/// Subscribe on instance A, then publish on instance B at once: the publish reaches the new
/// subscription, although B publishes all along (so it always holds a recent copy of the
/// subscription set, read before the Subscribe). Unsubscribe on A likewise: B's next publish
/// no longer reaches it. No publish transaction reads a table-wide item; this holds because
/// Subscribe and Unsubscribe return only once every copy read before them has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_change_on_one_instance_holds_for_the_next_publish_on_another() {
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let a = DynamoStore::new(dynamo::client(&endpoint), &table);
    let b = Arc::new(DynamoStore::new(dynamo::client(&endpoint), &table));
    let day = Duration::from_secs(86400);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let (b, stop) = (b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut index = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                b.publish(&small_event(format!("evt_bg_{index}"), "t"), day)
                    .await
                    .unwrap();
                index += 1;
            }
            index
        })
    };
    for round in 0..5 {
        let subscription = plain_subscription(&format!("sub_{round}"), "t");
        let partition = PartitionKey::new("t", subscription.id.as_str());
        a.create_subscription(&subscription, &herald::store::SubscriptionLimits::NONE)
            .await
            .unwrap();
        let published = b
            .publish(&small_event(format!("evt_after_sub_{round}"), "t"), day)
            .await
            .unwrap();
        assert!(
            published.partitions.contains(&partition),
            "round {round}: the publish right after Subscribe missed it: {published:?}"
        );
        a.delete_subscription(&subscription.id).await.unwrap();
        let published = b
            .publish(&small_event(format!("evt_after_unsub_{round}"), "t"), day)
            .await
            .unwrap();
        assert!(
            !published.partitions.contains(&partition),
            "round {round}: the publish right after Unsubscribe still reached it"
        );
        assert!(a.next_deliveries(&partition, 10).await.unwrap().is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let background_publishes = background.await.unwrap();
    assert!(background_publishes > 10, "{background_publishes}");
}

/// 64 publishers on 10 topics at once on one instance: publishes on one topic share
/// transactions (group commit), so the whole run costs at most 1.2 requests per publish,
/// reads included (the target; 7.26 before group commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_on_a_topic_share_transactions() {
    let (store, _table) = dynamo::fresh_store().await;
    let store = Arc::new(store);
    for topic in 0..10 {
        store
            .create_subscription(
                &plain_subscription(&format!("sub_{topic}"), &format!("t{topic}")),
                &herald::store::SubscriptionLimits::NONE,
            )
            .await
            .unwrap();
    }
    let counts = store.request_counters();
    let before = counts.total();
    let mut publishers = tokio::task::JoinSet::new();
    for publisher in 0..64 {
        let store = store.clone();
        publishers.spawn(async move {
            let topic = format!("t{}", publisher % 10);
            let mut sequences = Vec::new();
            for index in 0..20 {
                let event = small_event(format!("evt_{publisher}_{index}"), &topic);
                let published = store
                    .publish(&event, Duration::from_secs(86400))
                    .await
                    .unwrap();
                sequences.push((topic.clone(), published.sequence));
            }
            sequences
        });
    }
    let mut sequences = Vec::new();
    while let Some(published) = publishers.join_next().await {
        let published = published.unwrap();
        // One publisher's events are in its order.
        assert!(published.windows(2).all(|pair| pair[0].1 < pair[1].1));
        sequences.extend(published);
    }
    let per_publish = (counts.total() - before) as f64 / 1280.0;
    println!(
        "DynamoDB requests per publish, 64 publishers on 10 topics: {per_publish:.3}; {:?}",
        counts.snapshot()
    );
    let unique: HashSet<(String, u64)> = sequences.iter().cloned().collect();
    assert_eq!(unique.len(), 1280, "sequences are unique per topic");
    assert!(per_publish <= 1.2, "{per_publish}");
    // Each subscription's partition holds its topic's events, chained.
    for topic in 0..10 {
        let partition = PartitionKey::new(format!("t{topic}"), format!("sub_{topic}"));
        let mut previous = 0;
        let mut count = 0;
        loop {
            let page = store.next_deliveries(&partition, 100).await.unwrap();
            if page.is_empty() {
                break;
            }
            for delivery in page {
                assert_eq!(delivery.previous_sequence, previous, "{partition}");
                previous = delivery.event.sequence;
                count += 1;
                store
                    .complete_delivery(&partition, previous, None)
                    .await
                    .unwrap();
            }
        }
        let published = sequences
            .iter()
            .filter(|(published_on, _)| *published_on == partition.topic)
            .count();
        assert_eq!(count, published, "{partition}");
    }
}

/// An event too large for a DynamoDB item (the largest payload DynamoDB deployments accept
/// plus the largest attributes) is refused as INVALID_ARGUMENT at once, never retried as
/// contention; publishes committed in the same batch are unaffected and nothing of it is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_too_large_for_an_item_is_refused_as_invalid_and_others_commit() {
    let (store, _table) = dynamo::fresh_store().await;
    let store = Arc::new(store);
    store
        .create_subscription(
            &plain_subscription("sub_1", "t"),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    let mut oversized = small_event("evt_oversized".into(), "t");
    oversized.payload = vec![b'p'; 358_400];
    oversized.attributes = (0..herald::validate::MAX_ATTRIBUTES)
        .map(|index| (format!("{index:0128}"), "v".repeat(1024)))
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for index in 0..6 {
        let event = if index == 3 {
            oversized.clone()
        } else {
            small_event(format!("evt_{index}"), "t")
        };
        let store = store.clone();
        calls.spawn(async move {
            let started = std::time::Instant::now();
            let outcome = store.publish(&event, Duration::from_secs(60)).await;
            (event.id, outcome, started.elapsed())
        });
    }
    let mut committed = Vec::new();
    while let Some(call) = calls.join_next().await {
        let (id, outcome, took) = call.unwrap();
        if id == "evt_oversized" {
            match outcome {
                Err(StoreError::InvalidArgument(message)) => {
                    assert!(message.contains("evt_oversized"), "{message}")
                }
                other => panic!("the oversized event: {other:?}"),
            }
            assert!(took < Duration::from_secs(10), "not retried: {took:?}");
        } else {
            committed.push(outcome.unwrap().sequence);
        }
    }
    committed.sort();
    let partition = PartitionKey::new("t", "sub_1");
    let pending: Vec<u64> = store
        .next_deliveries(&partition, 100)
        .await
        .unwrap()
        .iter()
        .map(|delivery| delivery.event.sequence)
        .collect();
    assert_eq!(pending, committed);
}

/// Many callers finding no current copy of the subscription set at once (every partition
/// delivering, right after a change) share one reload: one Query of the subscriptions, not
/// one per caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_of_an_expired_subscription_set_share_one_reload() {
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let writer = DynamoStore::new(dynamo::client(&endpoint), &table);
    for index in 0..5 {
        writer
            .create_subscription(
                &plain_subscription(&format!("sub_{index}"), "t"),
                &herald::store::SubscriptionLimits::NONE,
            )
            .await
            .unwrap();
    }
    // A new instance has no copy: its first readers all find none.
    let reader = Arc::new(DynamoStore::new(dynamo::client(&endpoint), &table));
    let counts = reader.request_counters();
    let mut readers = tokio::task::JoinSet::new();
    for index in 0..50 {
        let reader = reader.clone();
        readers.spawn(async move {
            reader
                .get_subscription(&format!("sub_{}", index % 5))
                .await
                .unwrap()
        });
    }
    while let Some(read) = readers.join_next().await {
        read.unwrap();
    }
    let queries = counts.snapshot().get("Query").copied().unwrap_or(0);
    println!("requests for 50 concurrent reads: {:?}", counts.snapshot());
    // One reload serves every caller that came before it began; a caller that came just after
    // (a loaded machine) may start a second. Without the single flight it was one per caller.
    assert!(queries <= 2, "one reload for all: {:?}", counts.snapshot());
}

/// A skip of a head whose event is still being fanned out is refused (retryable): the fan-out
/// or its repair writes every delivery of the event and would bring the skipped one back.
/// Once the fan-out is finished the skip goes through and stays done, and the event item is
/// gone when the other partitions complete.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipping_a_head_whose_fan_out_is_open_waits_for_the_fan_out() {
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let publisher = Arc::new(
        DynamoStore::new(dynamo::client(&endpoint), &table)
            .with_repair_after(Duration::from_secs(3600)),
    );
    let repairer =
        DynamoStore::new(dynamo::client(&endpoint), &table).with_repair_after(Duration::ZERO);
    // Concurrent Subscribes share commits: 150 cost a few settle times, not 150.
    let ids: Vec<String> = (0..150).map(|index| format!("sub_{index:03}")).collect();
    let mut creates = tokio::task::JoinSet::new();
    for id in &ids {
        let (publisher, subscription) = (publisher.clone(), plain_subscription(id, "big"));
        creates.spawn(async move {
            publisher
                .create_subscription(&subscription, &herald::store::SubscriptionLimits::NONE)
                .await
        });
    }
    while let Some(created) = creates.join_next().await {
        created.unwrap().unwrap();
    }
    publisher.inject_fanout_failure();
    let day = Duration::from_secs(86400);
    let failed = publisher
        .publish(&small_event("evt_half".into(), "big"), day)
        .await;
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    // A partition whose delivery the first transaction wrote.
    let mut written = None;
    for id in &ids {
        let partition = PartitionKey::new("big", id.as_str());
        if count_items(&endpoint, &table, &partition.encode()).await > 0 {
            written = Some(partition);
            break;
        }
    }
    let partition = written.expect("the first transaction wrote some deliveries");
    let sequence = publisher
        .list_pending(&partition.subscription_id, None, false, 10, None)
        .await
        .unwrap()
        .items[0]
        .event
        .sequence;

    let refused = publisher.skip_head(&partition, sequence).await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(message)) if message.contains("fanned out")),
        "{refused:?}"
    );
    // Another instance finishes the fan-out; the skip then goes through and stays done.
    let other = PartitionKey::new("big", ids.last().unwrap().as_str());
    repairer.next_deliveries(&other, 1).await.unwrap();
    publisher.skip_head(&partition, sequence).await.unwrap();
    assert!(
        repairer
            .next_deliveries(&partition, 10)
            .await
            .unwrap()
            .is_empty()
    );
    for id in &ids {
        let partition = PartitionKey::new("big", id.as_str());
        for delivery in repairer.next_deliveries(&partition, 10).await.unwrap() {
            repairer
                .complete_delivery(&partition, delivery.event.sequence, None)
                .await
                .unwrap();
        }
    }
    let dead = repairer
        .list_pending(&partition.subscription_id, None, true, 10, None)
        .await
        .unwrap();
    assert_eq!(dead.items.len(), 1, "the skipped delivery is a dead letter");
}

/// A topic removed from a subscription and added back while the removal is still to be
/// worked off (its first try failed) keeps the events published after it came back, even from
/// a publisher whose clock lags by a minute: the removal takes the deliveries planned before
/// it by the subscription-set version, which the table decides, not by a clock reading.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_added_back_keeps_events_from_a_lagging_publisher() {
    use herald::store::SubscriptionUpdate;
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let updater =
        DynamoStore::new(dynamo::client(&endpoint), &table).with_repair_after(Duration::ZERO);
    let lagging = DynamoStore::new(dynamo::client(&endpoint), &table);
    let day = Duration::from_secs(86400);
    let subscription = plain_subscription("sub_back", "t");
    updater
        .create_subscription(&subscription, &herald::store::SubscriptionLimits::NONE)
        .await
        .unwrap();
    let before = lagging
        .publish(&small_event("evt_before".into(), "t"), day)
        .await
        .unwrap();
    let topics = |topics: &[&str]| -> SubscriptionUpdate {
        let topics: Vec<String> = topics.iter().map(|topic| topic.to_string()).collect();
        Arc::new(move |subscription: &mut herald::model::Subscription| {
            subscription.topics = topics.clone();
            Ok(())
        })
    };
    // The update's own removal fails, and so does the one the next update works off first:
    // the removal record outlives the topic's return.
    updater.inject_removal_failures(2);
    let partial = updater
        .update_subscription("sub_back", topics(&["u"]))
        .await;
    assert!(
        matches!(partial, Err(StoreError::Partial(_))),
        "{partial:?}"
    );
    updater
        .update_subscription("sub_back", topics(&["t", "u"]))
        .await
        .unwrap();
    lagging.inject_clock_skew(-60_000_000);
    let after = lagging
        .publish(&small_event("evt_after".into(), "t"), day)
        .await
        .unwrap();
    let partition = PartitionKey::new("t", "sub_back");
    assert!(after.partitions.contains(&partition), "{after:?}");
    // The sweep works off the removal left behind.
    updater.pending_partitions().await.unwrap();
    let pending: Vec<u64> = updater
        .next_deliveries(&partition, 10)
        .await
        .unwrap()
        .iter()
        .map(|delivery| delivery.event.sequence)
        .collect();
    assert_eq!(
        pending,
        [after.sequence],
        "the event from before the removal goes ({}), the one after it stays",
        before.sequence
    );
}

/// Tracked subscriptions (a filter, or changed topics) keep their chains on the topic item, so
/// a table keeps a bounded number of them: beyond it Subscribe with a filter and an update of
/// topics are refused with a clear error, nothing is written, and the topic stays publishable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracked_subscriptions_are_bounded_so_a_topic_stays_publishable() {
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let store = DynamoStore::new(dynamo::client(&endpoint), &table).with_tracked_limit(3);
    let limits = herald::store::SubscriptionLimits::NONE;
    for index in 0..3 {
        let mut subscription = plain_subscription(&format!("sub_f{index}"), "t");
        subscription.filter = Some("attributes.region == \"eu\"".into());
        store
            .create_subscription(&subscription, &limits)
            .await
            .unwrap();
    }
    let mut fourth = plain_subscription("sub_f3", "t");
    fourth.filter = Some("attributes.region == \"eu\"".into());
    let refused = store.create_subscription(&fourth, &limits).await;
    assert!(
        matches!(&refused, Err(StoreError::LimitReached(message)) if message.contains("filter")),
        "{refused:?}"
    );
    store
        .create_subscription(&plain_subscription("sub_plain", "t"), &limits)
        .await
        .expect("an untracked subscription is still accepted");
    let retarget: herald::store::SubscriptionUpdate =
        Arc::new(|subscription: &mut herald::model::Subscription| {
            subscription.topics = vec!["t".into(), "u".into()];
            Ok(())
        });
    let refused = store.update_subscription("sub_plain", retarget).await;
    assert!(
        matches!(&refused, Err(StoreError::LimitReached(_))),
        "{refused:?}"
    );
    assert_eq!(
        store.get_subscription("sub_plain").await.unwrap().topics,
        ["t"]
    );
    let published = store
        .publish(
            &small_event("evt_t".into(), "t"),
            Duration::from_secs(86400),
        )
        .await
        .unwrap();
    assert!(
        published
            .partitions
            .contains(&PartitionKey::new("t", "sub_plain"))
    );
    assert!(
        store.get_subscription("sub_f3").await.is_err(),
        "nothing written"
    );
}

/// A publish planned with the subscription set from before a topic removal, whose commit lands
/// after the removal has returned (and swept the partition), takes back the delivery it wrote
/// for the subscription that no longer receives the topic: nothing is left for it, and the
/// event goes with its last delivery.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_committed_after_a_topic_removal_takes_its_delivery_back() {
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    let publisher = Arc::new(DynamoStore::new(dynamo::client(&endpoint), &table));
    let updater = DynamoStore::new(dynamo::client(&endpoint), &table);
    let limits = herald::store::SubscriptionLimits::NONE;
    updater
        .create_subscription(&plain_subscription("sub_moving", "t"), &limits)
        .await
        .unwrap();
    // The publisher's copy of the set has the subscription on `t`.
    publisher.get_subscription("sub_moving").await.unwrap();
    publisher.inject_commit_delay(Duration::from_secs(3));
    let publish = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            publisher
                .publish(
                    &small_event("evt_stale".into(), "t"),
                    Duration::from_secs(86400),
                )
                .await
        })
    };
    let to_u: herald::store::SubscriptionUpdate =
        Arc::new(|subscription: &mut herald::model::Subscription| {
            subscription.topics = vec!["u".into()];
            Ok(())
        });
    // Planned before this update commits (the copy is young), committed after it returns.
    updater
        .update_subscription("sub_moving", to_u)
        .await
        .unwrap();
    let published = publish.await.unwrap().unwrap();
    assert!(
        published
            .partitions
            .contains(&PartitionKey::new("t", "sub_moving")),
        "the publish was planned with the old set: {published:?}"
    );
    let partition = PartitionKey::new("t", "sub_moving");
    assert!(
        updater
            .next_deliveries(&partition, 10)
            .await
            .unwrap()
            .is_empty(),
        "the stale delivery is taken back"
    );
    assert_eq!(count_items(&endpoint, &table, "EVENT#t").await, 0);
}

/// A topic dropped by an update whose removal failed halfway, then added back: the update that
/// adds it back works off the pending removal first, so the old backlog is not sent once the
/// topic is back.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_added_back_does_not_bring_back_its_dropped_backlog() {
    let endpoint = dynamo::endpoint();
    let table = dynamo::fresh_table(&endpoint).await;
    // No sweep would run for an hour: only the update can have removed the backlog.
    let store = DynamoStore::new(dynamo::client(&endpoint), &table)
        .with_repair_after(Duration::from_secs(3600));
    store
        .create_subscription(
            &plain_subscription("sub_back", "t"),
            &herald::store::SubscriptionLimits::NONE,
        )
        .await
        .unwrap();
    store
        .publish(
            &small_event("evt_old".into(), "t"),
            Duration::from_secs(86400),
        )
        .await
        .unwrap();
    let topics = |topics: &'static [&'static str]| -> herald::store::SubscriptionUpdate {
        Arc::new(move |subscription: &mut herald::model::Subscription| {
            subscription.topics = topics.iter().map(|topic| topic.to_string()).collect();
            Ok(())
        })
    };
    store.inject_removal_failures(1);
    let partial = store.update_subscription("sub_back", topics(&["u"])).await;
    assert!(
        matches!(partial, Err(StoreError::Partial(_))),
        "{partial:?}"
    );
    let partition = PartitionKey::new("t", "sub_back");
    assert_eq!(
        store.next_deliveries(&partition, 10).await.unwrap().len(),
        1
    );
    store
        .update_subscription("sub_back", topics(&["t", "u"]))
        .await
        .unwrap();
    assert!(
        store
            .next_deliveries(&partition, 10)
            .await
            .unwrap()
            .is_empty(),
        "the dropped backlog stays dropped"
    );
}
