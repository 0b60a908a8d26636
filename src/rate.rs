//! Per-key rate limits on Publish and on subscription changes (Subscribe, Unsubscribe), with
//! governor's GCRA limiter keyed by API key name (`anonymous` when keys are off). Beyond the
//! rate a call is `RESOURCE_EXHAUSTED` with `RetryInfo` saying when a call will be accepted.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::Caller;

type Limiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Which budget a call draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Publish.
    Publish,
    /// Subscribe and Unsubscribe.
    Manage,
}

/// The limiters; a budget of 0 calls per second is no limit.
pub struct RateLimits {
    publish: Option<Limiter>,
    manage: Option<Limiter>,
}

impl RateLimits {
    /// Limits of `publish` and `manage` calls per second per key (bursts of as many).
    pub fn new(publish: u32, manage: u32) -> Self {
        let limiter = |rate: u32| {
            NonZeroU32::new(rate).map(|rate| RateLimiter::keyed(Quota::per_second(rate)))
        };
        RateLimits {
            publish: limiter(publish),
            manage: limiter(manage),
        }
    }

    /// Takes one call from the caller's budget, or says when to come back.
    pub fn check(&self, caller: &Caller, budget: Budget) -> Result<(), tonic::Status> {
        let limiter = match budget {
            Budget::Publish => &self.publish,
            Budget::Manage => &self.manage,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        let key = match caller {
            Caller::Key(key) => key.name.clone(),
            Caller::Anyone => "anonymous".to_string(),
        };
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until
                .wait_time_from(DefaultClock::default().now())
                .max(Duration::from_millis(1));
            let what = match budget {
                Budget::Publish => "Publish calls",
                Budget::Manage => "subscription changes",
            };
            tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                format!(
                    "API key `{key}` exceeded its rate of {what}; retry in {} ms",
                    wait.as_millis()
                ),
                ErrorDetails::with_retry_info(Some(wait)),
            )
        })
    }
}
