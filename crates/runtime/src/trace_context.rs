//! W3C trace context (`traceparent`, `tracestate`) across a hop: the caller's
//! context read from a request's headers becomes a span's parent, and the
//! span's own context is written into the headers of the request that goes
//! on, so one trace follows a call through every process.
//!
//! The propagator is OpenTelemetry's W3C one and the header adapters are
//! `opentelemetry-http`'s. Spans are recorded —
//! and so have a context to pass on — only when trace export is configured
//! (`telemetry.otlp_endpoint`); without it [`inject`] writes nothing and
//! whatever context the request already carried travels on unchanged.

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the trace context `headers` carry (if any).
pub fn continue_from(span: &tracing::Span, headers: &HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled (filtered out): nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// Makes `span` a child of a `traceparent` (and `tracestate`) carried
/// outside HTTP — a Kafka message's headers.
pub fn continue_from_values(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) {
    let mut headers = HeaderMap::new();
    for (name, value) in [("traceparent", traceparent), ("tracestate", tracestate)] {
        if let Some(value) = value.and_then(|v| http::HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    }
    continue_from(span, &headers);
}

/// Writes `span`'s context into `headers` (replacing a `traceparent` they
/// carried) when the span is recorded; otherwise leaves them as they are.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let context = span.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    }
}

/// `span`'s context as a `traceparent` value, when the span is recorded.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let mut headers = HeaderMap::new();
    inject(span, &mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_recorded_span_headers_stay_as_they_were() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        let before = headers.clone();
        let span = tracing::Span::none();
        continue_from(&span, &headers);
        inject(&span, &mut headers);
        assert_eq!(headers, before);
    }
}
