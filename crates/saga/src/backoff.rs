//! Delay before a retry: exponential from `initial_backoff` by `multiplier`,
//! capped at `max_backoff`, with a random share of `jitter` taken off so
//! that many sagas failing together do not retry together.

use std::time::Duration;

use crate::definition::RetryPolicy;

/// The pause before attempt `next` (2 for the first retry). `random` is a
/// number in [0, 1) the caller draws, which keeps this function pure.
pub fn delay(policy: &RetryPolicy, next: u32, random: f64) -> Duration {
    let exponent = i32::try_from(next.saturating_sub(2)).unwrap_or(i32::MAX);
    let base = policy.initial_backoff.as_secs_f64() * policy.multiplier.powi(exponent);
    let capped = base.min(policy.max_backoff.as_secs_f64());
    let random = random.clamp(0.0, 1.0);
    Duration::from_secs_f64(capped * (1.0 - policy.jitter * random))
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
