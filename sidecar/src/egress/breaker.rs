//! The stack's circuit breaker step: per upstream (its state outlives
//! configuration changes), each try asks it first — while open, the call
//! fails fast with 503 naming the upstream and is not sent — and reports
//! how the try went: a connection failure, a timeout or a 5xx counts
//! against the upstream, a 429 does not (the upstream is up, only busy).

use std::future::Future;
use std::sync::Arc;

use http::Response;
use hyper::body::Incoming;
use statefabric_resilience::{Breaker, BreakerConfig};

use super::errors::EgressError;
use super::metrics::EgressMetrics;
use super::routes::Route;
use super::stack::{Attempt, Next, PerUpstream, Result, Step, call_next};

/// Every upstream's breaker (shared with the tunnels of the forward-proxy
/// mode).
pub(super) type Breakers = PerUpstream<Breaker>;

/// The upstream's breaker with the route's settings; `None` without a
/// breaker policy.
pub(super) fn for_route(
    breakers: &Breakers,
    route: &Route,
    metrics: &EgressMetrics,
) -> Option<Breaker> {
    let config: BreakerConfig = route.policy.breaker?;
    let breaker = breakers.get(
        &route.name,
        || Breaker::new("egress", config),
        |breaker| {
            if breaker.config() != config {
                breaker.set_config(config);
            }
        },
    );
    metrics.breaker_state(&route.name, breaker.state());
    Some(breaker)
}

#[derive(Clone)]
pub(super) struct Breaking {
    breakers: Arc<Breakers>,
    metrics: EgressMetrics,
}

impl Breaking {
    pub(super) fn new(breakers: Arc<Breakers>, metrics: EgressMetrics) -> Self {
        Self { breakers, metrics }
    }
}

impl Step<Attempt> for Breaking {
    type Response = Response<Incoming>;
    type NextRequest = Attempt;
    type NextResponse = Response<Incoming>;

    fn call<S>(
        &self,
        attempt: Attempt,
        next: S,
    ) -> impl Future<Output = Result<Response<Incoming>>> + Send + 'static
    where
        S: Next<Attempt, Response<Incoming>>,
    {
        let breaker = for_route(&self.breakers, &attempt.route, &self.metrics);
        async move {
            let Some(breaker) = breaker else {
                return call_next(next, attempt).await;
            };
            let permit = breaker.permit().ok_or_else(|| EgressError::CircuitOpen {
                upstream: attempt.route.name.clone(),
            })?;
            let result = call_next(next, attempt).await;
            match &result {
                Ok(response) if !response.status().is_server_error() => permit.success(),
                _ => permit.failure(),
            }
            result
        }
    }
}
