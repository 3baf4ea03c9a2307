//! Model tokens an answer reports it used, read from the response as it
//! streams through (never held back): the `usage` object of a JSON answer
//! (OpenAI's `prompt_tokens`/`completion_tokens`/`total_tokens`,
//! Anthropic's `input_tokens`/`output_tokens`), or of the events of a
//! Server-Sent Events stream (OpenAI's last chunk with `include_usage`,
//! Anthropic's `message_start` and `message_delta`). When the body ends the
//! count goes to `spent`, which takes it off the upstream's
//! tokens-per-minute balance ([`super::limits`]).
//!
//! Written here: the usage shapes are the model APIs', and no crate reads
//! them from a stream in passing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;

use super::body::BoxError;
use super::limits::Limiters;
use super::metrics::EgressMetrics;
use super::stack::{Answer, Call, CallNext, CallStep, call_next};

/// A JSON answer longer than this is not read for its usage (a model
/// answer is far smaller; this bounds what the sidecar copies).
const MAX_JSON: usize = 8 * 1024 * 1024;
/// One Server-Sent Events line longer than this is skipped.
const MAX_LINE: usize = 1024 * 1024;

/// The largest count seen of each kind (stream events repeat and grow
/// them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub input: u64,
    pub output: u64,
    pub total: u64,
}

impl Usage {
    /// The tokens used: the total the upstream gave, or input plus output.
    pub(super) fn tokens(&self) -> u64 {
        self.total.max(self.input + self.output)
    }

    /// Takes in a JSON document's `usage` (or `message.usage`).
    fn absorb(&mut self, document: &Value) {
        let Some(usage) = document
            .get("usage")
            .or_else(|| document.get("message").and_then(|m| m.get("usage")))
            .filter(|u| u.is_object())
        else {
            return;
        };
        let count = |names: &[&str]| {
            names
                .iter()
                .filter_map(|n| usage.get(*n).and_then(Value::as_u64))
                .max()
                .unwrap_or(0)
        };
        self.input = self.input.max(count(&["prompt_tokens", "input_tokens"]));
        self.output = self
            .output
            .max(count(&["completion_tokens", "output_tokens"]));
        self.total = self.total.max(count(&["total_tokens"]));
    }
}

enum Format {
    /// The whole body is one JSON document.
    Json(Vec<u8>),
    /// `data: {…}` lines; the bytes of the line not yet ended.
    Events(Vec<u8>),
}

/// What reads an answer's usage as it passes.
struct Scanner {
    format: Format,
    usage: Usage,
    /// Stopped reading (over a bound).
    gave_up: bool,
}

impl Scanner {
    fn for_response(headers: &HeaderMap) -> Option<Self> {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let format = if content_type.starts_with("text/event-stream") {
            Format::Events(Vec::new())
        } else if content_type.starts_with("application/json") || content_type.is_empty() {
            // Without a type, a JSON answer is still read (what does not
            // parse counts nothing).
            Format::Json(Vec::new())
        } else {
            return None;
        };
        Some(Self {
            format,
            usage: Usage::default(),
            gave_up: false,
        })
    }

    fn feed(&mut self, data: &[u8]) {
        if self.gave_up {
            return;
        }
        match &mut self.format {
            Format::Json(all) => {
                if all.len() + data.len() > MAX_JSON {
                    self.gave_up = true;
                    all.clear();
                } else {
                    all.extend_from_slice(data);
                }
            }
            Format::Events(line) => {
                for piece in data.split_inclusive(|b| *b == b'\n') {
                    if line.len() + piece.len() <= MAX_LINE {
                        line.extend_from_slice(piece);
                    }
                    if piece.ends_with(b"\n") {
                        if let Some(json) = line
                            .strip_prefix(b"data:")
                            .map(|rest| rest.trim_ascii())
                            .filter(|rest| rest.starts_with(b"{"))
                            && let Ok(event) = serde_json::from_slice::<Value>(json)
                        {
                            self.usage.absorb(&event);
                        }
                        line.clear();
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> Usage {
        if let Format::Json(all) = &mut self.format
            && !self.gave_up
            && let Ok(document) = serde_json::from_slice::<Value>(all)
        {
            self.usage.absorb(&document);
        }
        // The last event may lack its newline.
        if matches!(&self.format, Format::Events(line) if !line.is_empty()) {
            self.feed(b"\n");
        }
        self.usage
    }
}

/// A response body that reports the usage it carried once it ends (or is
/// dropped: a stream the agent stopped reading still used what it said).
pub(super) struct UsageBody<B> {
    inner: B,
    scanner: Scanner,
    spent: Option<Box<dyn FnOnce(Usage) + Send + Sync>>,
}

impl<B> UsageBody<B> {
    /// `None` when the answer is neither JSON nor an event stream (there is
    /// no usage to read).
    pub(super) fn new(
        inner: B,
        headers: &HeaderMap,
        spent: impl FnOnce(Usage) + Send + Sync + 'static,
    ) -> Result<Self, B> {
        match Scanner::for_response(headers) {
            Some(scanner) => Ok(Self {
                inner,
                scanner,
                spent: Some(Box::new(spent)),
            }),
            None => Err(inner),
        }
    }

    fn report(&mut self) {
        if let Some(spent) = self.spent.take() {
            spent(self.scanner.finish());
        }
    }
}

impl<B> Drop for UsageBody<B> {
    fn drop(&mut self) {
        self.report();
    }
}

impl<B> Body for UsageBody<B>
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
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.scanner.feed(data);
                }
                // A body of known length may not be polled past its last
                // frame: its usage is known now.
                if this.inner.is_end_stream() {
                    this.report();
                }
            }
            None => this.report(),
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The stack's token step: under a tokens-per-minute limit, the usage an
/// answer reports comes off the upstream's balance when it ends.
#[derive(Clone)]
pub(super) struct Metering {
    limiters: Arc<Limiters>,
    metrics: EgressMetrics,
}

impl Metering {
    pub(super) fn new(limiters: Arc<Limiters>, metrics: EgressMetrics) -> Self {
        Self { limiters, metrics }
    }
}

impl CallStep for Metering {
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let metered = call
            .route
            .policy
            .limit
            .filter(|l| l.tokens_per_minute.is_some())
            .map(|settings| {
                (
                    self.limiters.get(&call.route.name, settings),
                    self.metrics.tokens(&call.route.name),
                )
            });
        async move {
            let response = call_next(next, call).await?;
            let Some((limiter, counted)) = metered else {
                return Ok(response);
            };
            let (parts, body) = response.into_parts();
            let body = match UsageBody::new(body, &parts.headers, move |usage| {
                counted.inc_by(usage.tokens());
                limiter.spend_tokens(usage.tokens());
            }) {
                Ok(metered) => metered.boxed(),
                Err(body) => body,
            };
            Ok(Response::from_parts(parts, body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(content_type: &str, chunks: &[&str]) -> Usage {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            content_type.parse().expect("value"),
        );
        let mut scanner = Scanner::for_response(&headers).expect("scanned");
        for chunk in chunks {
            scanner.feed(chunk.as_bytes());
        }
        scanner.finish()
    }

    #[test]
    fn a_json_answers_usage_is_read_in_either_vendors_shape() {
        let openai = scan(
            "application/json",
            &[
                "{\"choices\": [],\n \"usage\": {\"prompt_tokens\": 12, ",
                "\"completion_tokens\": 30, \"total_tokens\": 42}}",
            ],
        );
        assert_eq!(openai.tokens(), 42);
        let anthropic = scan(
            "application/json; charset=utf-8",
            &["{\"usage\": {\"input_tokens\": 7, \"output_tokens\": 5}}"],
        );
        assert_eq!(anthropic.tokens(), 12);
        assert_eq!(scan("application/json", &["{\"no\": 1}"]).tokens(), 0);
        assert_eq!(scan("application/json", &["not json"]).tokens(), 0);
    }

    #[test]
    fn a_streams_usage_is_read_from_its_events_split_anywhere() {
        let openai = scan(
            "text/event-stream",
            &[
                "data: {\"choices\": [{\"delta\": {\"content\": \"hi\"}}]}\n\ndata: {\"choices\": [], \"us",
                "age\": {\"prompt_tokens\": 3, \"completion_tokens\": 4, \"total_tokens\": 7}}\n\n",
                "data: [DONE]\n\n",
            ],
        );
        assert_eq!(openai.tokens(), 7);
        let anthropic = scan(
            "text/event-stream",
            &[
                "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {\"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}}}\n\n",
                "event: message_delta\ndata: {\"type\": \"message_delta\", \"usage\": {\"output_tokens\": 15}}\n\n",
            ],
        );
        assert_eq!(anthropic.tokens(), 40);
        // The last event without its newline still counts.
        let unterminated = scan(
            "text/event-stream",
            &["data: {\"usage\": {\"total_tokens\": 9}}"],
        );
        assert_eq!(unterminated.tokens(), 9);
    }

    #[test]
    fn other_answers_are_not_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            "text/plain".parse().expect("value"),
        );
        assert!(Scanner::for_response(&headers).is_none());
    }
}
