//! Delay before a step's retry: its retry policy applied to the shared
//! exponential backoff with jitter (`statefabric_resilience::backoff`).

use std::time::Duration;

use crate::definition::RetryPolicy;

/// The pause before attempt `next` (2 for the first retry). `random` is a
/// number in [0, 1) the caller draws, which keeps this function pure.
pub fn delay(policy: &RetryPolicy, next: u32, random: f64) -> Duration {
    statefabric_resilience::backoff::exponential(
        policy.initial_backoff,
        policy.max_backoff,
        policy.multiplier,
        policy.jitter,
        next.saturating_sub(1),
        random,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter,
        }
    }

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let p = policy(0.0);
        let ms: Vec<u128> = (2..=7).map(|n| delay(&p, n, 0.5).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_only_shortens_and_stays_within_its_share() {
        let p = policy(0.5);
        for r in [0.0, 0.3, 0.99] {
            let d = delay(&p, 3, r);
            assert!(
                d <= Duration::from_millis(200) && d >= Duration::from_millis(100),
                "{d:?}"
            );
        }
        assert_ne!(delay(&p, 3, 0.0), delay(&p, 3, 0.9));
    }
}
