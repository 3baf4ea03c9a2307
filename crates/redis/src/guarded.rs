//! The connection every Redis adapter uses: deadline, breaker and metrics
//! around each command or pipeline.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};
use statefabric_resilience::{Guard, Guarded as Outcome};
use tokio::time::Instant;

/// A standalone or cluster connection behind one type.
#[derive(Clone)]
pub enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Standalone(_) => "Conn::Standalone",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    command: String,
    /// timeout | circuit_open | connection | server
    kind: &'static str,
}

#[derive(Debug)]
pub struct RedisMetrics {
    latency: Family<CommandLabel, Histogram>,
    errors: Family<ErrorLabel, Counter>,
    in_flight: Gauge,
}

impl Default for RedisMetrics {
    fn default() -> Self {
        Self {
            latency: Family::new_with_constructor(|| {
                // 50 µs .. ~1.6 s
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.000_05, 2.0, 16,
                ))
            }),
            errors: Family::default(),
            in_flight: Gauge::default(),
        }
    }
}

impl RedisMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "command_duration_seconds",
            "Redis command latency, retries included",
            self.latency.clone(),
        );
        registry.register(
            "command_errors",
            "Redis commands that failed, by kind",
            self.errors.clone(),
        );
        registry.register(
            "commands_in_flight",
            "Redis commands sent and not yet answered (use of the multiplexed connections)",
            self.in_flight.clone(),
        );
    }
}

/// A connection whose every command has a deadline, passes the breaker and
/// is measured. Clones share the connection, breaker and metrics.
#[derive(Debug, Clone)]
pub struct Guarded {
    inner: Conn,
    guard: Guard,
    metrics: Arc<RedisMetrics>,
}

impl Guarded {
    pub(crate) fn new(inner: Conn, guard: Guard, metrics: Arc<RedisMetrics>) -> Self {
        Self {
            inner,
            guard,
            metrics,
        }
    }

    async fn run<T>(
        metrics: &RedisMetrics,
        guard: &Guard,
        command: String,
        call: RedisFuture<'_, T>,
    ) -> Result<T, RedisError> {
        let started = Instant::now();
        metrics.in_flight.inc();
        let outcome = guard.run(call, is_fault).await;
        metrics.in_flight.dec();
        metrics
            .latency
            .get_or_create(&CommandLabel {
                command: command.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        outcome.map_err(|err| {
            let (kind, err) = match err {
                Outcome::Open(name) => (
                    "circuit_open",
                    RedisError::from((
                        ErrorKind::Io,
                        "circuit open",
                        format!("{name} failed repeatedly; calls fail fast until a probe succeeds"),
                    )),
                ),
                Outcome::Timeout(_, after) => (
                    "timeout",
                    RedisError::from((
                        ErrorKind::Io,
                        "timed out",
                        format!("no answer in {after:?}"),
                    )),
                ),
                Outcome::Inner(err) if is_fault(&err) => ("connection", err),
                Outcome::Inner(err) => ("server", err),
            };
            metrics
                .errors
                .get_or_create(&ErrorLabel { command, kind })
                .inc();
            err
        })
    }
}

/// Errors that say Redis (or the way to it) is in trouble, as opposed to an
/// answer about the data (a script's error, NOSCRIPT, WRONGTYPE ...).
fn is_fault(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_cluster_error()
        || matches!(
            err.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        )
}

/// The command's name, for labels: a bounded set (Redis's own commands).
fn command_name(cmd: &Cmd) -> String {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).to_ascii_lowercase(),
        _ => "unknown".to_owned(),
    }
}

impl ConnectionLike for Guarded {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Self {
            inner,
            guard,
            metrics,
        } = self;
        Box::pin(Self::run(
            metrics,
            guard,
            command_name(cmd),
            inner.req_packed_command(cmd),
        ))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Self {
            inner,
            guard,
            metrics,
        } = self;
        Box::pin(Self::run(
            metrics,
            guard,
            "pipeline".to_owned(),
            inner.req_packed_commands(pipeline, offset, count),
        ))
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
