//! One call from the agent to an upstream: route, breaker, attempts with
//! their timeouts, retries with backoff and `Retry-After`, and the response
//! streamed back under the idle timeout. Read top to bottom in
//! [`Egress::call`]; each step is a function below it.
//!
//! Retried only when it is safe and possible: the method is idempotent or
//! the request carries an `Idempotency-Key`, and its body is small enough
//! to be kept for a second attempt (a streamed upload goes once). Nothing
//! is retried once a response has been handed to the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use statefabric_mesh::resiliency::RetryOn;
use statefabric_mesh::upstream::Protocol;
use statefabric_resilience::{Breaker, BreakerConfig};
use statefabric_runtime::trace_context;
use tokio::time::Instant;
use tracing::Instrument;

use super::body::{BoxError, IdleBody};
use super::budget::RetryBudget;
use super::errors::{EgressBody, EgressError};
use super::limits::{LimitSettings, Limiter, Shed};
use super::metrics::EgressMetrics;
use super::replay::{self, Recording, Replay};
use super::routes::{Route, RouteTls, Routes};
use super::upgrade;
use super::usage::UsageBody;
use statefabric_store::replay::Recorded;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
type UpstreamClient = Client<Connector, EgressBody>;

/// Hop-by-hop headers (RFC 9110 §7.6.1): this connection's, not the
/// upstream's.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// The egress path's state: the routes (hot-swapped), a pooled client per
/// upstream, a breaker per upstream (kept across configuration changes).
pub struct Egress {
    routes: ArcSwap<Routes>,
    clients: Mutex<HashMap<String, (ClientKey, UpstreamClient)>>,
    breakers: Mutex<HashMap<String, Breaker>>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    limiters: Mutex<HashMap<String, Arc<Limiter>>>,
    replay: Option<Replay>,
    tls: Arc<rustls::ClientConfig>,
    /// Request bodies up to this size are kept so a retry can resend them.
    pub max_retry_body: usize,
    pub metrics: EgressMetrics,
}

/// What a pooled client is built for; a route that changes it gets a new
/// client (and pool).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientKey {
    connect: Duration,
    protocol: Protocol,
    tls: Option<Arc<RouteTls>>,
}

/// The agent's request body: as it arrives, or already read whole.
enum RequestBody {
    Streamed(Incoming),
    Kept(Bytes),
}

enum Replayed {
    Answer(Response<EgressBody>),
    Call {
        body: RequestBody,
        /// Where to record the answer, and the request's fingerprint.
        recording: Option<(Replay, String, String)>,
    },
}

async fn collect(route: &Route, body: Incoming) -> Result<Bytes, EgressError> {
    Ok(body
        .collect()
        .await
        .map_err(|e| EgressError::BadRequest {
            upstream: route.name.clone(),
            reason: e.to_string(),
        })?
        .to_bytes())
}

enum Attempt {
    /// A response to hand to the agent (success or a final error status).
    Done(Response<Incoming>),
    /// Worth another attempt, after at least this long.
    Retry {
        reason: &'static str,
        after: Option<Duration>,
        last: Result<Response<Incoming>, EgressError>,
    },
    Failed(EgressError),
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("upstreams", &self.routes.load().names())
            .finish_non_exhaustive()
    }
}

impl Egress {
    pub fn new(tls: rustls::ClientConfig, max_retry_body: usize, metrics: EgressMetrics) -> Self {
        Self {
            routes: ArcSwap::from_pointee(Routes::default()),
            clients: Mutex::default(),
            breakers: Mutex::default(),
            budgets: Mutex::default(),
            limiters: Mutex::default(),
            replay: None,
            tls: Arc::new(tls),
            max_retry_body,
            metrics,
        }
    }

    /// Records answers to keyed requests and replays them.
    pub fn with_replay(self, replay: Replay) -> Self {
        Self {
            replay: Some(replay),
            ..self
        }
    }

    /// Replaces the routes; calls in flight finish on the route they took.
    pub fn set_routes(&self, routes: Routes) {
        self.routes.store(Arc::new(routes));
    }

    /// The agent's call, answered: the upstream's response or the egress
    /// path's own error answer. One client span per call, a child of the
    /// agent's trace context, whose context the upstream request carries on
    /// (it ends when the response's head is back; a streamed body goes on).
    pub async fn call(&self, request: Request<Incoming>) -> Response<EgressBody> {
        let span = tracing::info_span!(
            "egress",
            otel.kind = "client",
            http.request.method = %request.method(),
            upstream = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        );
        trace_context::continue_from(&span, request.headers());
        let response = self.answer(request).instrument(span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        response
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<EgressBody> {
        let began = Instant::now();
        let routes = self.routes.load_full();
        let (route, uri) = match route_of(&routes, request.uri()) {
            Ok(found) => found,
            Err(err) => return err.into_response(),
        };
        tracing::Span::current().record("upstream", route.name.as_str());
        if let Some(reason) = &route.unusable {
            let err = EgressError::Unusable {
                upstream: route.name.clone(),
                reason: reason.clone(),
            };
            tracing::warn!(upstream = %route.name, error = %err, "egress call refused");
            let response = err.into_response();
            self.metrics
                .observe(&route.name, response.status(), began.elapsed());
            return response;
        }
        if upgrade::requested(request.headers()) {
            let response = match self.upgrade(&route, uri, request).await {
                Ok(response) => response,
                Err(err) => {
                    tracing::warn!(upstream = %route.name, error = %err, "egress upgrade failed");
                    err.into_response()
                }
            };
            self.metrics
                .observe(&route.name, response.status(), began.elapsed());
            return response;
        }
        let (parts, body) = request.into_parts();
        let (body, recording) = match self.replayed(&route, &uri, &parts, body).await {
            Ok(Replayed::Answer(response)) => {
                self.metrics.replayed(&route.name);
                self.metrics
                    .observe(&route.name, response.status(), began.elapsed());
                return response;
            }
            Ok(Replayed::Call { body, recording }) => (body, recording),
            Err(err) => return err.into_response(),
        };
        let outcome = match self.admit(&route).await {
            Ok(slot) => self
                .forward(&route, uri, &parts, body)
                .await
                .map(|response| (response, slot)),
            Err(err) => Err(err),
        };
        let response = match outcome {
            Ok((response, slot)) => {
                let status = response.status();
                let head = replay::kept_headers(response.headers());
                let received = self.metrics.bytes(&route.name, "received");
                let response = response.map(|body| {
                    IdleBody::new(body, route.policy.idle, route.name.clone(), slot)
                        .counted(received)
                        .boxed()
                });
                let response = match recording {
                    Some((replay, key, fingerprint)) if replay::recordable(status) => {
                        let record = Recorded {
                            fingerprint,
                            status: status.as_u16(),
                            headers: head,
                            body: Vec::new(),
                        };
                        response.map(|body| Recording::new(body, replay, key, record).boxed())
                    }
                    _ => response,
                };
                self.metered(&route, response)
            }
            Err(err) => {
                tracing::warn!(upstream = %route.name, error = %err, "egress call failed");
                err.into_response()
            }
        };
        self.metrics
            .observe(&route.name, response.status(), began.elapsed());
        response
    }

    /// A protocol upgrade: the handshake over HTTP/1.1 within the route's
    /// timeouts, then the two connections joined (see [`upgrade`]).
    async fn upgrade(
        &self,
        route: &Route,
        uri: Uri,
        mut request: Request<Incoming>,
    ) -> Result<Response<EgressBody>, EgressError> {
        let agent_side = hyper::upgrade::on(&mut request);
        let headers = upstream_headers(request.headers(), route);
        let upstream =
            upgrade::upstream_request(headers, request.headers(), request.method().clone(), uri);
        // HTTP/1.1 only (an upgrade is an HTTP/1.1 affair), in a pool of its
        // own so the route's usual client is left as it is.
        let client = self.client(&Route {
            name: format!("{}#upgrade", route.name),
            protocol: Protocol::Http1,
            ..route.clone()
        });
        let limit = route
            .policy
            .per_try
            .map_or(route.policy.total, |t| t.min(route.policy.total));
        let response = tokio::time::timeout(limit, client.request(upstream))
            .await
            .map_err(|_| EgressError::Timeout {
                upstream: route.name.clone(),
                seconds: limit.as_secs_f64(),
            })?
            .map_err(|err| EgressError::Connect {
                upstream: route.name.clone(),
                reason: source_chain(&err),
            })?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused: the upstream's answer goes back as it is.
            return Ok(response.map(|body| {
                IdleBody::new(body, route.policy.idle, route.name.clone(), None).boxed()
            }));
        }
        upgrade::join(route, agent_side, response)
    }

    /// With replay on and a key on the request: the recorded answer for the
    /// same request, 422 for another request under the key, or the call to
    /// make (its body kept) and where to record its answer.
    async fn replayed(
        &self,
        route: &Route,
        uri: &Uri,
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Result<Replayed, EgressError> {
        let keyed = self
            .replay
            .as_ref()
            .zip(replay::key_of(&parts.headers, &route.name))
            .filter(|_| body_fits(&parts.headers, self.max_retry_body));
        let Some((replay, key)) = keyed else {
            return Ok(Replayed::Call {
                body: RequestBody::Streamed(body),
                recording: None,
            });
        };
        let bytes = collect(route, body).await?;
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        let fingerprint = replay::fingerprint(&parts.method, &route.name, path, &bytes);
        match replay.store.get(&replay.tenant, &key).await {
            Ok(Some(record)) if record.fingerprint == fingerprint => {
                return Ok(Replayed::Answer(replay::answer(record)));
            }
            Ok(Some(_)) => {
                return Err(EgressError::KeyReused {
                    upstream: route.name.clone(),
                });
            }
            Ok(None) => {}
            // The record cannot be read: the call goes through unrecorded
            // rather than fail.
            Err(err) => {
                tracing::warn!(upstream = %route.name, error = %err, "replay records unavailable");
                return Ok(Replayed::Call {
                    body: RequestBody::Kept(bytes),
                    recording: None,
                });
            }
        }
        Ok(Replayed::Call {
            body: RequestBody::Kept(bytes),
            recording: Some((replay.clone(), key, fingerprint)),
        })
    }

    /// Past the upstream's limits, or shed with when to come back.
    async fn admit(
        &self,
        route: &Route,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, EgressError> {
        let Some(settings) = route.policy.limit else {
            return Ok(None);
        };
        let limiter = self.limiter(route, settings);
        let queued = self.metrics.queued(&route.name);
        queued.inc();
        let admitted = limiter.admit().await;
        queued.dec();
        admitted.map_err(|shed| {
            self.metrics.shed(&route.name);
            let (rate, what, retry_after) = match shed {
                Shed::Rate { retry_after } => (true, "over its request rate", retry_after),
                Shed::Busy { retry_after } => (
                    false,
                    "every slot is busy and the queue is full",
                    retry_after,
                ),
            };
            EgressError::Shed {
                upstream: route.name.clone(),
                rate,
                what,
                retry_after,
            }
        })
    }

    /// The upstream's limiter with the route's settings.
    fn limiter(&self, route: &Route, settings: LimitSettings) -> Arc<Limiter> {
        per_upstream(
            &self.limiters,
            &route.name,
            || Arc::new(Limiter::new(settings)),
            |limiter| {
                if limiter.settings() != settings {
                    // New limits for new calls; calls in flight keep their slots.
                    *limiter = Arc::new(Limiter::new(settings));
                }
            },
        )
    }

    /// Under a tokens-per-minute limit, the model tokens the answer reports
    /// are taken off the upstream's balance when it ends.
    fn metered(&self, route: &Route, response: Response<EgressBody>) -> Response<EgressBody> {
        let Some(settings) = route.policy.limit.filter(|l| l.tokens_per_minute.is_some()) else {
            return response;
        };
        let limiter = self.limiter(route, settings);
        let counted = self.metrics.tokens(&route.name);
        let (parts, body) = response.into_parts();
        let body = match UsageBody::new(body, &parts.headers, move |usage| {
            counted.inc_by(usage.tokens());
            limiter.spend_tokens(usage.tokens());
        }) {
            Ok(metered) => metered.boxed(),
            Err(body) => body,
        };
        Response::from_parts(parts, body)
    }

    async fn forward(
        &self,
        route: &Route,
        uri: Uri,
        parts: &http::request::Parts,
        body: RequestBody,
    ) -> Result<Response<Incoming>, EgressError> {
        let headers = upstream_headers(&parts.headers, route);
        let retry = route
            .policy
            .retry
            .as_ref()
            .filter(|_| retry_allowed(&parts.method, &parts.headers));
        // A body kept for retries (or already kept for replay), or streamed once.
        let (kept, mut streamed) = match body {
            RequestBody::Kept(bytes) => (Some(bytes), None),
            RequestBody::Streamed(body)
                if retry.is_some() && body_fits(&parts.headers, self.max_retry_body) =>
            {
                (Some(collect(route, body).await?), None)
            }
            RequestBody::Streamed(body) => (None, Some(body)),
        };
        let max_attempts = if kept.is_some() {
            retry.map_or(1, |r| r.max_attempts)
        } else {
            1
        };
        let client = self.client(route);
        let breaker = self.breaker(route);
        let budget = retry.map(|r| self.budget(route, r));
        if let Some(budget) = &budget {
            budget.deposit();
        }
        let deadline = Instant::now() + route.policy.total;
        let sent = self.metrics.bytes(&route.name, "sent");
        let mut attempt = 1;
        loop {
            let permit = match &breaker {
                Some(b) => Some(b.permit().ok_or_else(|| EgressError::CircuitOpen {
                    upstream: route.name.clone(),
                })?),
                None => None,
            };
            let body: EgressBody = match (&kept, streamed.take()) {
                (Some(bytes), _) => {
                    sent.inc_by(bytes.len() as u64);
                    Full::new(bytes.clone())
                        .map_err(|never| match never {})
                        .boxed()
                }
                (None, Some(body)) => {
                    let sent = sent.clone();
                    body.map_frame(move |frame| {
                        if let Some(data) = frame.data_ref() {
                            sent.inc_by(data.len() as u64);
                        }
                        frame
                    })
                    .map_err(BoxError::from)
                    .boxed()
                }
                (None, None) => Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            };
            let mut upstream = Request::new(body);
            *upstream.method_mut() = parts.method.clone();
            *upstream.uri_mut() = uri.clone();
            *upstream.headers_mut() = headers.clone();
            let outcome = self.attempt(&client, route, upstream, deadline).await;
            let failed = match &outcome {
                Attempt::Done(r) => r.status().is_server_error(),
                Attempt::Retry { reason, .. } => *reason != "too_many_requests",
                Attempt::Failed(_) => true,
            };
            if let Some(permit) = permit {
                if failed {
                    permit.failure()
                } else {
                    permit.success()
                }
            }
            match outcome {
                Attempt::Done(response) => return Ok(response),
                Attempt::Failed(err) => return Err(err),
                Attempt::Retry {
                    reason,
                    after,
                    last,
                } => {
                    let settings = retry.filter(|r| r.on.contains(&retry_on(reason)));
                    let Some(settings) = settings.filter(|_| attempt < max_attempts) else {
                        return last;
                    };
                    let wait = after.unwrap_or_else(|| backoff(settings, attempt));
                    if Instant::now() + wait >= deadline {
                        // Waiting would outlast the call's deadline.
                        return last;
                    }
                    if budget.as_ref().is_some_and(|b| !b.withdraw()) {
                        self.metrics.budget_exhausted(&route.name);
                        return last;
                    }
                    self.metrics.retried(&route.name, reason);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One attempt, bounded by the per-try timeout and the call's deadline.
    async fn attempt(
        &self,
        client: &UpstreamClient,
        route: &Route,
        request: Request<EgressBody>,
        deadline: Instant,
    ) -> Attempt {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let limit = route.policy.per_try.map_or(remaining, |t| t.min(remaining));
        match tokio::time::timeout(limit, client.request(request)).await {
            Err(_) => {
                let err = EgressError::Timeout {
                    upstream: route.name.clone(),
                    seconds: limit.as_secs_f64(),
                };
                Attempt::Retry {
                    reason: "timeout",
                    after: None,
                    last: Err(err),
                }
            }
            // No connection, or one the upstream reset or closed before it
            // answered: nothing came back, so an idempotent or keyed call
            // may go again (only those are retried at all).
            Ok(Err(err)) if err.is_connect() || unanswered(&err) => Attempt::Retry {
                reason: "connect_error",
                after: None,
                last: Err(EgressError::Connect {
                    upstream: route.name.clone(),
                    reason: source_chain(&err),
                }),
            },
            Ok(Err(err)) => Attempt::Failed(EgressError::Connect {
                upstream: route.name.clone(),
                reason: source_chain(&err),
            }),
            Ok(Ok(response)) => match response.status() {
                StatusCode::TOO_MANY_REQUESTS => Attempt::Retry {
                    reason: "too_many_requests",
                    after: retry_after(response.headers()),
                    last: Ok(response),
                },
                StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => Attempt::Retry {
                    reason: "unavailable",
                    after: retry_after(response.headers()),
                    last: Ok(response),
                },
                _ => Attempt::Done(response),
            },
        }
    }

    fn client(&self, route: &Route) -> UpstreamClient {
        let key = ClientKey {
            connect: route.policy.connect,
            protocol: route.protocol,
            tls: route.tls.clone(),
        };
        let new = || (key.clone(), build_client(&self.tls, &key));
        let (_, client) = per_upstream(&self.clients, &route.name, new, |entry| {
            if entry.0 != key {
                *entry = new();
            }
        });
        client
    }

    /// The upstream's retry budget with the route's settings (its balance
    /// outlives configuration changes).
    fn budget(&self, route: &Route, retry: &super::routes::RetrySettings) -> Arc<RetryBudget> {
        let (percent, floor) = (retry.budget_percent, retry.min_retries_per_second);
        per_upstream(
            &self.budgets,
            &route.name,
            || Arc::new(RetryBudget::new(percent, floor)),
            |budget| budget.set(percent, floor),
        )
    }

    /// The upstream's breaker with the route's settings; `None` without a
    /// breaker policy. Its state outlives configuration changes.
    fn breaker(&self, route: &Route) -> Option<Breaker> {
        let config: BreakerConfig = route.policy.breaker?;
        let breaker = per_upstream(
            &self.breakers,
            &route.name,
            || Breaker::new("egress", config),
            |breaker| {
                if breaker.config() != config {
                    breaker.set_config(config);
                }
            },
        );
        self.metrics.breaker_state(&route.name, breaker.state());
        Some(breaker)
    }
}

/// An upstream's entry in one of the per-upstream maps: made on first use,
/// brought up to the route's settings by `refresh` on every other.
fn per_upstream<T: Clone>(
    map: &Mutex<HashMap<String, T>>,
    upstream: &str,
    make: impl FnOnce() -> T,
    refresh: impl FnOnce(&mut T),
) -> T {
    let mut map = map
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

/// A pooled client for `key`: the Upstream's own roots (its CA alone) or
/// the sidecar's, and its server name when it gives one.
fn build_client(tls: &Arc<rustls::ClientConfig>, key: &ClientKey) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(key.connect));
    http.set_nodelay(true);
    let own = key.tls.as_ref();
    let config = own.and_then(|t| t.client_config.as_ref()).unwrap_or(tls);
    let mut builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((**config).clone())
        .https_or_http();
    if let Some(name) = own.and_then(|t| t.server_name.clone()) {
        builder =
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let connector = match key.protocol {
        Protocol::Http1 => builder.enable_http1().wrap_connector(http),
        Protocol::Http2 => builder.enable_http2().wrap_connector(http),
        Protocol::Auto => builder.enable_all_versions().wrap_connector(http),
    };
    let mut client = Client::builder(TokioExecutor::new());
    client.pool_idle_timeout(Duration::from_secs(90));
    if key.protocol == Protocol::Http2 {
        // Prior knowledge: h2c for http:// upstreams, ALPN h2 for https.
        client.http2_only(true);
    }
    client.build(connector)
}

/// `/<upstream>/<rest>?<query>` → the route and the upstream's URI.
fn route_of(routes: &Routes, uri: &Uri) -> Result<(Arc<Route>, Uri), EgressError> {
    let known = || routes.names().into_iter().map(str::to_owned).collect();
    let path = uri.path().trim_start_matches('/');
    let (name, rest) = path.split_once('/').unwrap_or((path, ""));
    if name.is_empty() {
        return Err(EgressError::NoUpstream { known: known() });
    }
    let Some(route) = routes.get(name) else {
        return Err(EgressError::UnknownUpstream {
            name: name.to_owned(),
            known: known(),
        });
    };
    let mut target = format!("{}/{rest}", route.base_path);
    if let Some(query) = uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = route.origin.clone().into_parts();
    parts.path_and_query =
        Some(
            target
                .parse()
                .map_err(|e: http::uri::InvalidUri| EgressError::BadRequest {
                    upstream: route.name.clone(),
                    reason: e.to_string(),
                })?,
        );
    let uri = Uri::from_parts(parts).map_err(|e| EgressError::BadRequest {
        upstream: route.name.clone(),
        reason: e.to_string(),
    })?;
    Ok((route.clone(), uri))
}

/// The agent's headers without hop-by-hop ones and `Host` (the client sets
/// it from the URI), plus the route's own, and the egress span's trace
/// context (when traces are exported; else the agent's goes on as it was).
fn upstream_headers(agent: &HeaderMap, route: &Route) -> HeaderMap {
    let mut headers = agent.clone();
    headers.remove(header::HOST);
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for (name, value) in &route.headers {
        headers.insert(name.clone(), value.clone());
    }
    trace_context::inject(&tracing::Span::current(), &mut headers);
    headers
}

/// Idempotent methods (RFC 9110 §9.2.2), or a request carrying a key.
fn retry_allowed(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || headers.contains_key("idempotency-key")
}

/// Whether the body is known to be at most `max` bytes (its length is
/// declared, or it has none), so it can be kept for a second attempt.
fn body_fits(headers: &HeaderMap, max: usize) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_none_or(|length| length <= max)
}

fn retry_on(reason: &str) -> RetryOn {
    match reason {
        "connect_error" => RetryOn::ConnectError,
        "too_many_requests" => RetryOn::TooManyRequests,
        "timeout" => RetryOn::Timeout,
        _ => RetryOn::Unavailable,
    }
}

/// `Retry-After` in seconds (an HTTP date is not honoured: clocks differ),
/// or OpenAI's `retry-after-ms`.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    number("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| number("retry-after").map(Duration::from_secs_f64))
}

fn backoff(settings: &super::routes::RetrySettings, attempt: u32) -> Duration {
    let jitter = if settings.full_jitter { 1.0 } else { 0.0 };
    statefabric_resilience::backoff::exponential(
        settings.initial_backoff,
        settings.max_backoff,
        2.0,
        jitter,
        attempt,
        fastrand::f64(),
    )
}

/// An error with its causes, for the agent and the log (hyper's own
/// message alone says only "client error (Connect)").
/// The connection was reset or closed before any response came.
fn unanswered(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(hyper) = err.downcast_ref::<hyper::Error>()
            && (hyper.is_incomplete_message() || hyper.is_closed() || hyper.is_canceled())
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        next = err.source();
    }
    false
}

fn source_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_need_an_idempotent_method_or_a_key_and_a_body_that_can_be_kept() {
        let mut headers = HeaderMap::new();
        assert!(retry_allowed(&Method::GET, &headers));
        assert!(!retry_allowed(&Method::POST, &headers));
        headers.insert("idempotency-key", "k1".parse().expect("value"));
        assert!(retry_allowed(&Method::POST, &headers));
        assert!(body_fits(&headers, 10));
        headers.insert(header::CONTENT_LENGTH, "11".parse().expect("value"));
        assert!(!body_fits(&headers, 10));
        headers.insert(header::CONTENT_LENGTH, "10".parse().expect("value"));
        assert!(body_fits(&headers, 10));
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().expect("value"));
        assert!(!body_fits(&headers, 10));
    }

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", "2".parse().expect("value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", "150".parse().expect("value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(150)));
        headers.insert("retry-after-ms", "soon".parse().expect("value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
    }
}
