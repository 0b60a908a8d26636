//! Counting the requests sent to DynamoDB, per operation, by an SDK interceptor: every
//! request the client transmits is counted (retried attempts included), whatever code sent it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

/// Requests sent, per DynamoDB operation (`GetItem`, `TransactWriteItems`, ...).
#[derive(Debug, Default)]
pub struct RequestCounts {
    counts: Mutex<BTreeMap<String, u64>>,
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
}

/// The interceptor that feeds a [`RequestCounts`].
#[derive(Debug)]
pub(super) struct CountRequests(pub(super) Arc<RequestCounts>);

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
        self.0.add(operation);
        Ok(())
    }
}
