//! The stack's retry step: the call's tries within its deadline (the
//! route's `total`, to the response's headers), retried with exponential
//! backoff and full jitter — or the upstream's `Retry-After` — on the
//! policy's `retryOn` conditions, out of the upstream's retry budget.
//!
//! Retried only when it is safe and possible: the method is idempotent or
//! the request carries an `Idempotency-Key`, and its body is small enough
//! to be kept for a second attempt (a streamed upload goes once). Nothing
//! is retried once a response has been handed on: a retry happens only
//! here, before any of it reaches the agent.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use statefabric_mesh::resiliency::RetryOn;
use tokio::time::Instant;

use super::body::BoxError;
use super::budget::RetryBudget;
use super::errors::{EgressBody, EgressError};
use super::metrics::EgressMetrics;
use super::routes::{RetrySettings, Route};
use super::stack::{Attempt, Call, Next, PerUpstream, RequestBody, Result, Step, call_next};

#[derive(Clone)]
pub(super) struct Retrying {
    /// Request bodies up to this size are kept so a retry can resend them.
    max_body: usize,
    metrics: EgressMetrics,
    budgets: Arc<PerUpstream<Arc<RetryBudget>>>,
}

impl Retrying {
    pub(super) fn new(max_body: usize, metrics: EgressMetrics) -> Self {
        Self {
            max_body,
            metrics,
            budgets: Arc::default(),
        }
    }

    /// The upstream's retry budget with the route's settings (its balance
    /// outlives configuration changes).
    fn budget(&self, route: &Route, retry: &RetrySettings) -> Arc<RetryBudget> {
        let (percent, floor) = (retry.budget_percent, retry.min_retries_per_second);
        self.budgets.get(
            &route.name,
            || Arc::new(RetryBudget::new(percent, floor)),
            |budget| budget.set(percent, floor),
        )
    }
}

/// How one try ended.
enum Tried {
    /// The answer to hand on (success or a final error).
    Done(Result<Response<Incoming>>),
    /// Worth another try, after at least `after`; `last` if not.
    Again {
        reason: &'static str,
        after: Option<Duration>,
        last: Result<Response<Incoming>>,
    },
}

fn judge(result: Result<Response<Incoming>>) -> Tried {
    match result {
        Ok(response) => match response.status() {
            StatusCode::TOO_MANY_REQUESTS => Tried::Again {
                reason: "too_many_requests",
                after: retry_after(response.headers()),
                last: Ok(response),
            },
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Tried::Again {
                reason: "unavailable",
                after: retry_after(response.headers()),
                last: Ok(response),
            },
            _ => Tried::Done(Ok(response)),
        },
        Err(err @ EgressError::Timeout { .. }) => Tried::Again {
            reason: "timeout",
            after: None,
            last: Err(err),
        },
        Err(
            err @ EgressError::Connect {
                unanswered: true, ..
            },
        ) => Tried::Again {
            reason: "connect_error",
            after: None,
            last: Err(err),
        },
        Err(err) => Tried::Done(Err(err)),
    }
}

impl Step<Call> for Retrying {
    type Response = Response<Incoming>;
    type NextRequest = Attempt;
    type NextResponse = Response<Incoming>;

    fn call<S>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Result<Response<Incoming>>> + Send + 'static
    where
        S: Next<Attempt, Response<Incoming>>,
    {
        let this = self.clone();
        async move {
            let Call { route, request } = call;
            let (parts, body) = request.into_parts();
            let retry = route
                .policy
                .retry
                .clone()
                .filter(|_| retry_allowed(&parts.method, &parts.headers));
            // A body kept for retries (or already kept for replay), or
            // streamed once.
            let (kept, mut streamed) = match body {
                RequestBody::Kept(bytes) => (Some(bytes), None),
                body @ RequestBody::Streamed(_)
                    if retry.is_some() && body_fits(&parts.headers, this.max_body) =>
                {
                    (Some(body.into_bytes(&route.name).await?), None)
                }
                RequestBody::Streamed(body) => (None, Some(body)),
            };
            let max_attempts = match (&kept, &retry) {
                (Some(_), Some(r)) => r.max_attempts,
                _ => 1,
            };
            let budget = retry.as_ref().map(|r| this.budget(&route, r));
            if let Some(budget) = &budget {
                budget.deposit();
            }
            let deadline = Instant::now() + route.policy.total;
            let sent = this.metrics.bytes(&route.name, "sent");
            let mut attempt = 1;
            loop {
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
                let mut request = Request::new(body);
                *request.method_mut() = parts.method.clone();
                *request.uri_mut() = parts.uri.clone();
                *request.headers_mut() = parts.headers.clone();
                let tried = call_next(
                    next.clone(),
                    Attempt {
                        route: route.clone(),
                        request,
                        deadline,
                    },
                )
                .await;
                let (reason, after, last) = match judge(tried) {
                    Tried::Done(result) => return result,
                    Tried::Again {
                        reason,
                        after,
                        last,
                    } => (reason, after, last),
                };
                let settings = retry
                    .as_ref()
                    .filter(|r| r.on.contains(&retry_on(reason)) && attempt < max_attempts);
                let Some(settings) = settings else {
                    return last;
                };
                let wait = after.unwrap_or_else(|| backoff(settings, attempt));
                if Instant::now() + wait >= deadline {
                    // Waiting would outlast the call's deadline.
                    return last;
                }
                if budget.as_ref().is_some_and(|b| !b.withdraw()) {
                    this.metrics.budget_exhausted(&route.name);
                    return last;
                }
                this.metrics.retried(&route.name, reason);
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
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
pub(super) fn body_fits(headers: &HeaderMap, max: usize) -> bool {
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

fn backoff(settings: &RetrySettings, attempt: u32) -> Duration {
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
