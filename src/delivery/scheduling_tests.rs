//! The worker's schedule in virtual time (`tokio::time::pause`): the real partition worker over
//! an in-memory delivery log and a scripted transport, so that gaps between attempts are
//! measured exactly, whatever the machine's load.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::delivery::retry::backoff_cap;
use crate::delivery::webhook::{Attempt, Transport};
use crate::delivery::{Engine, EngineConfig};
use crate::model::{
    DeliveryState, Event, FailureOutcome, NewEvent, OnExhausted, Page, PartitionKey,
    PendingDelivery, Published, RetryPolicy, Subscription, now_millis,
};
use crate::store::{
    DeliveryLog, LeaseToken, PartitionLeases, Store, StoreError, SubscriptionLimits,
    SubscriptionStore,
};

/// One partition's deliveries, in memory.
struct MemoryLog {
    subscription: Subscription,
    pending: Mutex<Vec<PendingDelivery>>,
    /// Every failure recorded: (sequence, outcome, wall time when recorded).
    failures: Mutex<Vec<(u64, FailureOutcome, u64)>>,
    completed: Mutex<Vec<u64>>,
}

impl MemoryLog {
    fn new(policy: RetryPolicy, on_exhausted: OnExhausted, sequences: &[u64]) -> Arc<Self> {
        let subscription = Subscription {
            id: "sub_1".into(),
            endpoint: "http://127.0.0.1:9/".into(),
            topics: vec!["t".into()],
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            retry_policy: policy,
            on_exhausted,
            created_at: 0,
            control: Default::default(),
            previous_secret: None,
            pacing: Default::default(),
            filter: None,
        };
        let mut previous = 0;
        let pending = sequences
            .iter()
            .map(|&sequence| {
                let delivery = PendingDelivery {
                    partition: partition(),
                    event: Event {
                        id: format!("evt_{sequence}"),
                        topic: "t".into(),
                        sequence,
                        payload: Vec::new(),
                        content_type: "application/json".into(),
                        attributes: Default::default(),
                        published_at: 0,
                        trace: None,
                    },
                    state: DeliveryState {
                        attempts: 0,
                        next_attempt_at: 0,
                        dead_lettered: false,
                    },
                    last_error: None,
                    previous_sequence: previous,
                    redelivery: None,
                };
                previous = sequence;
                delivery
            })
            .collect();
        Arc::new(MemoryLog {
            subscription,
            pending: Mutex::new(pending),
            failures: Mutex::new(Vec::new()),
            completed: Mutex::new(Vec::new()),
        })
    }
}

fn partition() -> PartitionKey {
    PartitionKey::new("t", "sub_1")
}

#[async_trait]
impl SubscriptionStore for MemoryLog {
    async fn create_subscription(
        &self,
        _: &Subscription,
        _: &SubscriptionLimits,
    ) -> Result<(), StoreError> {
        unreachable!("the worker never creates subscriptions")
    }

    async fn get_subscription(&self, _: &str) -> Result<Subscription, StoreError> {
        Ok(self.subscription.clone())
    }

    async fn list_subscriptions(
        &self,
        _: usize,
        _: Option<&str>,
    ) -> Result<Page<Subscription>, StoreError> {
        unreachable!("the worker never lists subscriptions")
    }

    async fn delete_subscription(&self, _: &str) -> Result<u64, StoreError> {
        unreachable!("the worker never deletes subscriptions")
    }

    async fn update_subscription(
        &self,
        _: &str,
        _: crate::store::SubscriptionUpdate,
    ) -> Result<crate::store::Updated, StoreError> {
        unreachable!("the worker never updates subscriptions")
    }
}

#[async_trait]
impl DeliveryLog for MemoryLog {
    async fn publish(&self, _: &NewEvent, _: Duration) -> Result<Published, StoreError> {
        unreachable!("the worker never publishes")
    }

    async fn partition_status(
        &self,
        _: &str,
        _: usize,
        _: Option<&str>,
    ) -> Result<Page<crate::model::PartitionStatus>, StoreError> {
        unreachable!("the worker never reads a status")
    }

    async fn retry_now(&self, _: &PartitionKey) -> Result<Option<u64>, StoreError> {
        unreachable!("the worker never makes a head due")
    }

    async fn skip_head(&self, _: &PartitionKey, _: u64) -> Result<(), StoreError> {
        unreachable!("the worker never skips")
    }

    async fn redrive(&self, _: &PartitionKey, _: Option<&[u64]>) -> Result<u64, StoreError> {
        unreachable!("the worker never redrives")
    }

    async fn purge(&self, _: &PartitionKey, _: Option<&[u64]>) -> Result<u64, StoreError> {
        unreachable!("the worker never purges")
    }

    async fn replay(
        &self,
        _: &PartitionKey,
        _: &crate::model::ReplayRange,
    ) -> Result<crate::model::Replayed, StoreError> {
        unreachable!("the worker never replays")
    }

    async fn next_deliveries(
        &self,
        _: &PartitionKey,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let pending = self.pending.lock().unwrap();
        Ok(pending
            .iter()
            .filter(|delivery| !delivery.state.dead_lettered)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn complete_delivery(
        &self,
        _: &PartitionKey,
        sequence: u64,
        _: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        self.pending
            .lock()
            .unwrap()
            .retain(|delivery| delivery.event.sequence != sequence);
        self.completed.lock().unwrap().push(sequence);
        Ok(())
    }

    async fn record_failure(
        &self,
        _: &PartitionKey,
        sequence: u64,
        attempt: u32,
        error: &str,
        outcome: FailureOutcome,
        _: Option<&LeaseToken>,
    ) -> Result<(), StoreError> {
        let mut pending = self.pending.lock().unwrap();
        let delivery = pending
            .iter_mut()
            .find(|delivery| delivery.event.sequence == sequence)
            .expect("pending");
        delivery.state.attempts = attempt;
        delivery.last_error = Some(error.to_string());
        match outcome {
            FailureOutcome::RetryAt(at) => delivery.state.next_attempt_at = at,
            FailureOutcome::DeadLetter => delivery.state.dead_lettered = true,
        }
        self.failures
            .lock()
            .unwrap()
            .push((sequence, outcome, now_millis()));
        Ok(())
    }

    async fn list_pending(
        &self,
        _: &str,
        _: Option<&str>,
        _: bool,
        _: usize,
        _: Option<&str>,
    ) -> Result<Page<PendingDelivery>, StoreError> {
        unreachable!("the worker never lists")
    }

    async fn pending_partitions(&self) -> Result<Vec<PartitionKey>, StoreError> {
        Ok(vec![partition()])
    }
}

impl Store for MemoryLog {
    fn leases(self: Arc<Self>) -> Option<Arc<dyn PartitionLeases>> {
        None
    }
}

/// Answers attempts from a script (then 2xx), recording when each was made (virtual time).
struct Script {
    answers: Mutex<VecDeque<Attempt>>,
    attempts: Mutex<Vec<(u64, Instant)>>,
}

impl Script {
    fn new(answers: Vec<Attempt>) -> Arc<Self> {
        Arc::new(Script {
            answers: Mutex::new(answers.into()),
            attempts: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl Transport for Script {
    async fn send(&self, _: &Subscription, _: &[u8], delivery: &PendingDelivery) -> Attempt {
        self.attempts
            .lock()
            .unwrap()
            .push((delivery.event.sequence, Instant::now()));
        self.answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Attempt::Delivered)
    }
}

fn fail(retry_after: Option<Duration>) -> Attempt {
    Attempt::Failed {
        status: Some(500),
        error: "HTTP 500".into(),
        retry_after,
    }
}

/// An engine over `log` sending through `script`, with `concurrency` delivery slots.
fn engine(
    log: &Arc<MemoryLog>,
    script: &Arc<Script>,
    concurrency: usize,
    shutdown: crate::shutdown::Shutdown,
) -> Engine {
    Engine::with_transport(
        log.clone(),
        EngineConfig {
            concurrency,
            lease: Duration::from_secs(10),
            rescan: None,
            endpoint_rules: Default::default(),
            metrics: Default::default(),
            auto_disable_after: None,
        },
        shutdown,
        script.clone(),
    )
}

/// Runs the engine until `done` sequences are completed or dead-lettered, at most an hour of
/// virtual time; returns the attempts (sequence, virtual time since the start).
async fn run(log: &Arc<MemoryLog>, script: &Arc<Script>, done: usize) -> Vec<(u64, Duration)> {
    let start = Instant::now();
    let (trigger, shutdown) = crate::shutdown::channel();
    let engine = engine(log, script, 4, shutdown);
    engine.notify(&[partition()]);
    let finished = || {
        let dead = log
            .pending
            .lock()
            .unwrap()
            .iter()
            .filter(|delivery| delivery.state.dead_lettered)
            .count();
        log.completed.lock().unwrap().len() + dead >= done
    };
    while !finished() {
        assert!(
            start.elapsed() < Duration::from_secs(3600),
            "never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    trigger.fire();
    assert!(engine.drain(Duration::from_secs(5)).await);
    let attempts = script.attempts.lock().unwrap().clone();
    attempts
        .into_iter()
        .map(|(sequence, at)| (sequence, at - start))
        .collect()
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(30),
        max_attempts,
        request_timeout: Duration::from_secs(5),
    }
}

/// The wait the worker scheduled after each failure: next attempt time minus the time the
/// failure was recorded.
fn scheduled(log: &MemoryLog) -> Vec<Duration> {
    log.failures
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, outcome, recorded)| match outcome {
            FailureOutcome::RetryAt(at) => {
                Some(Duration::from_millis(at.saturating_sub(*recorded)))
            }
            FailureOutcome::DeadLetter => None,
        })
        .collect()
}

fn assert_close(actual: Duration, expected: Duration) {
    let difference = actual.abs_diff(expected);
    assert!(
        difference <= Duration::from_millis(5),
        "waited {actual:?}, scheduled {expected:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_wait_exactly_the_jittered_backoff_and_stay_under_its_cap() {
    let log = MemoryLog::new(policy(6), OnExhausted::DeadLetter, &[1, 2]);
    let script = Script::new((0..5).map(|_| fail(None)).collect());
    let attempts = run(&log, &script, 2).await;

    let first: Vec<Duration> = attempts
        .iter()
        .filter(|(sequence, _)| *sequence == 1)
        .map(|(_, at)| *at)
        .collect();
    assert_eq!(first.len(), 6, "five failures, then success");
    let waits = scheduled(&log);
    assert_eq!(waits.len(), 5);
    for (index, wait) in waits.iter().enumerate() {
        let failures = index as u32 + 1;
        assert!(
            *wait <= backoff_cap(&policy(6), failures),
            "wait {wait:?} after {failures}"
        );
        assert_close(first[index + 1] - first[index], *wait);
    }
    // The next event goes only after the first succeeded, without waiting.
    assert_eq!(attempts.last().unwrap().0, 2);
    assert_close(attempts.last().unwrap().1, *first.last().unwrap());
    assert_eq!(*log.completed.lock().unwrap(), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_a_blocked_partition_retries_at_the_max_backoff() {
    let log = MemoryLog::new(policy(2), OnExhausted::Block, &[1, 2]);
    // 429 with Retry-After: 7 s; then the last attempt fails: blocked, retried at 30 s.
    let script = Script::new(vec![fail(Some(Duration::from_secs(7))), fail(None)]);
    let attempts = run(&log, &script, 2).await;
    let times: Vec<Duration> = attempts.iter().map(|(_, at)| *at).collect();
    let sequences: Vec<u64> = attempts.iter().map(|(sequence, _)| *sequence).collect();
    assert_eq!(sequences, [1, 1, 1, 2], "nothing passes a blocked head");
    assert_close(times[1] - times[0], Duration::from_secs(7));
    assert_close(times[2] - times[1], Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_event_is_dead_lettered_and_the_next_goes_at_once() {
    let log = MemoryLog::new(policy(2), OnExhausted::DeadLetter, &[1, 2]);
    let script = Script::new(vec![fail(None), fail(None)]);
    let attempts = run(&log, &script, 2).await;
    let sequences: Vec<u64> = attempts.iter().map(|(sequence, _)| *sequence).collect();
    assert_eq!(sequences, [1, 1, 2]);
    assert_close(attempts[2].1, attempts[1].1);
    let failures = log.failures.lock().unwrap().clone();
    assert!(matches!(
        failures.last(),
        Some((1, FailureOutcome::DeadLetter, _))
    ));
    assert_eq!(*log.completed.lock().unwrap(), [2]);
}

/// A delivery slot freed at the moment shutdown begins is not taken: no attempt starts after
/// shutdown. The partition waits for the only slot (held here); shutdown fires and the slot is
/// freed in the same step, so the task sees both ready. Repeated, since an unordered choice
/// between them would pass by chance half the time.
#[tokio::test(start_paused = true)]
async fn no_attempt_starts_after_shutdown_when_a_slot_frees_at_the_same_moment() {
    for _ in 0..32 {
        let log = MemoryLog::new(policy(6), OnExhausted::DeadLetter, &[1]);
        let script = Script::new(Vec::new());
        let (trigger, shutdown) = crate::shutdown::channel();
        let engine = engine(&log, &script, 1, shutdown);
        let held = engine
            .shared()
            .permits
            .try_acquire()
            .expect("the only slot");
        engine.notify(&[partition()]);
        // In paused time this returns once every task is idle: the partition waits for a slot.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(script.attempts.lock().unwrap().is_empty());
        trigger.fire();
        drop(held);
        assert!(engine.drain(Duration::from_secs(5)).await);
        assert!(
            script.attempts.lock().unwrap().is_empty(),
            "an attempt started after shutdown"
        );
    }
}
