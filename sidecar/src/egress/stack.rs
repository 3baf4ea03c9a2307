//! The egress path as one tower stack, assembled in [`build`]: one layer
//! per concern, outermost first, each with the reason it is there. A layer
//! is a [`Stage`]: an async function of the call and the next service, with
//! tower's `Service` boilerplate written once here.
//!
//! What travels down: the agent's `Request<Incoming>` until the route is
//! known, then a [`Call`] (the route, the request with the upstream's URI),
//! and below the retries one [`Attempt`] per try. What comes back: the
//! upstream's `Response<Incoming>` below the body layers, an
//! `Response<EgressBody>` above them, and errors as [`EgressError`] until
//! [`super::errors::respond`] makes them the agent's HTTP answer — the one
//! place that happens.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use super::errors::{EgressBody, EgressError};
use super::routes::Route;
use super::{
    body, breaker, client, errors, limits, metrics, replay, retry, routes, tunnel, upgrade, usage,
};

/// The agent's request body: as it arrives, or already read whole (to be
/// fingerprinted for replay, or resent by a retry).
pub(super) enum RequestBody {
    Streamed(Incoming),
    Kept(Bytes),
}

impl RequestBody {
    /// The whole body (read now if it is still streaming).
    pub(super) async fn into_bytes(self, upstream: &str) -> Result<Bytes> {
        match self {
            Self::Kept(bytes) => Ok(bytes),
            Self::Streamed(body) => Ok(http_body_util::BodyExt::collect(body)
                .await
                .map_err(|e| EgressError::BadRequest {
                    upstream: upstream.to_owned(),
                    reason: e.to_string(),
                })?
                .to_bytes()),
        }
    }
}

/// A call whose upstream is known.
pub(super) struct Call {
    pub route: Arc<Route>,
    /// The agent's request, its URI the upstream's.
    pub request: Request<RequestBody>,
}

/// One try of a call, within the call's deadline.
pub(super) struct Attempt {
    pub route: Arc<Route>,
    pub request: Request<EgressBody>,
    /// The whole call's deadline to the response's headers.
    pub deadline: Instant,
}

pub(super) type Result<T> = std::result::Result<T, EgressError>;

/// What a stage calls next: a service, ready when cloned, that fails with
/// [`EgressError`] (every service of the stack boxes its future).
pub(super) trait Next<Req, Resp>:
    Service<Req, Response = Resp, Error = EgressError, Future = BoxFuture<'static, Result<Resp>>>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, Req, Resp> Next<Req, Resp> for S where
    S: Service<
            Req,
            Response = Resp,
            Error = EgressError,
            Future = BoxFuture<'static, Result<Resp>>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// One concern of the path: what it does with a request, given the next
/// service. Its state is cloned into the future (it outlives the call).
pub(super) trait Step<Req>: Clone + Send + Sync + 'static {
    type Response;
    /// What the next service takes and gives.
    type NextRequest;
    type NextResponse;

    fn call<S>(
        &self,
        request: Req,
        next: S,
    ) -> impl Future<Output = Result<Self::Response>> + Send + 'static
    where
        S: Next<Self::NextRequest, Self::NextResponse>;
}

/// The agent's answer, or why there is none yet.
pub(super) type Answer = Result<Response<EgressBody>>;

/// The next service of a [`CallStep`].
pub(super) trait CallNext: Next<Call, Response<EgressBody>> {}

impl<S: Next<Call, Response<EgressBody>>> CallNext for S {}

/// The usual shape of a step: a routed call in, the agent's answer out, on
/// both sides.
pub(super) trait CallStep: Clone + Send + Sync + 'static {
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static;
}

impl<T: CallStep> Step<Call> for T {
    type Response = Response<EgressBody>;
    type NextRequest = Call;
    type NextResponse = Response<EgressBody>;

    fn call<S>(&self, call: Call, next: S) -> impl Future<Output = Answer> + Send + 'static
    where
        S: Next<Call, Response<EgressBody>>,
    {
        CallStep::call(self, call, next)
    }
}

/// A [`Step`] as a tower service over the next one. Both are behind an
/// `Arc`, so a call clones two pointers — not the whole stack below it,
/// which every call would otherwise copy once per layer.
pub(super) struct Stage<T, S> {
    step: Arc<T>,
    inner: Arc<S>,
}

impl<T, S> Clone for Stage<T, S> {
    fn clone(&self) -> Self {
        Self {
            step: self.step.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<T, S, Req> Service<Req> for Stage<T, S>
where
    T: Step<Req>,
    S: Next<T::NextRequest, T::NextResponse>,
{
    type Response = T::Response;
    type Error = EgressError;
    type Future = BoxFuture<'static, Result<T::Response>>;

    /// Always ready: a step calls a clone of the next service.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        Box::pin(self.step.call(request, S::clone(&self.inner)))
    }
}

/// A [`Step`] as a layer.
#[derive(Clone)]
pub(super) struct StageLayer<T>(T);

impl<T: Clone, S> tower::Layer<S> for StageLayer<T> {
    type Service = Stage<T, S>;

    fn layer(&self, inner: S) -> Stage<T, S> {
        Stage {
            step: Arc::new(self.0.clone()),
            inner: Arc::new(inner),
        }
    }
}

pub(super) fn stage<T>(step: T) -> StageLayer<T> {
    StageLayer(step)
}

/// Calls the next service (ready by construction).
pub(super) async fn call_next<S, Req, Resp>(next: S, request: Req) -> Result<Resp>
where
    S: Next<Req, Resp>,
{
    tower::ServiceExt::oneshot(next, request).await
}

/// Everything the layers keep between calls.
pub(super) struct Parts {
    pub routes: Arc<arc_swap::ArcSwap<routes::Routes>>,
    pub clients: Arc<client::Clients>,
    pub replay: Option<replay::Replay>,
    pub max_retry_body: usize,
    pub metrics: metrics::EgressMetrics,
}

/// Never fails: errors are answers by the time they leave it.
pub(super) type EgressService =
    BoxCloneSyncService<Request<Incoming>, Response<EgressBody>, EgressError>;

/// The egress path, outermost first.
pub(super) fn build(parts: Parts) -> EgressService {
    let Parts {
        routes,
        clients,
        replay,
        max_retry_body,
        metrics,
    } = parts;
    let limiters = Arc::new(limits::Limiters::default());
    let breakers = Arc::new(breaker::Breakers::default());
    let service = ServiceBuilder::new()
        // Errors become the agent's HTTP answer (and a log line) here, and only here.
        .layer(stage(errors::Respond))
        // The upstream the path names and its URI; 404 listing the known ones.
        .layer(stage(routes::Routing(routes)))
        // Counted per upstream with the status the agent gets, the sidecar's own answers too.
        .layer(stage(metrics::Observe(metrics.clone())))
        // A route missing a Secret it needs sends nothing: 503 naming it.
        .layer(stage(routes::RefuseUnusable))
        // CONNECT (the forward-proxy mode) leaves here for a TCP tunnel, with connection-level limits only.
        .layer(stage(tunnel::Tunnels::new(
            limiters.clone(),
            breakers.clone(),
            metrics.clone(),
        )))
        // Upgrades (WebSocket) leave here for a tunnel of their own.
        .layer(stage(upgrade::Upgrades(clients.clone())))
        // Keyed calls go once; their answer is recorded and replayed after.
        .layer(stage(replay::Replaying::new(
            replay,
            max_retry_body,
            metrics.clone(),
        )))
        // The model tokens an answer reports come off the upstream's balance.
        .layer(stage(usage::Metering::new(
            limiters.clone(),
            metrics.clone(),
        )))
        // Concurrency, rate and token limits: a bounded wait, or shed with Retry-After.
        .layer(stage(limits::Limiting::new(limiters, metrics.clone())))
        // Bodies stream through, cut after the idle timeout, counted.
        .layer(stage(body::Streaming(metrics.clone())))
        // Retries of safe calls within the budget and the call's deadline.
        .layer(stage(retry::Retrying::new(max_retry_body, metrics.clone())))
        // The circuit breaker: fail fast while the upstream keeps failing.
        .layer(stage(breaker::Breaking::new(breakers, metrics)))
        // One try over the upstream's pooled connection, under its per-try timeout.
        .service(client::UpstreamService::new(clients));
    BoxCloneSyncService::new(service)
}

/// State kept per upstream (a pool, a breaker, a budget, a limiter): made
/// on first use, brought up to the route's settings on every other, and
/// kept across configuration changes.
pub(super) struct PerUpstream<T>(std::sync::Mutex<std::collections::HashMap<String, T>>);

impl<T> Default for PerUpstream<T> {
    fn default() -> Self {
        Self(std::sync::Mutex::default())
    }
}

impl<T: Clone> PerUpstream<T> {
    pub(super) fn get(
        &self,
        upstream: &str,
        make: impl FnOnce() -> T,
        refresh: impl FnOnce(&mut T),
    ) -> T {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get_mut(upstream) {
            Some(entry) => {
                refresh(entry);
                entry.clone()
            }
            None => {
                let entry = make();
                map.insert(upstream.to_owned(), entry.clone());
                entry
            }
        }
    }
}
