//! The circuit breaker's state machine: closed → (N consecutive faults) →
//! open → (after `open_for`) → half-open with one probe → closed or open.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive faults that open the circuit.
    pub failure_threshold: u32,
    /// How long an open circuit refuses calls before it lets a probe through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { faults: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug, Default)]
struct Metrics {
    /// 0 closed, 1 half-open, 2 open.
    state: Gauge,
    opened: Counter,
    rejected: Counter,
}

/// A circuit breaker for one dependency; clones share state.
#[derive(Debug, Clone)]
pub struct Breaker {
    name: &'static str,
    config: BreakerConfig,
    state: Arc<Mutex<State>>,
    metrics: Arc<Metrics>,
}

impl Breaker {
    pub fn new(name: &'static str, config: BreakerConfig) -> Self {
        Self {
            name,
            config,
            state: Arc::new(Mutex::new(State::Closed { faults: 0 })),
            metrics: Arc::default(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Exports `circuit_state`, `circuit_opened_total` and
    /// `circuit_rejected_total` labelled with the dependency's name.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_label(("dependency".into(), self.name.into()));
        sub.register(
            "circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            self.metrics.state.clone(),
        );
        sub.register(
            "circuit_opened",
            "Times the circuit opened",
            self.metrics.opened.clone(),
        );
        sub.register(
            "circuit_rejected",
            "Calls refused at once because the circuit was open",
            self.metrics.rejected.clone(),
        );
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if Instant::now() < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Lets a call through, or `None` when the circuit is open (or half-open
    /// with its one probe already out).
    pub fn permit(&self) -> Option<Permit> {
        let mut state = self.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if Instant::now() < until => {
                drop(state);
                self.metrics.rejected.inc();
                return None;
            }
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                self.metrics.state.set(1);
                true
            }
            State::HalfOpen { probing: true } => {
                drop(state);
                self.metrics.rejected.inc();
                return None;
            }
        };
        Some(Permit {
            breaker: self.clone(),
            probe,
            settled: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settle(&self, ok: bool) {
        let mut state = self.lock();
        let open = match (&mut *state, ok) {
            (_, true) => {
                *state = State::Closed { faults: 0 };
                false
            }
            (State::Closed { faults }, false) => {
                *faults += 1;
                *faults >= self.config.failure_threshold
            }
            (State::HalfOpen { .. } | State::Open { .. }, false) => true,
        };
        if open {
            *state = State::Open {
                until: Instant::now() + self.config.open_for,
            };
            self.metrics.opened.inc();
            self.metrics.state.set(2);
        } else if ok {
            self.metrics.state.set(0);
        }
    }
}

/// One call let through; report how it went. Dropped without a verdict
/// (the caller gave up), it counts as neither, and a probe slot is freed.
#[derive(Debug)]
pub struct Permit {
    breaker: Breaker,
    probe: bool,
    settled: bool,
}

impl Permit {
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.settle(true);
    }

    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(false);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut state = self.breaker.lock();
            if let State::HalfOpen { probing } = &mut *state {
                *probing = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            "test",
            BreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_secs(1),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_faults_and_probes_once() {
        let b = breaker();
        for _ in 0..2 {
            b.permit().expect("closed").failure();
        }
        b.permit().expect("closed").success();
        for _ in 0..3 {
            b.permit().expect("closed").failure();
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.permit().is_none(), "open refuses");
        tokio::time::advance(Duration::from_millis(1001)).await;
        let probe = b.permit().expect("one probe");
        assert!(b.permit().is_none(), "only one probe at a time");
        probe.failure();
        assert!(b.permit().is_none(), "failed probe reopens");
        tokio::time::advance(Duration::from_millis(1001)).await;
        b.permit().expect("probe").success();
        assert_eq!(b.state(), BreakerState::Closed);
        b.permit().expect("closed again").success();
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_the_slot() {
        let b = breaker();
        for _ in 0..3 {
            b.permit().expect("closed").failure();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(b.permit().expect("probe"));
        assert!(b.permit().is_some(), "another probe may go");
    }
}
