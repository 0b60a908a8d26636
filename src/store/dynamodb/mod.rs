//! The DynamoDB backend: the same [`Store`] on one table that many Herald instances share.
//!
//! No operation scans the table; every read is a GetItem, BatchGetItem or Query on a key (see
//! `schema` for the layout). The invariants that keep delivery ordered across instances:
//!
//! - **Sequence allocation is part of the publish transaction.** A publish transaction moves
//!   the topic's `last_seq` from the value it read to the new one (a conditional update) and
//!   writes the events and their deliveries. Two publishers cannot both commit from the same
//!   `last_seq`, so sequence `n + 1` commits after `n`, together with its deliveries: a reader
//!   that sees delivery `n + 1` sees every delivery `n` of the topic. A publisher that stalls
//!   or dies before committing leaves nothing.
//! - **Group commit per topic.** Concurrent publishes on one topic in one instance share a
//!   transaction and a block of sequences (`publish`); a hot topic costs one conditional write
//!   per batch.
//! - **Fan-outs larger than one transaction** (100 items) open a fan-out marker on the topic in
//!   the same transaction; the rest of the deliveries follow in batches and the marker is
//!   removed last. Workers deliver only sequences below the smallest open marker, and any
//!   instance finishes a fan-out whose marker is older than the repair delay (recomputing its
//!   subscribers from the subscription-set version and previous sequence its event item
//!   records), so a publisher crashing halfway delays the topic but never reorders it.
//! - **No table-wide item in the publish path.** Subscribe and Unsubscribe bump a version item;
//!   publishes do not read it in their transaction. Each instance's copy of the subscription
//!   set may be used for a bounded time (the table's cache validity, 1 s by default) after a
//!   read found it current; an older copy is refreshed (one read of the version item) before
//!   a publish. Subscribe and Unsubscribe return only after that validity (plus a margin) has
//!   passed since their change committed, so a publish that starts after they return uses a
//!   copy read after the change. The topic item also records the newest set version used on
//!   the topic and refuses an older one, so each subscription's `previous` chain stays whole.
//! - **A partition is delivered by one instance at a time**, holding a lease item. Each claim
//!   writes a new token into it, and every write a worker makes for its partition (completion,
//!   failure) checks that token in the same transaction, so a worker whose lease was taken
//!   over (it was paused, or its renewals failed) cannot write over its successor's progress.
//!
//! # Layout
//! `admin` reaches and creates the table; `errors` maps SDK errors; `requests` counts
//! requests (an SDK interceptor); `io` holds the reads and fenced transactions the rest builds
//! on; `subscriptions`, `delivery_log` and `leases` implement the store traits, with
//! `publish`, `fanout`, `rescan` and `unsubscribe` behind them; `schema` is the item layout.

mod admin;
mod create;
mod delivery_log;
mod errors;
mod fanout;
mod io;
mod leases;
mod operate;
mod publish;
mod reads;
mod requests;
mod rescan;
mod schema;
mod subscriptions;
mod unsubscribe;

use std::collections::HashMap;
#[cfg(feature = "fault-injection")]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use tokio::sync::watch;

use crate::model::PartitionKey;
use crate::store::{PartitionLeases, Store, StoreError};
pub use admin::{DynamoConfig, client_from_env, create_table, create_table_with_cache_validity};
use errors::sdk_error;
use publish::TopicState;
pub use requests::RequestCounts;
use rescan::TopicMark;
use subscriptions::CachedSet;
pub use subscriptions::{DEFAULT_CACHE_VALIDITY, MAX_TRACKED_SUBSCRIPTIONS};

/// Items a transaction may hold.
const TRANSACTION_LIMIT: usize = 100;
/// Keys a batch get may hold.
const BATCH_GET_LIMIT: usize = 100;
/// Deliveries of unsubscribed subscriptions one rescan removes at most.
const SWEEP_BUDGET: usize = 500;
/// How often an unreachable table is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts at a publish or subscription change that lose optimistic-locking races.
const MAX_CONFLICT_RETRIES: u32 = 64;

/// Faults armed by tests (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
#[derive(Default)]
struct Faults {
    fanout: AtomicBool,
    unsubscribe: AtomicBool,
    /// Removals (a topic update's own, or the sweep of one left before an update) to fail.
    removals: std::sync::atomic::AtomicU32,
    /// Microseconds added to this instance's clock where it numbers events.
    clock_skew: std::sync::atomic::AtomicI64,
    /// Milliseconds the next publish commit waits between its plan and its transaction.
    commit_delay: std::sync::atomic::AtomicU64,
}

/// The DynamoDB store: a handle on state shared with the tasks it starts (one publish
/// committer per busy topic).
pub struct DynamoStore {
    inner: Arc<Inner>,
}

impl std::ops::Deref for DynamoStore {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// The state behind a [`DynamoStore`].
pub struct Inner {
    client: Client,
    table: String,
    /// Owner name of this instance's partition leases.
    instance: String,
    counts: Arc<RequestCounts>,
    /// Whether the table answers (see `requests`).
    reachability: Arc<requests::Reachability>,
    /// The subscription set, and when it was last known current (see `subscriptions`).
    subscriptions: Mutex<Option<CachedSet>>,
    /// Held while this instance reloads the subscription set: one reload at a time, and the
    /// callers that waited for it take its result instead of reloading again. Holds the last
    /// failed reload's start and error, which those callers share too.
    refreshing: tokio::sync::Mutex<Option<(std::time::Instant, StoreError)>>,
    topics: Mutex<HashMap<String, TopicState>>,
    /// The leases this instance holds, by token (see `leases`).
    lease_terms: Mutex<HashMap<String, leases::LeaseTerm>>,
    /// Held while this instance changes the subscription set.
    changes: tokio::sync::Mutex<()>,
    /// Subscribe calls waiting to be committed (see `create`).
    creates: Mutex<Vec<create::PendingCreate>>,
    /// Recently published or read events (see `reads`).
    events: Mutex<reads::EventCache>,
    /// Horizon reads shared per topic (see `reads`).
    horizon_reads: Mutex<HashMap<String, reads::TopicReads>>,
    /// Publishes waiting for their topic's committer (see `publish`).
    queues: Mutex<HashMap<String, publish::Queue>>,
    repair_after: Duration,
    /// See [`MAX_TRACKED_SUBSCRIPTIONS`] (lower in tests).
    tracked_limit: usize,
    /// (topic's last sequence, whether a fan-out was open) at the previous `pending_partitions`
    /// call, for every topic.
    rescanned: Mutex<Option<HashMap<String, TopicMark>>>,
    /// How long events are kept after their last delivery (zero: deleted with it).
    retention: Duration,
    /// When this instance last wrote each partition's success counters (see `operate`).
    stats_written: Mutex<HashMap<PartitionKey, std::time::Instant>>,
    #[cfg(feature = "fault-injection")]
    faults: Faults,
    fanouts_repaired: AtomicU64,
}

impl DynamoStore {
    /// A store on `table` through `client` (whose configuration it extends with a request
    /// counter). The table must exist ([`create_table`]).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        let counts = Arc::new(RequestCounts::default());
        let reachability = Arc::new(requests::Reachability::new());
        let client = Client::from_conf(
            client
                .config()
                .to_builder()
                .interceptor(requests::CountRequests {
                    counts: counts.clone(),
                    reachability: reachability.clone(),
                })
                .build(),
        );
        let inner = Inner {
            client,
            table: table.into(),
            instance: crate::ids::new_id("ins"),
            counts,
            reachability,
            subscriptions: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(None),
            topics: Mutex::new(HashMap::new()),
            lease_terms: Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            creates: Mutex::new(Vec::new()),
            events: Mutex::new(reads::EventCache::default()),
            horizon_reads: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            repair_after: Duration::from_secs(10),
            tracked_limit: subscriptions::MAX_TRACKED_SUBSCRIPTIONS,
            rescanned: Mutex::new(None),
            retention: Duration::ZERO,
            stats_written: Mutex::new(HashMap::new()),
            #[cfg(feature = "fault-injection")]
            faults: Faults::default(),
            fanouts_repaired: AtomicU64::new(0),
        };
        DynamoStore {
            inner: Arc::new(inner),
        }
    }

    /// Sets how old an unfinished fan-out must be before another instance finishes it.
    pub fn with_repair_after(mut self, repair_after: Duration) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before use")
            .repair_after = repair_after;
        self
    }

    /// Keeps at most `limit` tracked subscriptions instead of
    /// [`MAX_TRACKED_SUBSCRIPTIONS`] (tests reach a small limit quickly).
    pub fn with_tracked_limit(mut self, limit: usize) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before use")
            .tracked_limit = limit;
        self
    }

    /// Keeps events for `retention` after their last delivery, so that they can be replayed
    /// (DynamoDB's TTL deletes them afterwards, within a day or two of expiring; expired ones
    /// are not replayed). Zero (the default) deletes them with their last delivery.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before use")
            .retention = retention;
        self
    }

    /// Fails the next fan-out that needs more than one transaction right after its first
    /// transaction, as a publisher crash there would. Test-only (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_fanout_failure(&self) {
        self.faults.fanout.store(true, Ordering::SeqCst);
    }

    /// Fails the next Unsubscribe right after the subscription is deleted, before any of its
    /// deliveries are, as a crash or outage there would. Test-only (feature
    /// `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_unsubscribe_failure(&self) {
        self.faults.unsubscribe.store(true, Ordering::SeqCst);
    }

    /// Fails the next `count` removals of deliveries of topics an update removed: a topic
    /// update's own (right after its change has settled), or the one an update works off
    /// first from an earlier update that left its removal record. The record stays for a
    /// sweep. Test-only (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_removal_failures(&self, count: u32) {
        self.faults.removals.store(count, Ordering::SeqCst);
    }

    /// Shifts the clock this instance numbers events by (a lagging or hurrying machine).
    /// Test-only (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_clock_skew(&self, skew_micros: i64) {
        self.faults.clock_skew.store(skew_micros, Ordering::SeqCst);
    }

    /// Makes the next publish commit wait `delay` between planning (with the subscription set
    /// of that moment) and its transaction, as a slow network would. Test-only (feature
    /// `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject_commit_delay(&self, delay: Duration) {
        self.faults
            .commit_delay
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Unfinished fan-outs this instance has completed.
    pub fn fanouts_repaired(&self) -> u64 {
        self.fanouts_repaired.load(Ordering::SeqCst)
    }

    /// Requests sent so far, per operation.
    pub fn request_counters(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    /// Checks that the table answers.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}

impl Inner {
    /// True (once) if a fan-out failure was injected.
    fn injected_fanout_failure(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.faults.fanout.swap(false, Ordering::SeqCst)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }

    /// True if a removal failure was injected (and takes it).
    fn injected_removal_failure(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.faults
                .removals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok()
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }

    /// Waits out an injected commit delay, once.
    async fn injected_commit_delay(&self) {
        #[cfg(feature = "fault-injection")]
        {
            let delay = self.faults.commit_delay.swap(0, Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
        }
    }

    /// The clock events are numbered by, in microseconds (skewed in tests).
    fn sequence_clock(&self) -> u64 {
        let now = crate::model::now_micros();
        #[cfg(feature = "fault-injection")]
        {
            now.saturating_add_signed(self.faults.clock_skew.load(Ordering::SeqCst))
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            now
        }
    }

    /// True (once) if an unsubscribe failure was injected.
    fn injected_unsubscribe_failure(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.faults.unsubscribe.swap(false, Ordering::SeqCst)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }
}

impl Store for DynamoStore {
    fn leases(self: Arc<Self>) -> Option<Arc<dyn PartitionLeases>> {
        Some(self)
    }

    /// False after calls in a row ended without an answer; true at the next answer. While
    /// false, the table is probed every second (so health comes back without traffic).
    fn health(&self) -> Option<watch::Receiver<bool>> {
        let receiver = self.reachability.healthy.subscribe();
        let reachability = Arc::downgrade(&self.reachability);
        let client = self.client.clone();
        let table = self.table.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(reachability) = reachability.upgrade() else {
                    return;
                };
                if reachability.healthy.receiver_count() == 0 {
                    return;
                }
                if !*reachability.healthy.borrow() {
                    // The interceptor records the outcome.
                    let _ = client.describe_table().table_name(&table).send().await;
                }
            }
        });
        Some(receiver)
    }

    fn request_counts(&self) -> Option<Arc<RequestCounts>> {
        Some(self.counts.clone())
    }
}
