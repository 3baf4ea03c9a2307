//! A response body passed through frame by frame (never buffered), cut when
//! the upstream sends nothing for the idle timeout: every frame resets the
//! clock, so a slow but healthy stream is not cut and a stalled one is.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::future::Future;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

use super::errors::EgressBody;
use super::metrics::EgressMetrics;
use super::stack::{Call, Next, Result as StepResult, Step, call_next};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream sent nothing for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream}: no data for {idle:?}; the stream was cut")]
pub(super) struct IdleTimeout {
    pub upstream: String,
    pub idle: Duration,
}

pub(super) struct IdleBody<B> {
    inner: B,
    idle: Duration,
    upstream: String,
    deadline: Pin<Box<Sleep>>,
    /// Counts the bytes passed through (the upstream's received bytes).
    received: Option<Counter>,
}

impl<B> IdleBody<B> {
    pub(super) fn new(inner: B, idle: Duration, upstream: String) -> Self {
        Self {
            inner,
            idle,
            upstream,
            deadline: Box::pin(tokio::time::sleep(idle)),
            received: None,
        }
    }

    /// Counts the data passed through in `received`.
    pub(super) fn counted(mut self, received: Counter) -> Self {
        self.received = Some(received);
        self
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            let next = Instant::now() + this.idle;
            this.deadline.as_mut().reset(next);
            if let (Some(counter), Some(Ok(frame))) = (&this.received, &frame)
                && let Some(data) = frame.data_ref()
            {
                counter.inc_by(data.len() as u64);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(this.deadline.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(IdleTimeout {
            upstream: this.upstream.clone(),
            idle: this.idle,
        }))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that keeps something alive until it is done (a concurrency slot:
/// a stream counts for as long as it flows).
pub(super) struct Holding<B, T> {
    inner: B,
    _held: T,
}

impl<B, T> Holding<B, T> {
    pub(super) fn new(inner: B, held: T) -> Self {
        Self { inner, _held: held }
    }
}

impl<B, T> Body for Holding<B, T>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
    T: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The stack's body step: the upstream's response body streams through
/// frame by frame under the route's idle timeout, its bytes counted.
#[derive(Debug, Clone)]
pub(super) struct Streaming(pub EgressMetrics);

impl Step<Call> for Streaming {
    type Response = Response<EgressBody>;
    type NextRequest = Call;
    type NextResponse = Response<Incoming>;

    fn call<S>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = StepResult<Response<EgressBody>>> + Send + 'static
    where
        S: Next<Call, Response<Incoming>>,
    {
        let received = self.0.bytes(&call.route.name, "received");
        let (idle, upstream) = (call.route.policy.idle, call.route.name.clone());
        async move {
            let response = call_next(next, call).await?;
            Ok(response.map(|body| {
                IdleBody::new(body, idle, upstream)
                    .counted(received)
                    .boxed()
            }))
        }
    }
}
