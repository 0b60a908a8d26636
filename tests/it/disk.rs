//! The embedded store on a failing disk: a full filesystem (a real tmpfs of a few MiB, filled
//! up) and a damaged data file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use herald::proto::broker_service_client::BrokerServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    Backend, Receiver, Reply, all_pending, eventually, eventually_pending, publish_request,
    spawn_app, subscribe_request,
};

/// A small tmpfs mounted for one test, unmounted when dropped (the tests run as root, as CI
/// does).
struct SmallFilesystem {
    _parent: tempfile::TempDir,
    path: PathBuf,
}

impl SmallFilesystem {
    fn mount(size_mib: u32) -> SmallFilesystem {
        let parent = tempfile::tempdir().expect("temp dir");
        let path = parent.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs (needs root)");
        SmallFilesystem {
            _parent: parent,
            path,
        }
    }

    /// Fills the filesystem up with a file of zeros (until a write fails), then frees
    /// `headroom` bytes of it.
    fn fill(&self, headroom: u64) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).and_then(|()| file.flush()).is_ok() {}
        let small = vec![0u8; 1024];
        while file.write_all(&small).and_then(|()| file.flush()).is_ok() {}
        let length = file.metadata().unwrap().len();
        file.set_len(length.saturating_sub(headroom)).unwrap();
        filler
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Publishes `payload` on topic `t` until a publish is refused (at most `attempts` times),
/// adding the acknowledged sequences to `acknowledged`; returns the refusal.
async fn publish_until_refused(
    client: &mut BrokerServiceClient<Channel>,
    payload: &[u8],
    attempts: usize,
    acknowledged: &mut Vec<u64>,
) -> Option<tonic::Status> {
    for _ in 0..attempts {
        match client.publish(publish_request("t", payload.to_vec())).await {
            Ok(response) => acknowledged.push(response.into_inner().sequence),
            Err(status) => return Some(status),
        }
    }
    None
}

async fn broker_health(address: std::net::SocketAddr) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "herald.v1.BrokerService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_fails_publishes_and_flips_health_until_space_is_freed() {
    let filesystem = SmallFilesystem::mount(16);
    let data_dir = filesystem.path.join("data");
    let app = spawn_app(Backend::Embedded, |config| {
        config.data_dir = data_dir.clone();
        config.store_cache_mib = 1;
    })
    .await;
    // The receiver is down: every event stays stored.
    let receiver = Receiver::scripted(|_| Reply::Status(503)).await;
    let mut client = app.client.clone();
    let mut request = subscribe_request(&receiver.url(), &["t"]);
    // The receiver stays down for the whole outage: no event may run out of attempts.
    request.retry_policy.as_mut().unwrap().max_attempts = 1000;
    let subscription = client.subscribe(request).await.unwrap().into_inner();
    let filler = filesystem.fill(1024 * 1024);
    let mut acknowledged = Vec::new();
    let payload = vec![b'x'; 32 * 1024];
    let refused = publish_until_refused(&mut client, &payload, 400, &mut acknowledged)
        .await
        .expect("a publish is refused once the disk is full");
    assert!(
        !acknowledged.is_empty(),
        "some publishes fit in the headroom"
    );
    // The write that hit the full disk: RESOURCE_EXHAUSTED, with when to try again.
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    {
        use tonic_types::StatusExt;
        assert!(refused.get_error_details().retry_info().is_some());
    }
    assert!(refused.message().contains("disk is full"), "{refused:?}");
    println!(
        "{} publishes acknowledged before the disk filled up: {}",
        acknowledged.len(),
        refused.message()
    );
    eventually(
        Duration::from_secs(10),
        "health says NOT_SERVING",
        || async { broker_health(app.address).await == ServingStatus::NotServing as i32 },
    )
    .await;
    // Still refused while full. A publish may fit in pages the store's file already holds (the
    // failed batch's, given back when the file was reopened): it is acknowledged and must be
    // delivered like the others, but the disk cannot take many.
    let acknowledged_before = acknowledged.len();
    let refused_again = publish_until_refused(&mut client, &payload, 50, &mut acknowledged)
        .await
        .expect("publishes are refused while the disk stays full");
    assert_eq!(
        refused_again.code(),
        Code::ResourceExhausted,
        "{refused_again:?}"
    );
    assert!(refused_again.message().contains("disk is full"));
    println!(
        "{} more acknowledged while the disk stayed full",
        acknowledged.len() - acknowledged_before
    );

    std::fs::remove_file(&filler).unwrap();
    eventually(
        Duration::from_secs(15),
        "health says SERVING again",
        || async { broker_health(app.address).await == ServingStatus::Serving as i32 },
    )
    .await;
    let after = client
        .publish(publish_request("t", "after"))
        .await
        .expect("publishes work again without a restart")
        .into_inner();
    acknowledged.push(after.sequence);

    receiver.set_script(|_| Reply::Status(200));
    eventually(
        Duration::from_secs(60),
        "every acknowledged event delivered",
        || async {
            let delivered: std::collections::HashSet<u64> = receiver
                .delivered()
                .iter()
                .map(|received| received.sequence)
                .collect();
            acknowledged
                .iter()
                .all(|sequence| delivered.contains(sequence))
        },
    )
    .await;
    // Every acknowledged event, in sequence order. A publish answered with an error while the
    // disk was full may still show up: its commit failed at a point where the outcome is
    // unknown, and the caller was told so.
    let mut first_deliveries = Vec::new();
    for received in receiver.delivered() {
        if first_deliveries.last() != Some(&received.sequence) {
            first_deliveries.push(received.sequence);
        }
    }
    assert!(first_deliveries.windows(2).all(|pair| pair[0] < pair[1]));
    for sequence in &acknowledged {
        assert!(first_deliveries.contains(sequence), "{sequence} lost");
    }
    let mut client = app.client.clone();
    eventually_pending(
        &client,
        &subscription.id,
        Duration::from_secs(10),
        "nothing pending",
        |pending| pending.is_empty(),
    )
    .await;
    assert!(all_pending(&mut client, &subscription.id).await.is_empty());
    app.stop().await;
}

/// `herald serve` on `data_dir`; returns its exit status and standard error.
async fn serve_and_wait(data_dir: &Path) -> (std::process::ExitStatus, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald");
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("herald exits instead of serving")
        .expect("wait");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_foreign_data_file_refuses_to_start_and_says_what_to_do() {
    let data_dir = tempfile::tempdir().unwrap();
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|index| (index * 31 % 251) as u8)
        .collect();
    std::fs::write(data_dir.path().join("herald.redb"), garbage).unwrap();
    let (status, stderr) = serve_and_wait(data_dir.path()).await;
    assert!(!status.success());
    assert!(stderr.contains("herald.redb"), "{stderr}");
    assert!(
        stderr.contains("not a Herald data file or is damaged"),
        "{stderr}"
    );
    assert!(stderr.contains("move it aside"), "{stderr}");
}

/// A stalled writer: writes beyond the bounded queue wait (backpressure), then are refused with
/// `Overloaded`, which the API answers as RESOURCE_EXHAUSTED; the queued ones go through.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_is_backpressure_then_overloaded() {
    use herald::model::PartitionKey;
    use herald::store::{DeliveryLog, EmbeddedStore, StoreError};
    let data_dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(EmbeddedStore::open(data_dir.path()).unwrap());
    // A first write takes the writer into its stall; the queue then fills up behind it.
    store.inject_writer_stall(Duration::from_secs(5));
    let partition = PartitionKey::new("t", "sub_1");
    let mut writes = Vec::new();
    for sequence in 0..(8192 + 64) {
        let store = store.clone();
        let partition = partition.clone();
        writes.push(tokio::spawn(async move {
            store.complete_delivery(&partition, sequence, None).await
        }));
        if sequence == 0 {
            tokio::task::yield_now().await;
        }
    }
    let started = std::time::Instant::now();
    let mut refused = 0;
    let mut done = 0;
    for write in writes {
        match write.await.unwrap() {
            Ok(()) => done += 1,
            Err(StoreError::Overloaded(message)) => {
                assert!(message.contains("write queue"), "{message}");
                refused += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    println!(
        "{done} writes done, {refused} refused after {:?}",
        started.elapsed()
    );
    assert!(refused > 0, "the queue never filled up");
    assert!(done >= 8192, "queued writes went through: {done}");
}
