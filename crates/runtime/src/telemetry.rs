//! Logs through `tracing` (human or JSON) and, when an OTLP endpoint is
//! configured, trace export over gRPC.
//!
//! The OTLP exporter must be built inside the tokio runtime: the SDK's batch
//! processor exports from its own thread, and tonic's channel needs the
//! runtime's reactor to make progress. [`init`] is therefore async-context
//! only, and [`TelemetryGuard::shutdown`] flushes from a blocking thread so the
//! flush cannot deadlock a runtime worker.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::issues::Issues;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs and traces (`[telemetry]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Human lines or JSON.
    pub log_format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `info,statefabric=debug`.
    pub log_level: String,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`. Traces are exported
    /// only when this is set.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_level: "info".to_owned(),
            otlp_endpoint: None,
        }
    }
}

impl TelemetryConfig {
    pub(crate) fn validate(&self, section: &str, issues: &mut Issues) {
        if let Err(err) = EnvFilter::try_new(&self.log_level) {
            issues.push(
                format!("{section}.log_level"),
                format!(
                    "`{}` is not a valid filter directive: {err}",
                    self.log_level
                ),
            );
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !scheme_ok || endpoint.parse::<http::Uri>().is_err() {
                issues.push(
                    format!("{section}.otlp_endpoint"),
                    format!("`{endpoint}` is not an http:// or https:// URL"),
                );
            }
        }
    }
}

/// Keeps the trace pipeline alive; flush it on the way out.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    log_filter: LogFilter,
}

/// The running process's log filter, replaceable without a restart (a
/// FabricConfig's `logLevel` from the control plane). Clones share it; one
/// made with [`LogFilter::detached`] (tests, a second subscriber) changes
/// nothing.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LogFilter {
    /// A filter that is not installed anywhere.
    pub fn detached() -> Self {
        Self::default()
    }

    /// Replaces the filter with `directives` (e.g. `debug` or
    /// `info,statefabric=debug`); a directive that does not parse changes
    /// nothing and says why.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives)
            .map_err(|e| format!("`{directives}` is not a valid filter directive: {e}"))?;
        if let Some(handle) = &self.handle {
            handle
                .reload(filter)
                .map_err(|e| format!("replacing the log filter: {e}"))?;
        }
        Ok(())
    }
}

impl TelemetryGuard {
    /// The handle that changes the log level while running.
    pub fn log_filter(&self) -> LogFilter {
        self.log_filter.clone()
    }

    /// Flushes and stops trace export.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "flushing traces failed"),
                Err(err) => tracing::warn!(error = %err, "trace flush task failed"),
            }
        }
    }
}

/// Why logging or tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP trace exporter could not be built.
    #[error("building the OTLP exporter for {endpoint} failed: {source}")]
    Exporter {
        /// The collector's address.
        endpoint: String,
        /// What the exporter reported.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was already installed.
    #[error("installing the log subscriber failed: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
    /// `log_level` is not a valid filter directive.
    #[error("invalid log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
}

/// Installs the global subscriber. Call once, from inside the tokio runtime.
pub fn init(
    service: &'static str,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.log_level)?;

    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder().with_service_name(service).build())
                    .build(),
            )
        }
        None => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));

    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    match config.log_format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour())
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
    }
    Ok(TelemetryGuard {
        provider,
        log_filter: LogFilter {
            handle: Some(handle),
        },
    })
}

/// Colour only for a person at a terminal: not in a pipe or file, and not
/// when `NO_COLOR` is set (<https://no-color.org>).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filter_and_endpoint_are_named() {
        let config = TelemetryConfig {
            log_format: LogFormat::Json,
            log_level: "info,[[[".to_owned(),
            otlp_endpoint: Some("collector:4317".to_owned()),
        };
        let mut issues = Issues::default();
        config.validate("telemetry", &mut issues);
        let keys: Vec<_> = issues.into_vec().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["telemetry.log_level", "telemetry.otlp_endpoint"]);
    }

    #[test]
    fn defaults_are_valid() {
        let mut issues = Issues::default();
        TelemetryConfig::default().validate("telemetry", &mut issues);
        assert!(issues.is_empty());
    }
}
