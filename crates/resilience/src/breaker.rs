//! The circuit breaker's state machine: closed → (N consecutive faults, or
//! a failure rate over a rolling window) → open → (after `open_for`) →
//! half-open with up to `half_open_probes` probes → closed after that many
//! successes, open again on any probe's failure.
//!
//! The settings can be replaced while calls are in flight
//! ([`Breaker::set_config`]): a ResiliencyPolicy from the control plane
//! changes a running sidecar's breaker without a restart. The state is
//! kept; a new setting applies from the next call.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

/// Opens the circuit when this share of the calls in a rolling window
/// failed, once the window holds at least `min_calls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureRate {
    /// 1..=100.
    pub percent: u32,
    /// The sliding window the rate is taken over.
    pub window: Duration,
    /// Calls the window must hold before the rate can open the circuit.
    pub min_calls: u32,
}

/// When a breaker opens and how it recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive faults that open the circuit (0: this rule is off).
    pub failure_threshold: u32,
    /// A failure rate that opens the circuit too.
    pub failure_rate: Option<FailureRate>,
    /// How long an open circuit refuses calls before it lets a probe through.
    pub open_for: Duration,
    /// Probes let through at once while half-open; that many successes
    /// close the circuit.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate: None,
            open_for: Duration::from_secs(1),
            half_open_probes: 1,
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; faults are counted.
    Closed,
    /// Calls are refused at once until `open_for` has passed.
    Open,
    /// A few probe calls go through; their outcome closes or reopens it.
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { faults: u32 },
    Open { since: Instant, until: Instant },
    HalfOpen { out: u32, succeeded: u32 },
}

/// Buckets of the rolling window: the rate is exact to a tenth of it.
const BUCKETS: usize = 10;

/// Calls and failures in the last `window`, in [`BUCKETS`] slices.
#[derive(Debug, Default)]
struct Window {
    /// (slice number since `origin`, calls, failures).
    slices: [(u64, u32, u32); BUCKETS],
    origin: Option<Instant>,
}

impl Window {
    fn record(&mut self, window: Duration, failed: bool) -> (u32, u32) {
        let now = Instant::now();
        let origin = *self.origin.get_or_insert(now);
        let slice = (window / BUCKETS as u32).max(Duration::from_millis(1));
        let current = u64::try_from(now.duration_since(origin).as_nanos() / slice.as_nanos())
            .unwrap_or(u64::MAX);
        let index = usize::try_from(current % BUCKETS as u64).unwrap_or(0);
        let bucket = &mut self.slices[index];
        if bucket.0 != current {
            *bucket = (current, 0, 0);
        }
        bucket.1 += 1;
        bucket.2 += u32::from(failed);
        let oldest = current.saturating_sub(BUCKETS as u64 - 1);
        self.slices
            .iter()
            .filter(|(n, ..)| *n >= oldest && *n <= current)
            .fold((0, 0), |(c, f), (_, calls, fails)| (c + calls, f + fails))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[derive(Debug)]
struct Inner {
    config: BreakerConfig,
    state: State,
    window: Window,
}

#[derive(Debug, Default)]
struct Metrics {
    /// 0 closed, 1 half-open, 2 open.
    state: Gauge,
    opened: Counter,
    rejected: Counter,
}

/// A circuit breaker for one dependency; clones share state and settings.
#[derive(Debug, Clone)]
pub struct Breaker {
    name: &'static str,
    inner: Arc<Mutex<Inner>>,
    metrics: Arc<Metrics>,
}

impl Breaker {
    /// A closed breaker for the dependency `name` (which labels its metrics
    /// and errors).
    pub fn new(name: &'static str, config: BreakerConfig) -> Self {
        Self {
            name,
            inner: Arc::new(Mutex::new(Inner {
                config,
                state: State::Closed { faults: 0 },
                window: Window::default(),
            })),
            metrics: Arc::default(),
        }
    }

    /// The dependency it guards.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its current settings.
    pub fn config(&self) -> BreakerConfig {
        self.lock().config
    }

    /// Replaces the settings; calls in flight finish under the state they
    /// started in. An open circuit stays open for the new `open_for`,
    /// counted from when it opened.
    pub fn set_config(&self, config: BreakerConfig) {
        let mut inner = self.lock();
        inner.config = config;
        if let State::Open { since, until } = &mut inner.state {
            *until = *since + config.open_for;
        }
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

    /// Where it stands now.
    pub fn state(&self) -> BreakerState {
        match self.lock().state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until, .. } if Instant::now() < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Lets a call through, or `None` when the circuit is open (or half-open
    /// with all its probes already out).
    pub fn permit(&self) -> Option<Permit> {
        let mut inner = self.lock();
        let probes = inner.config.half_open_probes.max(1);
        let probe = match &mut inner.state {
            State::Closed { .. } => false,
            State::Open { until, .. } if Instant::now() < *until => {
                drop(inner);
                self.metrics.rejected.inc();
                return None;
            }
            State::Open { .. } => {
                inner.state = State::HalfOpen {
                    out: 1,
                    succeeded: 0,
                };
                self.metrics.state.set(1);
                true
            }
            State::HalfOpen { out, succeeded } if *out + *succeeded < probes => {
                *out += 1;
                true
            }
            State::HalfOpen { .. } => {
                drop(inner);
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settle(&self, probe: bool, ok: bool) {
        let mut guard = self.lock();
        let Inner {
            config,
            state,
            window,
        } = &mut *guard;
        let open = match state {
            State::HalfOpen { out, succeeded } if probe && ok => {
                *out = out.saturating_sub(1);
                *succeeded += 1;
                if *succeeded >= config.half_open_probes.max(1) {
                    *state = State::Closed { faults: 0 };
                    window.clear();
                    self.metrics.state.set(0);
                }
                false
            }
            State::HalfOpen { .. } | State::Open { .. } => probe && !ok,
            State::Closed { faults } => {
                *faults = if ok { 0 } else { *faults + 1 };
                let consecutive =
                    config.failure_threshold > 0 && *faults >= config.failure_threshold;
                let rate = config.failure_rate.is_some_and(|rate| {
                    let (calls, failed) = window.record(rate.window, !ok);
                    calls >= rate.min_calls.max(1)
                        && u64::from(failed) * 100 >= u64::from(rate.percent) * u64::from(calls)
                });
                consecutive || rate
            }
        };
        if open {
            // A failed probe reopens; a call let through before the circuit
            // opened (not a probe) says nothing about the dependency now.
            let since = Instant::now();
            *state = State::Open {
                since,
                until: since + config.open_for,
            };
            window.clear();
            self.metrics.opened.inc();
            self.metrics.state.set(2);
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
    /// The call succeeded.
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, true);
    }

    /// The call failed in a way that counts against the dependency.
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, false);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut inner = self.breaker.lock();
            if let State::HalfOpen { out, .. } = &mut inner.state {
                *out = out.saturating_sub(1);
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
                ..BreakerConfig::default()
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

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_over_the_window_opens_and_old_calls_fall_out() {
        let b = Breaker::new(
            "rate",
            BreakerConfig {
                failure_threshold: 0,
                failure_rate: Some(FailureRate {
                    percent: 50,
                    window: Duration::from_secs(10),
                    min_calls: 4,
                }),
                open_for: Duration::from_secs(5),
                half_open_probes: 2,
            },
        );
        // Alternating: never two in a row, but half of them fail.
        b.permit().expect("closed").failure();
        b.permit().expect("closed").success();
        b.permit().expect("closed").failure();
        assert_eq!(b.state(), BreakerState::Closed, "fewer than min_calls");
        // Ten seconds on, the first three are out of the window.
        tokio::time::advance(Duration::from_secs(11)).await;
        b.permit().expect("closed").failure();
        b.permit().expect("closed").success();
        b.permit().expect("closed").success();
        b.permit().expect("closed").success();
        assert_eq!(b.state(), BreakerState::Closed, "1 of 4 failed");
        b.permit().expect("closed").failure();
        b.permit().expect("closed").failure();
        assert_eq!(b.state(), BreakerState::Open, "3 of 6 failed");
        tokio::time::advance(Duration::from_secs(6)).await;
        let (first, second) = (b.permit().expect("probe 1"), b.permit().expect("probe 2"));
        assert!(b.permit().is_none(), "two probes at most");
        first.success();
        assert_eq!(b.state(), BreakerState::HalfOpen, "one success of two");
        second.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn new_settings_apply_to_the_next_calls() {
        let b = breaker();
        b.permit().expect("closed").failure();
        b.set_config(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(60),
            ..BreakerConfig::default()
        });
        b.permit().expect("closed").failure();
        assert_eq!(b.state(), BreakerState::Open, "opened at the new threshold");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(b.permit().is_none(), "open for the new duration");
        b.set_config(BreakerConfig::default());
        assert!(
            b.permit().is_some(),
            "a shorter open_for, counted from the opening, has passed: a probe"
        );
    }
}
