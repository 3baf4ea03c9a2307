//! The admin HTTP server every binary runs beside its real API:
//! `/healthz/live`, `/healthz/ready` and `/metrics`.
//!
//! Liveness answers 200 while the process can serve HTTP at all. Readiness is
//! the conjunction of named checks that the binary registers (backends
//! reachable, leader lease held, ...) and turns false as soon as shutdown
//! starts, so a load balancer stops sending new work before the drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// Where the admin endpoints listen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server. In Kubernetes this must be reachable
    /// by the kubelet (the pod IP), so manifests set `0.0.0.0:<port>`.
    pub listen: SocketAddr,
}

impl AdminConfig {
    /// Admin endpoints on 127.0.0.1:`port`.
    pub fn on_port(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

/// Readiness state shared between the admin server and the parts of a binary
/// that know whether they can serve.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<Mutex<ReadinessState>>,
}

#[derive(Debug, Default)]
struct ReadinessState {
    checks: BTreeMap<String, bool>,
    draining: bool,
}

/// One named condition that must hold for the process to be ready.
#[derive(Debug, Clone)]
pub struct ReadinessCheck {
    name: String,
    readiness: Readiness,
}

impl ReadinessCheck {
    /// Reports this check passing (`true`) or failing.
    pub fn set(&self, ready: bool) {
        self.readiness
            .lock()
            .checks
            .insert(self.name.clone(), ready);
    }
}

impl Readiness {
    /// Registers a check that starts out not ready.
    pub fn check(&self, name: impl Into<String>) -> ReadinessCheck {
        let name = name.into();
        self.lock().checks.insert(name.clone(), false);
        ReadinessCheck {
            name,
            readiness: self.clone(),
        }
    }

    /// Marks the process as shutting down: readiness fails from now on.
    pub fn start_draining(&self) {
        self.lock().draining = true;
    }

    /// Ready: not draining, and every registered check passing.
    pub fn is_ready(&self) -> bool {
        let state = self.lock();
        !state.draining && state.checks.values().all(|ok| *ok)
    }

    fn report(&self) -> serde_json::Value {
        let state = self.lock();
        serde_json::json!({
            "ready": !state.draining && state.checks.values().all(|ok| *ok),
            "draining": state.draining,
            "checks": state.checks,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReadinessState> {
        // The state is a plain map: a panic while holding the lock cannot leave
        // it half-updated, so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    registry: Arc<RwLock<Registry>>,
}

/// The admin router, exposed for in-process tests.
pub fn router(readiness: Readiness, registry: Arc<RwLock<Registry>>) -> Router {
    Router::new()
        .route("/healthz/live", get(live))
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            readiness,
            registry,
        })
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<AdminState>) -> Response {
    let status = if state.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(state.readiness.report())).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    let encoded = {
        let registry = state
            .registry
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        encode(&mut body, &registry)
    };
    match encoded {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {err}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get_path(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(
                axum::http::Request::get(path)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_follows_checks_and_draining() {
        let readiness = Readiness::default();
        let registry = Arc::new(RwLock::new(Registry::default()));
        let db = readiness.check("database");

        let (status, body) = get_path(
            router(readiness.clone(), registry.clone()),
            "/healthz/ready",
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"database\":false"), "{body}");

        db.set(true);
        let (status, _) = get_path(
            router(readiness.clone(), registry.clone()),
            "/healthz/ready",
        )
        .await;
        assert_eq!(status, StatusCode::OK);

        readiness.start_draining();
        let (status, body) = get_path(
            router(readiness.clone(), registry.clone()),
            "/healthz/ready",
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"draining\":true"), "{body}");

        // Liveness does not depend on readiness.
        let (status, _) = get_path(router(readiness, registry), "/healthz/live").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let mut registry = Registry::default();
        let counter: prometheus_client::metrics::counter::Counter = Default::default();
        counter.inc();
        registry.register("example_things", "Things counted", counter);
        let (status, body) = get_path(
            router(Readiness::default(), Arc::new(RwLock::new(registry))),
            "/metrics",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("example_things_total 1"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
