//! The egress path's metrics, per upstream: calls by status class and
//! their latency to the response headers, retries by reason, the breaker's
//! state. Upstream names come from the mesh configuration, so the label
//! set is bounded by it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use statefabric_resilience::BreakerState;

use super::stack::{Answer, Call, CallNext, CallStep, call_next};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    upstream: String,
    /// 2xx, 3xx, 4xx, 5xx
    class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    upstream: String,
    /// `sent` (request bodies, each attempt's) or `received` (responses).
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    upstream: String,
    /// connect_error, too_many_requests, unavailable, timeout
    reason: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ])
}

/// The egress path's metric families; clones share them (one pointer:
/// the steps hold a copy each and clone it into every call).
#[derive(Debug, Clone, Default)]
pub(crate) struct EgressMetrics(Arc<Families>);

impl std::ops::Deref for EgressMetrics {
    type Target = Families;

    fn deref(&self) -> &Families {
        &self.0
    }
}

#[derive(Debug)]
pub(crate) struct Families {
    calls: Family<CallLabels, Counter>,
    queued: Family<UpstreamLabel, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    duration: Family<UpstreamLabel, Histogram, fn() -> Histogram>,
    retries: Family<RetryLabels, Counter>,
    exhausted: Family<UpstreamLabel, Counter>,
    shed: Family<UpstreamLabel, Counter>,
    replays: Family<UpstreamLabel, Counter>,
    tokens: Family<UpstreamLabel, Counter>,
    breaker: Family<UpstreamLabel, Gauge>,
}

impl Default for Families {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            queued: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            exhausted: Family::default(),
            shed: Family::default(),
            replays: Family::default(),
            tokens: Family::default(),
            breaker: Family::default(),
        }
    }
}

impl Families {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "egress_queued_calls",
            "Calls waiting for a slot of an upstream's concurrency or rate limit",
            self.queued.clone(),
        );
        registry.register(
            "egress_bytes",
            "Body bytes to (sent) and from (received) an upstream",
            self.bytes.clone(),
        );
        registry.register(
            "egress_requests",
            "Agent calls through the egress path by upstream and status class (the sidecar's own answers included)",
            self.calls.clone(),
        );
        registry.register(
            "egress_duration_seconds",
            "Egress call latency to the response headers, retries included",
            self.duration.clone(),
        );
        registry.register(
            "egress_retries",
            "Egress attempts after the first, by upstream and reason",
            self.retries.clone(),
        );
        registry.register(
            "egress_retry_budget_exhausted",
            "Retries not made because the upstream's retry budget was spent",
            self.exhausted.clone(),
        );
        registry.register(
            "egress_shed",
            "Calls turned away by an upstream's concurrency or rate limit",
            self.shed.clone(),
        );
        registry.register(
            "egress_replayed",
            "Keyed calls answered from their recorded response, without the upstream",
            self.replays.clone(),
        );
        registry.register(
            "egress_model_tokens",
            "Model tokens answers reported used, under a tokens-per-minute limit",
            self.tokens.clone(),
        );
        registry.register(
            "egress_circuit_state",
            "An upstream's circuit breaker: 0 closed, 1 half-open, 2 open",
            self.breaker.clone(),
        );
    }

    pub(crate) fn observe(&self, upstream: &str, status: http::StatusCode, took: Duration) {
        let class = format!("{}xx", status.as_u16() / 100);
        self.calls
            .get_or_create(&CallLabels {
                upstream: upstream.to_owned(),
                class,
            })
            .inc();
        self.duration
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// The gauge of `upstream`'s calls waiting for admission.
    pub(crate) fn tokens(&self, upstream: &str) -> Counter {
        self.tokens
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    pub(crate) fn queued(&self, upstream: &str) -> Gauge {
        self.queued
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    /// The counter of body bytes to or from `upstream` (`sent`/`received`).
    pub(crate) fn bytes(&self, upstream: &str, direction: &'static str) -> Counter {
        self.bytes
            .get_or_create(&BytesLabels {
                upstream: upstream.to_owned(),
                direction,
            })
            .clone()
    }

    pub(crate) fn retried(&self, upstream: &str, reason: &str) {
        self.retries
            .get_or_create(&RetryLabels {
                upstream: upstream.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn budget_exhausted(&self, upstream: &str) {
        self.exhausted
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    pub(crate) fn shed(&self, upstream: &str) {
        self.shed
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    pub(crate) fn replayed(&self, upstream: &str) {
        self.replays
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    pub(crate) fn breaker_state(&self, upstream: &str, state: BreakerState) {
        let value = match state {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        };
        self.breaker
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .set(value);
    }
}

/// The stack's metrics step: every routed call counted by the status the
/// agent gets (the sidecar's own answers too) and timed to its headers.
#[derive(Debug, Clone)]
pub(super) struct Observe(pub EgressMetrics);

impl CallStep for Observe {
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let metrics = self.0.clone();
        async move {
            let began = tokio::time::Instant::now();
            let upstream = call.route.name.clone();
            let answer = call_next(next, call).await;
            let status = match &answer {
                Ok(response) => response.status(),
                Err(err) => err.status(),
            };
            metrics.observe(&upstream, status, began.elapsed());
            answer
        }
    }
}
