//! The mutating admission webhook that adds the Statefabric sidecar to pods
//! (`statefabric.io/inject: "true"` on the pod or its namespace).
//!
//! Owns: the annotations it reads and their checks ([`annotations`]), the
//! pure pod-to-patch decision ([`patch`]), the HTTP handler and its answers
//! ([`webhook`]), the Events it records ([`events`]), and the TLS listener
//! with certificate hot-reload ([`tls`]). It does not own the sidecar's behaviour (the `sidecar`
//! crate), its configuration once running (the control plane's mesh
//! configuration), nor the webhook's registration (the chart / test set-up
//! writes the MutatingWebhookConfiguration).
//!
//! The request path: TLS (rustls) → HTTP/1.1 or HTTP/2 (hyper, with a
//! header-read timeout) → a request timeout → `/mutate`.
#![warn(missing_docs)]

pub mod annotations;
pub mod config;
pub mod events;
pub mod patch;
pub mod tls;
pub mod webhook;

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use prometheus_client::metrics::family::Family;
use statefabric_runtime::ServiceContext;
use tower::ServiceExt;

pub use config::InjectorConfig;

/// This replica's name for its Events: the pod name the chart passes as
/// `POD_NAME`, else the host name.
fn instance() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "statefabric-injector".to_owned())
}

/// Serves the webhook until shutdown.
pub async fn serve(ctx: ServiceContext<InjectorConfig>) -> anyhow::Result<()> {
    let config = &ctx.config;
    let ready = ctx.readiness.check("webhook");
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    // Namespaces' labels (the tenant) and annotations (opt-in), watched so
    // a review asks the API server nothing in the common case.
    let (namespaces, writer) = reflector::store::<Namespace>();
    let watch = reflector(
        writer,
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .applied_objects()
    .for_each(|_| async {});
    let stop = ctx.shutdown.token();
    ctx.shutdown.spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = watch => {}
        }
    });
    let reviews = Family::default();
    ctx.register_metrics(|registry| {
        registry.register(
            "injector_reviews",
            "Pod reviews answered, by outcome (injected, unchanged, skipped, denied), reason and dry run",
            reviews.clone(),
        );
    });
    let mut injection = patch::Injection::new(
        config.sidecar_template.clone(),
        config.webhook.fabric_namespace.as_str(),
    );
    if let Some(file) = &config.sidecar_template.control_plane_ca_file {
        let pem = std::fs::read_to_string(file).with_context(|| {
            format!(
                "reading sidecar_template.control_plane_ca_file {}",
                file.display()
            )
        })?;
        injection = injection.with_control_plane_ca(pem);
    }
    let hook = webhook::Webhook {
        injection: Arc::new(injection),
        namespaces,
        events: events::Events::new(client.clone(), instance()),
        client,
        reviews,
    };
    // One request path: a deadline per review, then the router.
    let app = webhook::router(hook).layer(
        tower::ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                |_: tower::BoxError| async {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "the review was not answered in time",
                    )
                },
            ))
            .layer(tower::timeout::TimeoutLayer::new(
                config.webhook.request_timeout,
            )),
    );
    let (tls, reload) = tls::server_config(
        config.webhook.tls_cert.clone(),
        config.webhook.tls_key.clone(),
        config.webhook.tls_reload_interval,
        ctx.shutdown.token(),
    )?;
    ctx.shutdown.spawn(reload);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind(config.webhook.listen)
        .await
        .with_context(|| format!("binding webhook.listen {}", config.webhook.listen))?;
    tracing::info!(listen = %config.webhook.listen, "injector webhook listening (TLS)");
    ready.set(true);
    let header_read_timeout = config.webhook.header_read_timeout;
    let stop = ctx.shutdown.token();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a webhook connection");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that never finishes its handshake is dropped.
            let tls = match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |request| app.clone().oneshot(request));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            if let Err(err) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %err, "webhook connection ended");
            }
        });
    }
}
