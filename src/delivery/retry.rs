//! Backoff schedule: exponential with full jitter, capped, honouring `Retry-After`.

use std::time::Duration;

use rand::Rng;

use crate::model::{FailureOutcome, OnExhausted, RetryPolicy, UnixMillis};

/// The cap of the backoff after the `failures`-th failed attempt (1-based):
/// `min(max_backoff, initial_backoff * 2^(failures - 1))`.
pub fn backoff_cap(policy: &RetryPolicy, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1);
    if exponent >= 32 {
        return policy.max_backoff;
    }
    policy
        .initial_backoff
        .checked_mul(1u32 << exponent)
        .unwrap_or(policy.max_backoff)
        .min(policy.max_backoff)
}

/// A receiver's `Retry-After`, kept between the policy's `initial_backoff` (so `Retry-After: 0`
/// cannot make a tight loop) and its `max_backoff`.
pub fn bounded_retry_after(policy: &RetryPolicy, retry_after: Duration) -> Duration {
    retry_after
        .max(policy.initial_backoff)
        .min(policy.max_backoff)
}

/// The delay before the next attempt after the `failures`-th failure: a uniformly random
/// duration in `[0, backoff_cap]` (full jitter), or the receiver's `Retry-After` (see
/// [`bounded_retry_after`]) when it sent one.
pub fn next_delay(
    policy: &RetryPolicy,
    failures: u32,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    if let Some(retry_after) = retry_after {
        return bounded_retry_after(policy, retry_after);
    }
    let cap = backoff_cap(policy, failures).as_micros() as u64;
    Duration::from_micros(rng.random_range(0..=cap))
}

/// Decides what follows the `failures`-th failed attempt of a delivery at time `now`.
pub fn after_failure(
    policy: &RetryPolicy,
    on_exhausted: OnExhausted,
    failures: u32,
    retry_after: Option<Duration>,
    now: UnixMillis,
    rng: &mut impl Rng,
) -> FailureOutcome {
    if failures >= policy.max_attempts {
        return match on_exhausted {
            OnExhausted::DeadLetter => FailureOutcome::DeadLetter,
            OnExhausted::Block => {
                let delay = retry_after.map_or(policy.max_backoff, |retry_after| {
                    bounded_retry_after(policy, retry_after)
                });
                FailureOutcome::RetryAt(now + delay.as_millis() as u64)
            }
        };
    }
    let delay = next_delay(policy, failures, retry_after, rng);
    FailureOutcome::RetryAt(now + delay.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: 5,
            request_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn caps_double_until_the_maximum() {
        let caps: Vec<u128> = (1..=8)
            .map(|failures| backoff_cap(&policy(), failures).as_millis())
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff_cap(&policy(), u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jittered_delays_stay_within_the_cap_and_spread_over_it() {
        let mut rng = StdRng::seed_from_u64(7);
        for failures in 1..=8 {
            let cap = backoff_cap(&policy(), failures);
            let delays: Vec<Duration> = (0..200)
                .map(|_| next_delay(&policy(), failures, None, &mut rng))
                .collect();
            assert!(delays.iter().all(|delay| *delay <= cap));
            assert!(delays.iter().any(|delay| *delay < cap / 4));
            assert!(delays.iter().any(|delay| *delay > cap * 3 / 4));
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let mut rng = StdRng::seed_from_u64(1);
        let delay = next_delay(&policy(), 1, Some(Duration::from_secs(2)), &mut rng);
        assert_eq!(delay, Duration::from_secs(2));
        let delay = next_delay(&policy(), 1, Some(Duration::from_secs(60)), &mut rng);
        assert_eq!(delay, Duration::from_secs(5));
    }

    #[test]
    fn retry_after_zero_waits_at_least_the_initial_backoff() {
        let mut rng = StdRng::seed_from_u64(1);
        let delay = next_delay(&policy(), 3, Some(Duration::ZERO), &mut rng);
        assert_eq!(delay, Duration::from_millis(100));
        let outcome = after_failure(
            &policy(),
            OnExhausted::Block,
            9,
            Some(Duration::ZERO),
            1000,
            &mut rng,
        );
        assert_eq!(outcome, FailureOutcome::RetryAt(1100));
    }

    #[test]
    fn exhaustion_dead_letters_or_blocks_at_the_max_backoff() {
        let mut rng = StdRng::seed_from_u64(1);
        let outcome = after_failure(&policy(), OnExhausted::DeadLetter, 5, None, 1000, &mut rng);
        assert_eq!(outcome, FailureOutcome::DeadLetter);
        let outcome = after_failure(&policy(), OnExhausted::Block, 5, None, 1000, &mut rng);
        assert_eq!(outcome, FailureOutcome::RetryAt(6000));
        let outcome = after_failure(&policy(), OnExhausted::DeadLetter, 4, None, 1000, &mut rng);
        assert!(matches!(outcome, FailureOutcome::RetryAt(at) if (1000..=1800).contains(&at)));
    }
}
