//! A worker's hold on one partition of a shared store: the lease token that fences its writes,
//! and how long it may still act, by its own monotonic clock.
//!
//! The rules a worker follows with it:
//! - validity is counted from the moment the claim or renewal request was *sent*, so a slow
//!   answer can only make the worker stop early, never late;
//! - a renewal is due every third of the lease; nothing is started (a request, a store write)
//!   unless at least a third of the lease is left ([`Lease::margin`]), renewing first if needed;
//! - a renewal that is refused or fails ends the lease: the worker stops before its next send.

use std::time::Duration;

use tokio::time::Instant;

use crate::model::PartitionKey;
use crate::store::{LeaseToken, PartitionLeases, StoreError};

/// The answer to a renewal request, and when the request was sent.
pub struct Renewal {
    sent: Instant,
    result: Result<bool, StoreError>,
}

/// Why a worker must stop using its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnded {
    /// Another worker holds the partition now.
    Lost,
    /// The lease could not be renewed (the store did not answer); it may still be ours, but
    /// it will run out before we can be sure.
    Unrenewable(String),
}

/// A held partition lease.
#[derive(Debug)]
pub struct Lease {
    partition: PartitionKey,
    token: LeaseToken,
    duration: Duration,
    /// When the last successful claim or renewal request was sent.
    renewed_at: Instant,
}

impl Lease {
    /// Claims `partition` once. `None` if another worker holds it.
    pub async fn claim(
        leases: &dyn PartitionLeases,
        partition: &PartitionKey,
        duration: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let sent = Instant::now();
        Ok(leases.claim(partition, duration).await?.map(|token| Lease {
            partition: partition.clone(),
            token,
            duration,
            renewed_at: sent,
        }))
    }

    /// Counts the lease from the last fenced write that extended it, if later than the last
    /// claim or renewal.
    pub fn absorb_extension(&mut self, leases: &dyn PartitionLeases) {
        if let Some(sent) = leases.extended_at(&self.token) {
            self.renewed_at = self.renewed_at.max(Instant::from_std(sent));
        }
    }

    /// The fencing token to pass with every write for the partition.
    pub fn token(&self) -> &LeaseToken {
        &self.token
    }

    /// Until when this worker may act on the partition, by its monotonic clock.
    pub fn valid_until(&self) -> Instant {
        self.renewed_at + self.duration
    }

    /// When the next renewal is due.
    pub fn renewal_due(&self) -> Instant {
        self.renewed_at + self.duration / 3
    }

    /// The least lease time that must be left when the worker starts a request.
    pub fn margin(&self) -> Duration {
        self.duration / 3
    }

    /// Time left on the lease.
    pub fn remaining(&self) -> Duration {
        self.valid_until().saturating_duration_since(Instant::now())
    }

    /// When a request in flight must be abandoned if the lease has not been renewed by then:
    /// half the margin before the lease runs out, which leaves room for clocks that differ
    /// (other instances judge expiry by wall clock).
    pub fn abandon_at(&self) -> Instant {
        self.valid_until() - self.margin() / 2
    }

    /// A renewal request that does not borrow the lease, so it can run while the lease is read
    /// (during a delivery); give its answer to [`Lease::apply`].
    pub fn renewal<'a>(
        &self,
        leases: &'a dyn PartitionLeases,
    ) -> impl std::future::Future<Output = Renewal> + Send + use<'a> {
        let (partition, token, duration) =
            (self.partition.clone(), self.token.clone(), self.duration);
        async move {
            let sent = Instant::now();
            let result = leases.renew(&partition, &token, duration).await;
            Renewal { sent, result }
        }
    }

    /// Takes a renewal's answer into account.
    pub fn apply(&mut self, renewal: Renewal) -> Result<(), LeaseEnded> {
        match renewal.result {
            Ok(true) => {
                self.renewed_at = self.renewed_at.max(renewal.sent);
                Ok(())
            }
            Ok(false) => Err(LeaseEnded::Lost),
            Err(error) => Err(LeaseEnded::Unrenewable(error.to_string())),
        }
    }

    /// Renews now.
    pub async fn renew(&mut self, leases: &dyn PartitionLeases) -> Result<(), LeaseEnded> {
        let renewal = self.renewal(leases).await;
        self.apply(renewal)
    }

    /// Makes sure at least [`Lease::margin`] is left before the worker starts something,
    /// renewing if a renewal is due.
    pub async fn hold(&mut self, leases: &dyn PartitionLeases) -> Result<(), LeaseEnded> {
        self.absorb_extension(leases);
        if Instant::now() >= self.renewal_due() {
            self.renew(leases).await?;
        }
        if self.remaining() < self.margin() {
            // Only possible if the renewal itself took more than a third of the lease.
            return Err(LeaseEnded::Unrenewable(
                "the lease renewal answered too late".into(),
            ));
        }
        Ok(())
    }

    /// Gives the lease up: expired in place (`handover`, work is left: every instance's rescan
    /// finds it) or deleted (nothing left).
    pub async fn release(self, leases: &dyn PartitionLeases, handover: bool) {
        if let Err(error) = leases.release(&self.partition, &self.token, handover).await {
            tracing::warn!(partition = %self.partition, %error, handover, "cannot release partition lease; it will expire");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// Leases answered from a script: `renew` returns the next scripted answer.
    struct Scripted {
        renewals: Mutex<Vec<Result<bool, StoreError>>>,
        delay: Duration,
    }

    #[async_trait]
    impl PartitionLeases for Scripted {
        async fn claim(
            &self,
            _partition: &PartitionKey,
            _duration: Duration,
        ) -> Result<Option<LeaseToken>, StoreError> {
            Ok(Some(LeaseToken("t".into())))
        }

        async fn renew(
            &self,
            _partition: &PartitionKey,
            _token: &LeaseToken,
            _duration: Duration,
        ) -> Result<bool, StoreError> {
            tokio::time::sleep(self.delay).await;
            self.renewals.lock().unwrap().remove(0)
        }

        async fn release(
            &self,
            _partition: &PartitionKey,
            _token: &LeaseToken,
            _handover: bool,
        ) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn scripted(renewals: Vec<Result<bool, StoreError>>, delay: Duration) -> Scripted {
        Scripted {
            renewals: Mutex::new(renewals),
            delay,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_every_third_and_stops_on_a_refused_or_failed_renewal() {
        let leases = scripted(
            vec![
                Ok(true),
                Ok(false),
                Err(StoreError::Unavailable("down".into())),
            ],
            Duration::ZERO,
        );
        let partition = PartitionKey::new("t", "sub_1");
        let mut lease = Lease::claim(&leases, &partition, Duration::from_secs(9))
            .await
            .unwrap()
            .unwrap();
        // Not due yet: no request.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(lease.hold(&leases).await, Ok(()));
        assert_eq!(leases.renewals.lock().unwrap().len(), 3);
        // Due: renewed, validity counted from the renewal.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(lease.hold(&leases).await, Ok(()));
        assert_eq!(lease.remaining(), Duration::from_secs(9));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(lease.hold(&leases).await, Err(LeaseEnded::Lost));
        let mut again = Lease::claim(&leases, &partition, Duration::from_secs(9))
            .await
            .unwrap()
            .unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(matches!(
            again.hold(&leases).await,
            Err(LeaseEnded::Unrenewable(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn validity_counts_from_the_request_not_the_answer() {
        let leases = scripted(vec![Ok(true)], Duration::from_secs(4));
        let partition = PartitionKey::new("t", "sub_1");
        let mut lease = Lease::claim(&leases, &partition, Duration::from_secs(9))
            .await
            .unwrap()
            .unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        // The renewal takes 4 s to answer: 5 s are left, not 9, and that is above the margin.
        assert_eq!(lease.hold(&leases).await, Ok(()));
        assert_eq!(lease.remaining(), Duration::from_secs(5));
        // A renewal slower than two thirds of the lease leaves less than the margin: stop.
        let leases = scripted(vec![Ok(true)], Duration::from_secs(7));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(matches!(
            lease.hold(&leases).await,
            Err(LeaseEnded::Unrenewable(_))
        ));
    }
}
