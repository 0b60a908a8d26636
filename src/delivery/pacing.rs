//! Per-subscription pacing: at most `max_requests_per_second` attempts started per second
//! (a GCRA limiter without bursts, governor's) and at most `max_in_flight` at once, over all
//! the subscription's partitions on this instance. A partition waiting for its turn is not
//! failing: nothing is recorded, its events just wait.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::model::{Pacing, Subscription};

/// One subscription's limiters.
pub struct Pacer {
    limits: Pacing,
    rate: Option<DefaultDirectRateLimiter>,
    in_flight: Option<Arc<Semaphore>>,
}

impl Pacer {
    fn new(limits: Pacing) -> Self {
        Pacer {
            limits,
            rate: NonZeroU32::new(limits.max_requests_per_second).map(|rate| {
                RateLimiter::direct(Quota::per_second(rate).allow_burst(NonZeroU32::MIN))
            }),
            in_flight: (limits.max_in_flight > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_in_flight as usize))),
        }
    }

    /// Waits for a place in flight, then for the next request's turn; the permit is held
    /// while the request runs.
    pub async fn turn(&self) -> Option<OwnedSemaphorePermit> {
        let permit = match &self.in_flight {
            Some(semaphore) => Some(
                semaphore
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("pacing semaphores are never closed"),
            ),
            None => None,
        };
        if let Some(rate) = &self.rate {
            while let Err(not_until) = rate.check() {
                tokio::time::sleep(not_until.wait_time_from(DefaultClock::default().now())).await;
            }
        }
        permit
    }
}

/// The pacers of the subscriptions that have limits, shared by their partitions.
#[derive(Default)]
pub struct Pacers {
    pacers: Mutex<HashMap<String, Arc<Pacer>>>,
}

impl Pacers {
    /// The pacer for `subscription`'s current limits (a new one when they changed); `None`
    /// without limits.
    pub fn get(&self, subscription: &Subscription) -> Option<Arc<Pacer>> {
        // The common case costs no lock (a pacer left from lifted limits is just not used,
        // and replaced if limits come back).
        if subscription.pacing == Pacing::default() {
            return None;
        }
        let mut pacers = self.pacers.lock().expect("pacers lock");
        match pacers.get(&subscription.id) {
            Some(pacer) if pacer.limits == subscription.pacing => Some(pacer.clone()),
            _ => {
                let pacer = Arc::new(Pacer::new(subscription.pacing));
                pacers.insert(subscription.id.clone(), pacer.clone());
                Some(pacer)
            }
        }
    }
}
