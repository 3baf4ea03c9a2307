//! The retry budget (Finagle's and Linkerd's): retries may add at most a
//! share of the requests, so an upstream answering 429 or 503 to everyone
//! does not get every call several times over. Each request deposits
//! `percent / 100` of a retry; each retry withdraws one. So that a quiet
//! upstream can still be retried, `min_per_second` retries are always
//! allowed (a bucket refilled at that rate, holding one second's worth).
//! Deposits are capped at the budget of the last 100 requests, so a long
//! quiet spell does not bank a storm.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(super) struct RetryBudget {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Banked in hundredths of a retry (a request deposits `percent` of
    /// them), so shares add up exactly.
    percent: u64,
    deposits: u64,
    min_per_second: f64,
    reserve: f64,
    refilled: Instant,
}

/// A retry, in the hundredths deposits are counted in.
const RETRY: u64 = 100;

impl RetryBudget {
    pub(super) fn new(percent: u32, min_per_second: u32) -> Self {
        let min_per_second = f64::from(min_per_second);
        Self {
            state: Mutex::new(State {
                percent: u64::from(percent),
                deposits: 0,
                min_per_second,
                reserve: min_per_second,
                refilled: Instant::now(),
            }),
        }
    }

    /// The settings changed: keep what is banked, spend by the new rules.
    pub(super) fn set(&self, percent: u32, min_per_second: u32) {
        let mut state = self.lock();
        state.percent = u64::from(percent);
        state.min_per_second = f64::from(min_per_second);
    }

    /// A request (not a retry) was made.
    pub(super) fn deposit(&self) {
        let mut state = self.lock();
        let cap = state.percent * 100;
        state.deposits = (state.deposits + state.percent).min(cap);
    }

    /// Whether one more retry may go; takes it from the budget if so.
    pub(super) fn withdraw(&self) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        let elapsed = now
            .duration_since(state.refilled)
            .min(Duration::from_secs(1));
        state.reserve = (state.reserve + elapsed.as_secs_f64() * state.min_per_second)
            .min(state.min_per_second);
        state.refilled = now;
        if state.deposits >= RETRY {
            state.deposits -= RETRY;
            true
        } else if state.reserve >= 1.0 {
            state.reserve -= 1.0;
            true
        } else {
            false
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests_plus_a_small_floor() {
        let budget = RetryBudget::new(20, 2);
        // The floor: two retries a second with no requests at all.
        assert!(budget.withdraw());
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
        // 20 % of 50 requests: ten retries.
        for _ in 0..50 {
            budget.deposit();
        }
        let allowed = (0..50).filter(|_| budget.withdraw()).count();
        assert_eq!(allowed, 10);
        // A second later the floor is back, and only the floor.
        tokio::time::advance(Duration::from_secs(1)).await;
        let allowed = (0..50).filter(|_| budget.withdraw()).count();
        assert_eq!(allowed, 2);
        // Deposits cap at the budget of 100 requests.
        for _ in 0..10_000 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let allowed = (0..1000).filter(|_| budget.withdraw()).count();
        assert_eq!(allowed, 20 + 2);
    }
}
