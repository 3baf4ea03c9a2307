//! Saga metrics: sagas started and ended per definition and outcome,
//! duration and SLA breaches, per-step latency and retries, sagas stuck or
//! stalled, open tasks per agent type (the queue depth agents autoscale on),
//! and the engine's own pass latency.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A metric's label: the saga definition.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DefinitionLabel {
    /// The definition's name.
    pub definition: String,
}

/// A metric's labels: the definition and how its saga ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The definition's name.
    pub definition: String,
    /// done, failed, compensated, aborted, stuck, timed_out
    pub outcome: String,
}

/// One tenant's agent type, and whether its tasks wait for a worker or are
/// claimed by one.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskQueueLabels {
    /// The tenant.
    pub tenant: String,
    /// The agent type the tasks are for.
    pub agent: String,
    /// waiting, claimed
    pub state: String,
}

/// A metric's labels: a definition and one of its steps.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The definition's name.
    pub definition: String,
    /// The step's name.
    pub step: String,
}

fn seconds_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    ])
}

/// The engine's metrics (`saga_*`); clones share the families.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Sagas started, per definition.
    pub started: Family<DefinitionLabel, Counter>,
    /// Sagas that reached a final state (or STUCK), and attempts that timed
    /// out, per outcome.
    pub ended: Family<OutcomeLabels, Counter>,
    /// Start to final state, per definition.
    pub duration: Family<DefinitionLabel, Histogram, fn() -> Histogram>,
    /// Sagas that ended later than their definition's SLA.
    pub sla_breaches: Family<DefinitionLabel, Counter>,
    /// Task dispatch to its reply, per step.
    pub step_latency: Family<StepLabels, Histogram, fn() -> Histogram>,
    /// Attempts dispatched, per step (first attempts and retries).
    pub step_dispatched: Family<StepLabels, Counter>,
    /// Attempts after the first, per step.
    pub step_retries: Family<StepLabels, Counter>,
    /// Attempts that got no reply within the step's timeout.
    pub step_timeouts: Family<StepLabels, Counter>,
    /// Open sagas without progress past their definition's threshold, or
    /// STUCK (refreshed by the leader).
    pub stalled: Family<DefinitionLabel, Gauge>,
    /// Dispatched, unanswered tasks per tenant, agent type and state
    /// (refreshed by the leader; what autoscalers scale agents on).
    pub open_tasks: Family<TaskQueueLabels, Gauge>,
    /// Transitions committed by this engine.
    pub transitions: Counter,
    /// Transitions refused because the saga changed first.
    pub conflicts: Counter,
    /// One engine pass over the inbox and the due timers.
    pub pass_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Family::default(),
            ended: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
            sla_breaches: Family::default(),
            step_latency: Family::new_with_constructor(seconds_histogram),
            step_dispatched: Family::default(),
            step_retries: Family::default(),
            step_timeouts: Family::default(),
            stalled: Family::default(),
            open_tasks: Family::default(),
            transitions: Counter::default(),
            conflicts: Counter::default(),
            pass_seconds: seconds_histogram(),
        }
    }
}

impl Metrics {
    /// Registers every family under `saga_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("saga");
        r.register("started", "Sagas started", self.started.clone());
        r.register(
            "ended",
            "Sagas that ended (done, failed, compensated, aborted) or got stuck",
            self.ended.clone(),
        );
        r.register(
            "duration_seconds",
            "Start to final state",
            self.duration.clone(),
        );
        r.register(
            "sla_breaches",
            "Sagas that ended later than their definition's SLA",
            self.sla_breaches.clone(),
        );
        r.register(
            "step_latency_seconds",
            "Task dispatch to its reply, per step",
            self.step_latency.clone(),
        );
        r.register(
            "step_dispatched",
            "Attempts dispatched, per step (first attempts and retries)",
            self.step_dispatched.clone(),
        );
        r.register(
            "step_retries",
            "Attempts after the first, per step",
            self.step_retries.clone(),
        );
        r.register(
            "step_timeouts",
            "Attempts that got no reply within the step's timeout",
            self.step_timeouts.clone(),
        );
        r.register(
            "stalled",
            "Open sagas without progress past their threshold, or STUCK",
            self.stalled.clone(),
        );
        r.register(
            "tasks_open",
            "Dispatched, unanswered tasks per tenant and agent type, waiting for a worker or claimed (leader only)",
            self.open_tasks.clone(),
        );
        r.register(
            "transitions",
            "Transitions committed by this engine",
            self.transitions.clone(),
        );
        r.register(
            "conflicts",
            "Transitions refused because the saga changed first",
            self.conflicts.clone(),
        );
        r.register(
            "engine_pass_seconds",
            "One engine pass over the inbox and the due timers",
            self.pass_seconds.clone(),
        );
    }

    /// Counts a saga of `definition` that ended with `outcome`.
    pub fn outcome(&self, definition: &str, outcome: &str) {
        self.ended
            .get_or_create(&OutcomeLabels {
                definition: definition.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The labels of `step` of `definition`.
    pub fn step(&self, definition: &str, step: &str) -> StepLabels {
        StepLabels {
            definition: definition.to_owned(),
            step: step.to_owned(),
        }
    }

    /// Records a finished saga's duration, and an SLA breach when it took
    /// longer than `sla`.
    pub fn observe_duration(&self, definition: &str, took: Duration, sla: Option<Duration>) {
        let label = DefinitionLabel {
            definition: definition.to_owned(),
        };
        self.duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if sla.is_some_and(|sla| took > sla) {
            self.sla_breaches.get_or_create(&label).inc();
        }
    }
}
