//! Request metrics for the State API: calls per method and gRPC status, and
//! their latency, as one tower layer on the server (dashboards and alerts
//! read `statefabric_sidecar_rpc_requests_total` and
//! `statefabric_sidecar_rpc_duration_seconds`).
//!
//! Written here rather than taken from a crate: the tower/tonic metrics
//! crates export through the `metrics` facade or OpenTelemetry, while every
//! metric of ours is in the one prometheus-client registry.
//!
//! The status is read from the response headers: tonic answers an error as
//! a trailers-only response (the status in the headers), and a unary call's
//! handler has finished when its headers go out, so unary calls are counted
//! exactly. A stream is counted when it opens, with the time to open it; an
//! error that ends it later is not in these numbers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    /// `Service/Method`, e.g. `Events/Append`.
    method: &'static str,
    /// The gRPC status code's name, e.g. `Ok`, `Aborted`.
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ])
}

/// The metric families; cheap to clone (shared).
#[derive(Debug, Clone)]
pub(crate) struct RpcMetrics {
    calls: Family<CallLabels, Counter>,
    duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    /// Method names as labels, made once per method: a call allocates
    /// nothing to be counted. Only methods the server implements get in
    /// (an unknown path is answered UNIMPLEMENTED and counted under
    /// `unimplemented`), so the set is bounded by the API.
    methods: Arc<RwLock<HashMap<String, &'static str>>>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            methods: Arc::default(),
        }
    }
}

impl RpcMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "sidecar_rpc_requests",
            "State API calls by method and gRPC status (streams: when opened)",
            self.calls.clone(),
        );
        registry.register(
            "sidecar_rpc_duration_seconds",
            "State API call latency to the response headers, by method",
            self.duration.clone(),
        );
    }

    fn record(&self, path: &str, code: tonic::Code, took: f64) {
        let method = if code == tonic::Code::Unimplemented {
            "unimplemented"
        } else {
            self.method(path)
        };
        self.duration
            .get_or_create(&MethodLabel { method })
            .observe(took);
        self.calls
            .get_or_create(&CallLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    fn method(&self, path: &str) -> &'static str {
        let known = self
            .methods
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(path)
            .copied();
        known.unwrap_or_else(|| {
            let name: &'static str = Box::leak(method_of(path).into_boxed_str());
            self.methods
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(path.to_owned())
                .or_insert(name);
            name
        })
    }
}

/// `/statefabric.v1.Events/Append` → `Events/Append`: the package adds
/// nothing a dashboard needs.
fn method_of(path: &str) -> String {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, method)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{method}")
        }
        None => path.to_owned(),
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn code_of(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

#[derive(Debug, Clone)]
pub(crate) struct RpcMetricsLayer(pub RpcMetrics);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The path is copied only on the first call of a method (`record`
        // looks it up by reference); the copy here is an `Arc` bump.
        let path = request.uri().path_and_query().cloned();
        let metrics = self.metrics.clone();
        let began = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(response) => code_of(response.headers()),
                Err(_) => tonic::Code::Internal,
            };
            let path = path.as_ref().map_or("", |p| p.path());
            metrics.record(path, code, began.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_lose_their_package_and_codes_come_from_the_headers() {
        assert_eq!(method_of("/statefabric.v1.Events/Append"), "Events/Append");
        assert_eq!(method_of("/grpc.health.v1.Health/Check"), "Health/Check");
        let mut headers = http::HeaderMap::new();
        assert_eq!(code_of(&headers), tonic::Code::Ok);
        headers.insert("grpc-status", http::HeaderValue::from_static("10"));
        assert_eq!(code_of(&headers), tonic::Code::Aborted);
    }

    #[test]
    fn a_call_is_counted_by_method_and_code() {
        let metrics = RpcMetrics::default();
        metrics.record(
            "/statefabric.state.v1.Locks/Acquire",
            tonic::Code::Aborted,
            0.002,
        );
        metrics.record(
            "/statefabric.state.v1.Locks/Nope",
            tonic::Code::Unimplemented,
            0.001,
        );
        let mut registry = Registry::with_prefix("statefabric");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains(
                r#"statefabric_sidecar_rpc_requests_total{method="Locks/Acquire",code="Aborted"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"statefabric_sidecar_rpc_duration_seconds_count{method="Locks/Acquire"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"method="unimplemented",code="Unimplemented"} 1"#),
            "an unknown method is not a label of its own: {text}"
        );
        assert_eq!(metrics.methods.read().expect("lock").len(), 1);
    }
}
