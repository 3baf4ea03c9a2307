//! Failing fast when an external service is down.
//!
//! Owns the [`Breaker`] (a circuit breaker), the [`Guard`] that puts a
//! deadline and the breaker around one call, and [`BreakerLayer`], the same
//! breaker as a tower layer for clients that are tower services. Every
//! adapter that calls Redis, Postgres or Kafka goes through one of these, so
//! a dead dependency costs callers a fast `Unavailable` rather than a pile of
//! waiting requests (no cascading failure).
//!
//! It does not decide retries: whether a call may be retried depends on the
//! call (a non-idempotent write may not), so the adapters decide; the pause
//! between tries is computed once, in [`backoff`].
//!
//! Written here rather than taken from a crate: the breaker must share its
//! state between a tower stack and plain futures, count only the failures the
//! caller classifies as the dependency's fault (a Redis script's "not holder"
//! answer is not), let exactly one probe through when half-open, and export
//! its state to our Prometheus registry; the crates we looked at each missed
//! one of these, and the whole state machine is about a hundred lines.
#![warn(missing_docs)]

pub mod backoff;
mod breaker;
mod layer;

pub use breaker::{Breaker, BreakerConfig, BreakerState, FailureRate, Permit};
pub use layer::{BreakerLayer, BreakerService};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a guarded call did not produce the callee's own answer.
#[derive(Debug, thiserror::Error)]
pub enum Guarded<E> {
    /// The breaker is open: the dependency failed recently and is not being
    /// called until the next probe.
    #[error("{0} is unavailable (circuit open after repeated failures)")]
    Open(&'static str),
    /// The dependency (named) did not answer within the deadline (given).
    #[error("{0} did not answer within {1:?}")]
    Timeout(&'static str, Duration),
    /// The call's own error.
    #[error(transparent)]
    Inner(E),
}

/// A deadline and a breaker for the calls to one dependency. Clones share
/// both, and both can be changed while calls are in flight (a call keeps
/// the deadline it started with).
#[derive(Debug, Clone)]
pub struct Guard {
    breaker: Breaker,
    /// Nanoseconds; an atomic rather than a lock: read on every call.
    timeout: Arc<AtomicU64>,
}

fn nanos(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX)
}

impl Guard {
    /// A guard with `breaker` and a deadline of `timeout` per call.
    pub fn new(breaker: Breaker, timeout: Duration) -> Self {
        Self {
            breaker,
            timeout: Arc::new(AtomicU64::new(nanos(timeout))),
        }
    }

    /// Its breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The deadline a call started now gets.
    pub fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout.load(Ordering::Relaxed))
    }

    /// The deadline of the calls that start from now on.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout.store(nanos(timeout), Ordering::Relaxed);
    }

    /// Runs `call` under the deadline if the breaker lets it through.
    /// `is_fault` tells which of the callee's errors count against the
    /// dependency (a timeout always does).
    pub async fn run<T, E>(
        &self,
        call: impl Future<Output = Result<T, E>>,
        is_fault: impl FnOnce(&E) -> bool,
    ) -> Result<T, Guarded<E>> {
        let name = self.breaker.name();
        let permit = self.breaker.permit().ok_or(Guarded::Open(name))?;
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => {
                permit.success();
                Ok(value)
            }
            Ok(Err(err)) => {
                if is_fault(&err) {
                    permit.failure();
                } else {
                    permit.success();
                }
                Err(Guarded::Inner(err))
            }
            Err(_) => {
                permit.failure();
                Err(Guarded::Timeout(name, timeout))
            }
        }
    }
}
