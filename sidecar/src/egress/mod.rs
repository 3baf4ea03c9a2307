//! The egress path: the agent's own outbound HTTP calls go through its
//! sidecar. The agent calls `http://127.0.0.1:7480/<upstream>/<path>` (what
//! pointing an OpenAI client's `base_url` at the sidecar looks like); the
//! sidecar routes by the mesh configuration's Upstreams ([`routes`]),
//! originates the real connection (pooled per upstream, TLS with rustls and
//! the system's and webpki's roots, HTTP/2 by ALPN or prior knowledge),
//! adds the Upstream's headers, and applies its ResiliencyPolicy
//! ([`forward`]): connect, per-try and total timeouts, an idle timeout
//! between chunks of a streamed response ([`body`]), retries with backoff
//! and `Retry-After` for idempotent or keyed requests, a circuit breaker
//! that fails fast. Responses stream through frame by frame. Errors become
//! HTTP answers in one place ([`errors`]).
//!
//! The listener speaks HTTP/1.1 and HTTP/2 without TLS (h2c) on loopback:
//! hyper-util's automatic server.
//!
//! Retries come out of a per-upstream budget ([`budget`]); concurrency,
//! request-rate and model-token limits with a bounded queue shed what they
//! cannot take ([`limits`]; tokens as answers report them, [`usage`]).
//!
//! Keyed requests are answered once and replayed after ([`replay`]);
//! WebSocket and other upgrades are tunnelled ([`upgrade`]).
//!
//! Headers and an Upstream's own CA come from Secrets the control plane
//! resolves ([`routes`]); a route missing one refuses calls.
//!
//! The listener is also a forward proxy for clients that only honour
//! `HTTP_PROXY`/`HTTPS_PROXY`: absolute-form requests to an Upstream's
//! origin take the whole stack, `CONNECT` tunnels to one get
//! connection-level limits only ([`tunnel`]).

mod body;
mod breaker;
mod budget;
mod client;
mod errors;
mod limits;
mod metrics;
mod pool;
mod replay;
mod retry;
pub(crate) mod routes;
mod stack;
mod tunnel;
mod upgrade;
mod usage;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use statefabric_runtime::trace_context;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::Instrument;

pub(crate) use errors::EgressBody;
pub(crate) use metrics::EgressMetrics;
pub(crate) use replay::Replay;

/// The egress path's handle: its routes (hot-swapped) and its stack.
pub(crate) struct Egress {
    routes: Arc<ArcSwap<routes::Routes>>,
    stack: stack::EgressService,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("upstreams", &self.routes.load().names())
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// `max_retry_body`: request bodies up to this size are kept so a retry
    /// (or a replay's fingerprint) can use them. With `replay`, keyed
    /// calls are recorded and replayed.
    pub(crate) fn new(
        tls: rustls::ClientConfig,
        max_retry_body: usize,
        metrics: EgressMetrics,
        replay: Option<Replay>,
    ) -> Self {
        let routes = Arc::new(ArcSwap::from_pointee(routes::Routes::default()));
        let stack = stack::build(stack::Parts {
            routes: routes.clone(),
            clients: Arc::new(client::Clients::new(tls)),
            replay,
            max_retry_body,
            metrics,
        });
        Self { routes, stack }
    }

    /// Replaces the routes; calls in flight finish on the route they took.
    pub(crate) fn set_routes(&self, routes: routes::Routes) {
        self.routes.store(Arc::new(routes));
    }

    /// The agent's call, answered: the upstream's response or the egress
    /// path's own error answer. One client span per call, a child of the
    /// agent's trace context, whose context the upstream request carries on
    /// (it ends when the response's head is back; a streamed body goes on).
    pub(crate) async fn call(&self, request: Request<Incoming>) -> Response<EgressBody> {
        let span = tracing::info_span!(
            "egress",
            otel.kind = "client",
            http.request.method = %request.method(),
            upstream = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        );
        trace_context::continue_from(&span, request.headers());
        let answered = self
            .stack
            .clone()
            .oneshot(request)
            .instrument(span.clone())
            .await;
        // The stack answers its own errors (`errors::Respond`); this is
        // only for the type.
        let response = answered.unwrap_or_else(errors::EgressError::into_response);
        span.record("http.response.status_code", response.status().as_u16());
        response
    }
}

/// The TLS settings upstream connections use: the platform's roots and
/// webpki's, plus `extra_ca` (PEM) when given.
pub(crate) fn tls_config(
    extra_ca: Option<&std::path::Path>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A platform certificate rustls cannot parse is skipped, as
        // browsers do; the others still verify.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading egress.ca_file {}", path.display()))?;
        add_pem(&mut roots, &pem).with_context(|| format!("egress.ca_file {}", path.display()))?;
    }
    client_config(roots)
}

/// TLS settings that trust the certificates of `pem` and nothing else (an
/// Upstream's own CA).
pub(crate) fn tls_config_with_roots(pem: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    add_pem(&mut roots, pem)?;
    anyhow::ensure!(!roots.is_empty(), "holds no PEM certificate");
    client_config(roots)
}

fn add_pem(roots: &mut rustls::RootCertStore, pem: &[u8]) -> anyhow::Result<()> {
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        roots.add(cert?)?;
    }
    Ok(())
}

fn client_config(roots: rustls::RootCertStore) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Serves the egress listener until `stop`; connections in flight finish
/// their current requests.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    egress: Arc<Egress>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "egress accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let egress = egress.clone();
        let service = service_fn(move |request| {
            let egress = egress.clone();
            async move { Ok::<_, std::convert::Infallible>(egress.call(request).await) }
        });
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "egress connection ended");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}
