//! The pause before a retry, shared by everything that retries: exponential
//! from `initial` by `multiplier`, capped at `max`, with a random share of
//! `jitter` taken off so that many callers failing together do not retry
//! together. Pure: the caller draws `random` in [0, 1).

use std::time::Duration;

/// The pause before retry number `retry` (1 for the first retry).
pub fn exponential(
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    retry: u32,
    random: f64,
) -> Duration {
    let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
    let capped = (initial.as_secs_f64() * multiplier.powi(exponent)).min(max.as_secs_f64());
    Duration::from_secs_f64(capped * (1.0 - jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters_down_only() {
        let ms = |retry, random| {
            exponential(
                Duration::from_millis(100),
                Duration::from_secs(1),
                2.0,
                0.5,
                retry,
                random,
            )
            .as_millis()
        };
        let plain: Vec<u128> = (1..=6).map(|r| ms(r, 0.0)).collect();
        assert_eq!(plain, [100, 200, 400, 800, 1000, 1000]);
        assert!((100..=102).contains(&ms(2, 0.99)), "at most half taken off");
    }
}
