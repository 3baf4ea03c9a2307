//! The State API's request path outside the services: the span of a call,
//! what is read from its metadata (once, into [`CallMeta`] in the request's
//! extensions) and its deadline. `server.rs` assembles them with per-RPC
//! metrics and load shedding into one stack; `status.rs` turns what they
//! refuse into statuses.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use tonic::Status;
use tower::{Layer, Service};

/// Header idempotency keys are read from.
pub(crate) const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// What a call's metadata says, read once per call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CallMeta {
    /// 1-256 printable ASCII bytes (`idempotency-key`).
    pub idempotency_key: Option<String>,
    /// The caller's W3C `traceparent`, as sent.
    pub traceparent: Option<String>,
    /// Its trace id (32 hex digits), for the audit log.
    pub trace_id: Option<String>,
}

impl CallMeta {
    /// Reads the headers; a malformed idempotency key is refused, naming it.
    pub(crate) fn read(headers: &HeaderMap) -> Result<Self, Status> {
        let idempotency_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
            None => None,
            Some(value) => {
                let key = value.to_str().map_err(|_| {
                    Status::invalid_argument("idempotency-key: must be printable ASCII")
                })?;
                if key.is_empty() || key.len() > 256 {
                    return Err(Status::invalid_argument(format!(
                        "idempotency-key: must be 1 to 256 bytes, got {}",
                        key.len()
                    )));
                }
                Some(key.to_owned())
            }
        };
        let traceparent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let trace_id = traceparent.as_deref().and_then(|header| {
            let trace = header.split('-').nth(1)?;
            (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| trace.to_owned())
        });
        Ok(Self {
            idempotency_key,
            traceparent,
            trace_id,
        })
    }

    /// The call's metadata, as [`CallMetaLayer`] stored it (read from the
    /// request itself should a call arrive without the layer, so a key is
    /// never silently ignored).
    pub(crate) fn of<T>(request: &tonic::Request<T>) -> Result<Self, Status> {
        match request.extensions().get::<Self>() {
            Some(meta) => Ok(meta.clone()),
            None => Self::read(&request.metadata().clone().into_headers()),
        }
    }
}

/// The span of one call (tonic's `trace_fn`): named for the method, a
/// child of the trace context the caller sent.
pub(crate) fn span(request: &Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        otel.kind = "server",
        rpc.method = %request.uri().path(),
    );
    statefabric_runtime::trace_context::continue_from(&span, request.headers());
    span
}

/// Stores the call's [`CallMeta`] in its extensions; a malformed one is
/// answered INVALID_ARGUMENT before any service runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallMetaLayer;

impl<S> Layer<S> for CallMetaLayer {
    type Service = CallMetaService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallMetaService(inner)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CallMetaService<S>(S);

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<Request<B>> for CallMetaService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match CallMeta::read(request.headers()) {
            Ok(meta) => {
                request.extensions_mut().insert(meta);
                Box::pin(self.0.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// Bounds each call by the caller's `grpc-timeout`, at most `self.0`. The
/// call is ended a little before the caller's deadline (a tenth of it, at
/// most 10 ms): tonic's own timer, outside this stack, would otherwise drop
/// it at the deadline itself, answered CANCELLED and uncounted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeadlineLayer(pub Duration);

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            most: self.0,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DeadlineService<S> {
    inner: S,
    most: Duration,
}

/// A call that ran past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the call's deadline of {0:?} passed")]
pub(crate) struct DeadlinePassed(pub Duration);

impl<S, B> Service<Request<B>> for DeadlineService<S>
where
    S: Service<Request<B>>,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = BoxFuture<S::Response, tower::BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = grpc_timeout(request.headers()).map_or(self.most, |t| {
            let margin = (t / 10).min(Duration::from_millis(10));
            (t - margin).min(self.most)
        });
        let call = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(DeadlinePassed(limit).into()),
            }
        })
    }
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_junk_is_ignored() {
        let cases = [
            ("2H", Some(Duration::from_secs(7200))),
            ("3M", Some(Duration::from_secs(180))),
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("123456789S", None),
            ("S", None),
            ("10x", None),
        ];
        for (value, expected) in cases {
            assert_eq!(
                grpc_timeout(&headers(&[("grpc-timeout", value)])),
                expected,
                "{value}"
            );
        }
    }

    #[test]
    fn call_metadata_is_read_once_and_bad_keys_are_named() {
        let meta = CallMeta::read(&headers(&[
            ("idempotency-key", "k-1"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ]))
        .expect("valid");
        assert_eq!(meta.idempotency_key.as_deref(), Some("k-1"));
        assert_eq!(
            meta.trace_id.as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let too_long = "k".repeat(257);
        let refused = CallMeta::read(&headers(&[("idempotency-key", too_long.as_str())]))
            .expect_err("too long");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("idempotency-key"));
        let junk = CallMeta::read(&headers(&[("traceparent", "nonsense")])).expect("ignored");
        assert_eq!(junk.trace_id, None);
    }
}
