//! The connection every Redis adapter uses: deadline, breaker and metrics
//! around each command or pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};
use statefabric_resilience::{BreakerState, Guard, Guarded as Outcome};

use crate::RedisConfig;
use tokio::time::Instant;

/// A standalone or cluster connection behind one type.
#[derive(Clone)]
pub enum Conn {
    /// One server, reconnected by the manager when the link drops.
    Standalone(ConnectionManager),
    /// A Redis Cluster, redirections and failovers followed.
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

/// Per-command latency, errors by kind and calls in flight, under
/// `redis_*` in a process's registry.
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
///
/// When the breaker opens, the connection is rebuilt from the seeds in the
/// background: a node that stops answering without closing its sockets (a
/// paused or partitioned primary) otherwise keeps receiving its slots'
/// commands, because redis-rs re-routes only on errors the server sends
/// (MOVED, ASK) or on closed connections, not on timeouts. The fresh
/// connection reads the current topology, so commands follow a failover.
#[derive(Debug, Clone)]
pub struct Guarded {
    shared: Arc<Shared>,
    guard: Guard,
    metrics: Arc<RedisMetrics>,
}

#[derive(Debug)]
struct Shared {
    conn: ArcSwap<Conn>,
    config: RedisConfig,
    rebuilding: AtomicBool,
}

impl Guarded {
    pub(crate) fn guard(&self) -> &Guard {
        &self.guard
    }

    pub(crate) fn new(
        inner: Conn,
        config: RedisConfig,
        guard: Guard,
        metrics: Arc<RedisMetrics>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                conn: ArcSwap::from_pointee(inner),
                config,
                rebuilding: AtomicBool::new(false),
            }),
            guard,
            metrics,
        }
    }

    fn current(&self) -> Conn {
        Conn::clone(&self.shared.conn.load())
    }

    /// Replaces the connection with a fresh one, once at a time.
    fn rebuild(&self) {
        if self.shared.rebuilding.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            match crate::open(&shared.config).await {
                Ok(conn) => {
                    tracing::info!("rebuilt the Redis connection (topology re-read)");
                    shared.conn.store(Arc::new(conn));
                }
                Err(err) => tracing::warn!(error = %err, "cannot rebuild the Redis connection"),
            }
            shared.rebuilding.store(false, Ordering::SeqCst);
        });
    }

    async fn run<T>(&self, command: String, call: RedisFuture<'_, T>) -> Result<T, RedisError> {
        let metrics = &self.metrics;
        let started = Instant::now();
        metrics.in_flight.inc();
        let outcome = self.guard.run(call, is_fault).await;
        metrics.in_flight.dec();
        metrics
            .latency
            .get_or_create(&CommandLabel {
                command: command.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        let result = outcome.map_err(|err| {
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
            (kind, err)
        });
        match result {
            Ok(value) => Ok(value),
            Err((kind, err)) => {
                if kind != "server" && self.guard.breaker().state() != BreakerState::Closed {
                    self.rebuild();
                }
                Err(err)
            }
        }
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
        let mut conn = self.current();
        let this = self.clone();
        Box::pin(async move {
            this.run(command_name(cmd), conn.req_packed_command(cmd))
                .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut conn = self.current();
        let this = self.clone();
        Box::pin(async move {
            this.run(
                "pipeline".to_owned(),
                conn.req_packed_commands(pipeline, offset, count),
            )
            .await
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.conn.load().get_db()
    }
}
