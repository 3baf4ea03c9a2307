//! A response body passed through frame by frame (never buffered), cut when
//! the upstream sends nothing for the idle timeout: every frame resets the
//! clock, so a slow but healthy stream is not cut and a stalled one is.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream sent nothing for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream}: no data for {idle:?}; the stream was cut")]
pub struct IdleTimeout {
    pub upstream: String,
    pub idle: Duration,
}

pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    upstream: String,
    deadline: Pin<Box<Sleep>>,
    /// The upstream's concurrency slot, held until the body is done.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Counts the bytes passed through (the upstream's received bytes).
    received: Option<Counter>,
}

impl<B> IdleBody<B> {
    pub fn new(
        inner: B,
        idle: Duration,
        upstream: String,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            inner,
            idle,
            upstream,
            deadline: Box::pin(tokio::time::sleep(idle)),
            _slot: slot,
            received: None,
        }
    }

    /// Counts the data passed through in `received`.
    pub fn counted(mut self, received: Counter) -> Self {
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
