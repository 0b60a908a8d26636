//! Crash safety with the real binary: `kill -9` under publish load, restart, nothing lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{
    Backend, Deployment, HeraldProcess, Receiver, Reply, connect, eventually, publish_request,
    subscribe_request,
};

async fn kill_9_under_load_loses_no_acknowledged_event_and_keeps_order(backend: Backend) {
    let deployment = Deployment::new(backend).await;
    // A slowish receiver, so a backlog is pending when the server dies.
    let receiver = Receiver::scripted(|_| Reply::Slow(2)).await;
    let server = HeraldProcess::start(&deployment).await;
    let mut client = connect(server.address).await;
    let subscription = client
        .subscribe(subscribe_request(&receiver.url(), &["orders:*"]))
        .await
        .unwrap()
        .into_inner();
    let secret = subscription.secret.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for publisher in 0..6 {
        let mut client = connect(server.address).await;
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut index = 0;
            while !stop.load(Ordering::SeqCst) {
                let topic = if index % 2 == 0 {
                    "orders:eu"
                } else {
                    "orders:us"
                };
                match client
                    .publish(publish_request(topic, format!("{publisher}-{index}")))
                    .await
                {
                    Ok(response) => acknowledged.push((topic, response.into_inner())),
                    // The server died mid-call: this publish was never acknowledged.
                    Err(_) => break,
                }
                index += 1;
            }
            acknowledged
        }));
    }
    // Let load build up, then kill the server while publishers are still calling.
    eventually(
        Duration::from_secs(120),
        "some events delivered under load",
        || async { receiver.delivered_count() >= 200 },
    )
    .await;
    server.kill_9().await;
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.unwrap());
    }
    let delivered_before_restart = receiver.successes().len();
    let delivered_ids: HashSet<String> = receiver
        .delivered()
        .into_iter()
        .map(|received| received.id)
        .collect();
    let backlog = acknowledged
        .iter()
        .filter(|(_, response)| !delivered_ids.contains(&response.event_id))
        .count();
    assert!(backlog > 0, "a backlog existed at the kill");
    println!(
        "killed after {} acknowledged publishes, {delivered_before_restart} delivered",
        acknowledged.len()
    );

    let server = HeraldProcess::start(&deployment).await;
    let acknowledged_ids: HashSet<String> = acknowledged
        .iter()
        .map(|(_, response)| response.event_id.clone())
        .collect();
    eventually(
        Duration::from_secs(60),
        "every acknowledged event delivered after restart",
        || async {
            let delivered: HashSet<String> = receiver
                .delivered()
                .into_iter()
                .map(|received| received.id)
                .collect();
            acknowledged_ids.is_subset(&delivered)
        },
    )
    .await;

    // Per topic: the first delivery of each event comes in sequence order, the chain has no
    // hole, and every acknowledged sequence is in it. Redeliveries (at-least-once) are allowed
    // but carry the same id.
    let mut first_seen: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    let mut seen = HashSet::new();
    let delivered = receiver.successes();
    for received in &delivered {
        assert!(received.signature_valid(&secret));
        if seen.insert(received.id.clone()) {
            let topic = if received.topic == "orders:eu" {
                "orders:eu"
            } else {
                "orders:us"
            };
            first_seen
                .entry(topic)
                .or_default()
                .push((received.sequence, received.previous));
        }
    }
    for (topic, chain) in &first_seen {
        let mut last = 0;
        for (sequence, previous) in chain {
            assert_eq!(*previous, last, "{topic}: hole before {sequence}");
            assert!(*sequence > last);
            last = *sequence;
        }
    }
    // Repeats (sent before the kill, their completion not yet recorded) carry the sequence
    // and `herald-previous-sequence` of the first send, and what the restarted server sends
    // comes in sequence order per topic.
    let mut firsts: HashMap<String, (u64, u64)> = HashMap::new();
    for received in &delivered {
        let first = firsts
            .entry(received.id.clone())
            .or_insert((received.sequence, received.previous));
        assert_eq!(
            *first,
            (received.sequence, received.previous),
            "{}",
            received.id
        );
    }
    let mut after_restart: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for received in &delivered[delivered_before_restart..] {
        after_restart
            .entry(received.topic.clone())
            .or_default()
            .push(received.sequence);
    }
    // A request sent just before the kill can reach the receiver after the count above, and
    // the restarted server sends it again: a repeat, so equal neighbours are allowed.
    for (topic, sequences) in &after_restart {
        assert!(
            sequences.windows(2).all(|pair| pair[0] <= pair[1]),
            "{topic}: sent out of order after the restart"
        );
    }
    for (topic, response) in &acknowledged {
        assert!(
            first_seen[topic]
                .iter()
                .any(|(sequence, _)| *sequence == response.sequence),
            "acknowledged {topic}/{} missing",
            response.sequence
        );
    }
    println!(
        "after restart: {} deliveries of {} distinct events ({} acknowledged)",
        delivered.len(),
        seen.len(),
        acknowledged.len()
    );
    server.kill_9().await;
}

async fn graceful_restart_keeps_subscriptions_and_pending_deliveries(backend: Backend) {
    let deployment = Deployment::new(backend).await;
    let receiver = Receiver::scripted(|_| Reply::Status(503)).await;
    let server = HeraldProcess::start(&deployment).await;
    let mut client = connect(server.address).await;
    let subscription = client
        .subscribe(subscribe_request(&receiver.url(), &["t"]))
        .await
        .unwrap()
        .into_inner();
    let mut sequences = Vec::new();
    for index in 0..10 {
        sequences.push(
            client
                .publish(publish_request("t", format!("{index}")))
                .await
                .unwrap()
                .into_inner()
                .sequence,
        );
    }
    eventually(Duration::from_secs(10), "first attempts made", || async {
        !receiver.received().is_empty()
    })
    .await;
    // SIGTERM: graceful.
    let pid = server.child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let mut server = server;
    let exit = tokio::time::timeout(Duration::from_secs(15), server.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(exit.success(), "graceful exit: {exit:?}");

    receiver.set_script(|_| Reply::Status(200));
    let server = HeraldProcess::start(&deployment).await;
    let mut client = connect(server.address).await;
    let fetched = client
        .get_subscription(herald::proto::GetSubscriptionRequest {
            id: subscription.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.endpoint, receiver.url());
    eventually(
        Duration::from_secs(20),
        "backlog delivered after restart",
        || async { receiver.delivered_count() == 10 },
    )
    .await;
    let delivered: Vec<u64> = receiver
        .delivered()
        .iter()
        .map(|received| received.sequence)
        .collect();
    assert_eq!(delivered, sequences);
    server.kill_9().await;
}

crate::on_both_backends!(
    kill_9_under_load_loses_no_acknowledged_event_and_keeps_order,
    graceful_restart_keeps_subscriptions_and_pending_deliveries,
);
