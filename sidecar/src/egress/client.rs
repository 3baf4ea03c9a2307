//! The bottom of the stack: one try over the upstream's pooled client
//! (TLS with rustls — the sidecar's roots, or the Upstream's own CA and
//! server name —, HTTP/2 by ALPN or prior knowledge; HTTP/1.1-only
//! upstreams on `pool.rs`, whose idle connections become bare sockets),
//! with the agent's
//! headers cleaned of hop-by-hop ones, the Upstream's added, and the
//! egress span's trace context; bounded by the per-try timeout and the
//! call's deadline.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use statefabric_mesh::upstream::Protocol;
use statefabric_runtime::trace_context;
use tokio::time::Instant;

use super::errors::{EgressBody, EgressError};
use super::pool::{self, Http1Pool};
use super::routes::{Route, RouteTls};
use super::stack::{Attempt, PerUpstream};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// An upstream's pooled connections.
#[derive(Clone)]
pub(super) enum UpstreamClient {
    /// hyper-util's pool: HTTP/2 (one connection carries every call), TLS
    /// where ALPN picks the protocol, and upgrades.
    Shared(Arc<Client<Connector, EgressBody>>),
    /// HTTP/1.1 only: connections left idle become bare sockets.
    Http1(Arc<Http1Pool>),
}

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

/// What a pooled client is built for; a route that changes it gets a new
/// client (and pool).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientKey {
    connect: Duration,
    protocol: Protocol,
    tls: Option<Arc<RouteTls>>,
    /// `http://`: no TLS, so no ALPN to offer HTTP/2 by.
    plain: bool,
    /// For `Connection: upgrade` calls: hyper-util's pool, which hands
    /// the upgraded connection over.
    upgrades: bool,
}

/// A pooled client per upstream.
pub(super) struct Clients {
    tls: Arc<rustls::ClientConfig>,
    pools: PerUpstream<(ClientKey, UpstreamClient)>,
}

impl Clients {
    pub(super) fn new(tls: rustls::ClientConfig) -> Self {
        Self {
            tls: Arc::new(tls),
            pools: PerUpstream::default(),
        }
    }

    /// The route's client, made anew when its settings changed.
    pub(super) fn client(&self, route: &Route) -> UpstreamClient {
        self.client_for(route, false)
    }

    /// The client of a route's `Connection: upgrade` calls (HTTP/1.1).
    pub(super) fn upgrade_client(&self, route: &Route) -> UpstreamClient {
        self.client_for(route, true)
    }

    fn client_for(&self, route: &Route, upgrades: bool) -> UpstreamClient {
        let key = ClientKey {
            connect: route.policy.connect,
            protocol: route.protocol,
            tls: route.tls.clone(),
            plain: route.origin.scheme_str() == Some("http"),
            upgrades,
        };
        let new = || (key.clone(), build_client(&self.tls, &key));
        let (_, client) = self.pools.get(&route.name, new, |entry| {
            if entry.0 != key {
                *entry = new();
            }
        });
        client
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
    // HTTP/1.1 for certain: set so, or plain http without prior knowledge
    // of h2c.
    let http1_only =
        key.protocol == Protocol::Http1 || (key.protocol == Protocol::Auto && key.plain);
    let connector = match key.protocol {
        Protocol::Http1 => builder.enable_http1().wrap_connector(http),
        Protocol::Http2 => builder.enable_http2().wrap_connector(http),
        Protocol::Auto => builder.enable_all_versions().wrap_connector(http),
    };
    if http1_only && !key.upgrades {
        return UpstreamClient::Http1(Http1Pool::new(connector));
    }
    let mut client = Client::builder(TokioExecutor::new());
    client.pool_idle_timeout(pool::IDLE_TIMEOUT);
    if key.protocol == Protocol::Http2 {
        // Prior knowledge: h2c for http:// upstreams, ALPN h2 for https.
        client.http2_only(true);
    }
    UpstreamClient::Shared(Arc::new(client.build(connector)))
}

/// The agent's headers made the upstream's, in place: without hop-by-hop
/// ones and `Host` (the client sets it from the URI), with the route's own,
/// and the egress span's trace context (when traces are exported; else the
/// agent's goes on as it was).
pub(super) fn to_upstream(headers: &mut HeaderMap, route: &Route) {
    headers.remove(header::HOST);
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for (name, value) in &route.headers {
        headers.insert(name.clone(), value.clone());
    }
    trace_context::inject(&tracing::Span::current(), headers);
}

/// The leaf service: one try.
#[derive(Clone)]
pub(super) struct UpstreamService {
    clients: Arc<Clients>,
}

impl UpstreamService {
    pub(super) fn new(clients: Arc<Clients>) -> Self {
        Self { clients }
    }
}

impl tower::Service<Attempt> for UpstreamService {
    type Response = Response<Incoming>;
    type Error = EgressError;
    type Future = BoxFuture<'static, Result<Response<Incoming>, EgressError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), EgressError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        let Attempt {
            route,
            mut request,
            deadline,
        } = attempt;
        let client = self.clients.client(&route);
        Box::pin(async move {
            to_upstream(request.headers_mut(), &route);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let limit = route.policy.per_try.map_or(remaining, |t| t.min(remaining));
            send(&client, &route, request, limit).await
        })
    }
}

/// Sends `request` and waits for the response's head at most `limit`.
pub(super) async fn send(
    client: &UpstreamClient,
    route: &Route,
    request: Request<EgressBody>,
    limit: Duration,
) -> Result<Response<Incoming>, EgressError> {
    let sent = async {
        match client {
            UpstreamClient::Shared(client) => client.request(request).await.map_err(|err| {
                let connect = err.is_connect();
                pool::SendError {
                    error: Box::new(err),
                    connect,
                }
            }),
            UpstreamClient::Http1(pool) => pool.request(request).await,
        }
    };
    match tokio::time::timeout(limit, sent).await {
        Err(_) => Err(EgressError::Timeout {
            upstream: route.name.clone(),
            seconds: limit.as_secs_f64(),
        }),
        Ok(Err(err)) => Err(EgressError::Connect {
            upstream: route.name.clone(),
            reason: source_chain(&*err.error),
            // No connection, or one the upstream reset or closed before it
            // answered: nothing came back, so a safe call may go again.
            unanswered: err.connect || unanswered(&*err.error),
        }),
        Ok(Ok(response)) => Ok(response),
    }
}

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

/// An error with its causes, for the agent and the log (hyper's own
/// message alone says only "client error (Connect)").
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
