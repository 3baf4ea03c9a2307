//! Replay of a task's calls: a request carrying a saga task key
//! (`x-statefabric-task-key`, which the SDKs set while a handler runs) or an
//! `Idempotency-Key` has its upstream response recorded in the store, keyed
//! by that key and holding a fingerprint of the request (method, upstream,
//! path and query, body). The same key and request again — the agent
//! re-running a step after a crash — is answered from the record, marked
//! `x-statefabric-replayed: true`, without calling the upstream; the same
//! key with another request is refused (422). Records survive restarts
//! (Postgres, or SQLite embedded) and expire after `egress.replay_ttl`.
//!
//! Recorded: final answers (not 5xx or 429, which a repeat should try
//! again), streamed bodies too, up to `egress.max_replay_body_bytes`; the
//! record is written before the agent sees the body's end. Two requests with
//! the same key at the same moment both reach the upstream, and the first
//! record stands.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use statefabric_domain::TenantId;
use statefabric_store::replay::{Recorded, ReplayStore};

use super::body::BoxError;
use super::errors::{EgressBody, EgressError};
use super::metrics::EgressMetrics;
use super::retry::body_fits;
use super::stack::{Answer, Call, CallNext, CallStep, RequestBody, call_next};

pub(super) const TASK_KEY_HEADER: &str = "x-statefabric-task-key";
pub(super) const REPLAYED_HEADER: &str = "x-statefabric-replayed";

/// Where and how long responses are recorded.
#[derive(Clone)]
pub(crate) struct Replay {
    pub store: Arc<dyn ReplayStore>,
    pub tenant: TenantId,
    pub ttl: Duration,
    pub max_body: usize,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("tenant", &self.tenant)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The record's key: the upstream and the request's task key and/or
/// idempotency key; `None` when it carries neither.
fn key_of(headers: &HeaderMap, upstream: &str) -> Option<String> {
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    let (task, idempotency) = (value(TASK_KEY_HEADER), value("idempotency-key"));
    if task.is_none() && idempotency.is_none() {
        return None;
    }
    Some(format!(
        "{upstream}|{}|{}",
        task.unwrap_or_default(),
        idempotency.unwrap_or_default()
    ))
}

fn fingerprint(method: &http::Method, upstream: &str, path: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b" ");
    hash.update(upstream.as_bytes());
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hex::encode(hash.finalize())
}

/// The recorded answer, as the agent gets it.
fn answer(record: Recorded) -> Response<EgressBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(record.body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() =
        http::StatusCode::from_u16(record.status).unwrap_or(http::StatusCode::OK);
    for (name, value) in record.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, http::HeaderValue::from_static("true"));
    response
}

/// Whether an answer is final enough to replay.
fn recordable(status: http::StatusCode) -> bool {
    !status.is_server_error() && status != http::StatusCode::TOO_MANY_REQUESTS
}

/// Headers worth keeping: the connection's own and the length (the replay
/// is sent whole) are not.
fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "date"
            )
        })
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_owned(), v.to_owned()))
        })
        .collect()
}

/// A response body passed on frame by frame while a copy is kept; once it
/// has ended whole and within the size limit, the copy is recorded before
/// the agent sees the end — so a repeat sent after the agent has the whole
/// answer is always replayed.
struct Recording<B> {
    inner: B,
    copy: Vec<u8>,
    over: bool,
    pending: Option<(Replay, String, Recorded)>,
    /// The record being written (a task: the body must stay `Sync`), and
    /// the last frame (or the end), handed on once it is written.
    writing: Option<tokio::task::JoinHandle<()>>,
    held: Option<Option<Result<Frame<Bytes>, BoxError>>>,
}

impl<B> Recording<B> {
    fn new(inner: B, replay: Replay, key: String, head: Recorded) -> Self {
        Self {
            inner,
            copy: Vec::new(),
            over: false,
            pending: Some((replay, key, head)),
            writing: None,
            held: None,
        }
    }
}

impl<B> Body for Recording<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(writing) = &mut this.writing {
            // A failed write was logged by the task; the agent's answer is
            // complete either way.
            let _ = ready!(Pin::new(writing).poll(cx));
            this.writing = None;
            return Poll::Ready(this.held.take().flatten());
        }
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let limit = this.pending.as_ref().map_or(0, |(r, _, _)| r.max_body);
                    if this.copy.len() + data.len() > limit {
                        this.over = true;
                        this.copy = Vec::new();
                    } else if !this.over {
                        this.copy.extend_from_slice(data);
                    }
                }
                // A body of known length ends with its last frame, and the
                // server may not poll past it: record before handing it on.
                if !this.inner.is_end_stream() {
                    return Poll::Ready(polled);
                }
            }
            // A body cut short is not the answer: nothing is recorded.
            Some(Err(_)) => {
                this.pending = None;
                return Poll::Ready(polled);
            }
            None => {}
        }
        if let Some((replay, key, mut record)) = this.pending.take()
            && !this.over
        {
            record.body = std::mem::take(&mut this.copy);
            let mut writing = tokio::spawn(async move {
                if let Err(err) = replay
                    .store
                    .put(&replay.tenant, &key, &record, replay.ttl)
                    .await
                {
                    tracing::warn!(error = %err, "could not record an egress response for replay");
                }
            });
            if Pin::new(&mut writing).poll(cx).is_pending() {
                this.writing = Some(writing);
                this.held = Some(polled);
                return Poll::Pending;
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        // Not before the record is written: the server must poll to the
        // end (it stops polling a body that says it has ended).
        self.pending.is_none() && self.writing.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The stack's replay step: a keyed request whose body can be kept is
/// answered from its record, refused when the key was used for another
/// request, or sent with its answer recorded.
#[derive(Clone)]
pub(super) struct Replaying {
    replay: Option<Replay>,
    /// Bodies over this are not kept, so such a call is not recorded.
    max_body: usize,
    metrics: EgressMetrics,
}

impl Replaying {
    pub(super) fn new(replay: Option<Replay>, max_body: usize, metrics: EgressMetrics) -> Self {
        Self {
            replay,
            max_body,
            metrics,
        }
    }
}

impl CallStep for Replaying {
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let keyed = self
            .replay
            .clone()
            .zip(key_of(call.request.headers(), &call.route.name))
            .filter(|_| body_fits(call.request.headers(), self.max_body));
        let metrics = self.metrics.clone();
        async move {
            let Some((replay, key)) = keyed else {
                return call_next(next, call).await;
            };
            let Call { route, request } = call;
            let (parts, body) = request.into_parts();
            let bytes = body.into_bytes(&route.name).await?;
            let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
            let fingerprint = fingerprint(&parts.method, &route.name, path, &bytes);
            let record_to = match replay.store.get(&replay.tenant, &key).await {
                Ok(Some(record)) if record.fingerprint == fingerprint => {
                    metrics.replayed(&route.name);
                    return Ok(answer(record));
                }
                Ok(Some(_)) => {
                    return Err(EgressError::KeyReused {
                        upstream: route.name.clone(),
                    });
                }
                Ok(None) => Some(replay),
                // The record cannot be read: the call goes through
                // unrecorded rather than fail.
                Err(err) => {
                    tracing::warn!(upstream = %route.name, error = %err, "replay records unavailable");
                    None
                }
            };
            let request = Request::from_parts(parts, RequestBody::Kept(bytes));
            let response = call_next(next, Call { route, request }).await?;
            let status = response.status();
            Ok(match record_to {
                Some(replay) if recordable(status) => {
                    let record = Recorded {
                        fingerprint,
                        status: status.as_u16(),
                        headers: kept_headers(response.headers()),
                        body: Vec::new(),
                    };
                    response.map(|body| Recording::new(body, replay, key, record).boxed())
                }
                _ => response,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_need_a_header_and_fingerprints_tell_requests_apart() {
        let mut headers = HeaderMap::new();
        assert_eq!(key_of(&headers, "model"), None);
        headers.insert(TASK_KEY_HEADER, "saga-1/PLAN/1".parse().expect("value"));
        assert_eq!(
            key_of(&headers, "model").as_deref(),
            Some("model|saga-1/PLAN/1|")
        );
        let a = fingerprint(&http::Method::POST, "model", "/v1/chat", b"{\"a\":1}");
        let b = fingerprint(&http::Method::POST, "model", "/v1/chat", b"{\"a\":2}");
        assert_ne!(a, b);
        assert!(recordable(http::StatusCode::OK));
        assert!(recordable(http::StatusCode::BAD_REQUEST));
        assert!(!recordable(http::StatusCode::TOO_MANY_REQUESTS));
        assert!(!recordable(http::StatusCode::BAD_GATEWAY));
    }
}
