//! Counting the requests sent to DynamoDB, per operation, by an SDK interceptor: every
//! request the client transmits is counted (retried attempts included), whatever code sent it.
//! The same interceptor follows whether DynamoDB can be reached: unhealthy after consecutive
//! calls that ended without an answer (timeouts, connection errors), healthy at the next answer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aws_sdk_dynamodb::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

/// Requests sent, per DynamoDB operation (`GetItem`, `TransactWriteItems`, ...), and the
/// transactions DynamoDB cancelled for a conflict with another transaction.
#[derive(Debug, Default)]
pub struct RequestCounts {
    counts: Mutex<BTreeMap<String, u64>>,
    conflicts: AtomicU64,
}

impl RequestCounts {
    fn add(&self, operation: &str) {
        let mut counts = self.counts.lock().expect("counts lock");
        match counts.get_mut(operation) {
            Some(count) => *count += 1,
            None => {
                counts.insert(operation.to_string(), 1);
            }
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().expect("counts lock").clone()
    }

    /// All requests sent.
    pub fn total(&self) -> u64 {
        self.counts.lock().expect("counts lock").values().sum()
    }

    pub(super) fn conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
    }

    /// Transactions cancelled for a conflict with another transaction on one of their items
    /// (`TransactionConflict`); the local emulator never reports any.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }
}

/// Calls in a row that ended without an answer before the store counts as unreachable.
const UNREACHABLE_AFTER: u32 = 3;

/// Whether DynamoDB answers, as a watch.
#[derive(Debug)]
pub(super) struct Reachability {
    failures: AtomicU32,
    pub(super) healthy: tokio::sync::watch::Sender<bool>,
}

impl Reachability {
    pub(super) fn new() -> Self {
        Reachability {
            failures: AtomicU32::new(0),
            healthy: tokio::sync::watch::Sender::new(true),
        }
    }

    fn answered(&self) {
        self.failures.store(0, Ordering::SeqCst);
        self.healthy
            .send_if_modified(|healthy| !std::mem::replace(healthy, true));
    }

    fn unanswered(&self) {
        if self.failures.fetch_add(1, Ordering::SeqCst) + 1 >= UNREACHABLE_AFTER {
            self.healthy
                .send_if_modified(|healthy| std::mem::replace(healthy, false));
        }
    }
}

/// The interceptor that feeds a [`RequestCounts`] and a [`Reachability`].
#[derive(Debug)]
pub(super) struct CountRequests {
    pub(super) counts: Arc<RequestCounts>,
    pub(super) reachability: Arc<Reachability>,
}

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "HeraldCountRequests"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map_or("unknown", Metadata::name);
        self.counts.add(operation);
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        match context.output_or_error() {
            Some(Err(error)) if error.is_timeout_error() || error.is_connector_error() => {
                self.reachability.unanswered();
            }
            // An output, or an error DynamoDB answered with (a failed condition, throttling).
            Some(_) => self.reachability.answered(),
            None => {}
        }
        Ok(())
    }
}
