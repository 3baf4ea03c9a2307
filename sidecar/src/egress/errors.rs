//! Every way the egress path fails, and the one place each becomes the
//! HTTP answer the agent gets ([`Respond`], the stack's outermost layer): a
//! status a client library understands and a JSON body naming the upstream
//! and the reason (never a secret), and a log line.

use std::future::Future;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use super::body::BoxError;
use super::stack::{Next, Result, Step, call_next};

pub(crate) type EgressBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub(super) enum EgressError {
    #[error("no upstream is named in the path; call /<upstream>/<path>")]
    NoUpstream { known: Vec<String> },
    #[error("unknown upstream {name}")]
    UnknownUpstream { name: String, known: Vec<String> },
    #[error(
        "upstream {upstream}: the circuit breaker is open after repeated failures; failing fast"
    )]
    CircuitOpen { upstream: String },
    #[error("upstream {upstream} is not usable: {reason}")]
    Unusable { upstream: String, reason: String },
    #[error("upstream {upstream}: cannot connect: {reason}")]
    Connect {
        upstream: String,
        reason: String,
        /// Nothing came back (no connection, or reset before an answer):
        /// a safe call may go again.
        unanswered: bool,
    },
    #[error("upstream {upstream}: no response within {seconds:.3}s")]
    Timeout { upstream: String, seconds: f64 },
    #[error("upstream {upstream}: the request could not be sent: {reason}")]
    BadRequest { upstream: String, reason: String },
    #[error(
        "upstream {upstream}: this task key or Idempotency-Key was used for a different request; use a new key"
    )]
    KeyReused { upstream: String },
    #[error("upstream {upstream}: {what}; try again in {}s", retry_after_seconds(*.retry_after))]
    Shed {
        upstream: String,
        /// Over the request rate (429), rather than out of slots (503).
        rate: bool,
        what: &'static str,
        retry_after: std::time::Duration,
    },
}

/// Whole seconds, at least one (what `Retry-After` can say).
fn retry_after_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl EgressError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Self::NoUpstream { .. } | Self::UnknownUpstream { .. } => StatusCode::NOT_FOUND,
            Self::CircuitOpen { .. } | Self::Unusable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::KeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Shed { rate: true, .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Shed { rate: false, .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::NoUpstream { .. } => "no_upstream",
            Self::UnknownUpstream { .. } => "unknown_upstream",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Unusable { .. } => "upstream_unusable",
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::BadRequest { .. } => "bad_request",
            Self::KeyReused { .. } => "key_reused",
            Self::Shed { rate: true, .. } => "rate_limited",
            Self::Shed { rate: false, .. } => "overloaded",
        }
    }

    /// The answer to the agent.
    pub(super) fn into_response(self) -> Response<EgressBody> {
        let mut body = json!({
            "error": {"type": self.kind(), "message": self.to_string()},
        });
        if let Self::NoUpstream { known } | Self::UnknownUpstream { known, .. } = &self {
            body["upstreams"] = json!(known);
        }
        let mut response = Response::new(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if let Self::Shed { retry_after, .. } = &self
            && let Ok(value) =
                header::HeaderValue::from_str(&retry_after_seconds(*retry_after).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        // Marks answers the sidecar made, as opposed to the upstream's.
        response.headers_mut().insert(
            "x-statefabric-egress-error",
            header::HeaderValue::from_static(self.kind()),
        );
        response
    }
}

/// Turns the path's errors into answers, logging each failed call with its
/// upstream and reason.
#[derive(Debug, Clone, Copy)]
pub(super) struct Respond;

impl Step<http::Request<hyper::body::Incoming>> for Respond {
    type Response = Response<EgressBody>;
    type NextRequest = http::Request<hyper::body::Incoming>;
    type NextResponse = Response<EgressBody>;

    // Not `async fn`: the future must not borrow the step ('static).
    #[allow(clippy::manual_async_fn)]
    fn call<S>(
        &self,
        request: http::Request<hyper::body::Incoming>,
        next: S,
    ) -> impl Future<Output = Result<Response<EgressBody>>> + Send + 'static
    where
        S: Next<Self::NextRequest, Self::NextResponse>,
    {
        async move {
            Ok(match call_next(next, request).await {
                Ok(response) => response,
                Err(err) => {
                    match &err {
                        EgressError::NoUpstream { .. } | EgressError::UnknownUpstream { .. } => {
                            tracing::debug!(error = %err, "egress call to no known upstream");
                        }
                        _ => tracing::warn!(error = %err, "egress call failed"),
                    }
                    err.into_response()
                }
            })
        }
    }
}
