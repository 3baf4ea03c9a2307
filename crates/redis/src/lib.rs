//! Talking to Redis.
//!
//! Owns the typed [`RedisConfig`], opening connections to a standalone server
//! or a cluster ([`Redis::connect`]), and [`Guarded`], the connection every
//! Redis adapter uses: each command gets a deadline, passes the shared
//! circuit breaker (so a dead Redis costs callers a fast `Unavailable`), and
//! is timed into a latency histogram with error counts and in-flight use.
//! [`monitor`] polls each node's memory for the 80 %-of-maxmemory alert;
//! [`acl`] writes a tenant's own Redis user.
//!
//! It does not own what is stored: locks, sessions and updates are adapters
//! in their own crates, generic over redis-rs's `ConnectionLike`.
//!
//! Connections multiplex: one TCP connection per node carries every
//! concurrent command (pipelined), which is faster than a pool of exclusive
//! connections for short commands; "pool use" is therefore reported as
//! commands in flight. Blocking reads (XREADGROUP BLOCK) get a connection of
//! their own ([`Redis::dedicated`]) so they never stall the shared one.
#![warn(missing_docs)]

pub mod acl;
mod config;
mod guarded;
pub mod monitor;

pub use config::{RedisConfig, RedisMode};
pub use guarded::{Conn, Guarded, RedisMetrics};

use std::sync::Arc;

use redis::aio::ConnectionManagerConfig;
use statefabric_resilience::{Breaker, BreakerConfig, Guard};

/// Why Redis could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration is unusable (no URL, a malformed one).
    #[error("Redis configuration: {0}")]
    Config(String),
    /// No connection could be made.
    #[error("connecting to Redis at {urls}: {source}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// What the client reported.
        source: redis::RedisError,
    },
}

/// An open Redis: the shared guarded connection plus what is needed to open
/// more (dedicated blocking connections, pub/sub).
#[derive(Debug, Clone)]
pub struct Redis {
    config: RedisConfig,
    conn: Guarded,
    metrics: Arc<RedisMetrics>,
    breaker: Breaker,
}

impl Redis {
    /// Opens the shared connection described by `config`, behind a
    /// circuit breaker, with its metrics.
    pub async fn connect(config: &RedisConfig) -> Result<Self, ConnectError> {
        let breaker = Breaker::new(
            "redis",
            BreakerConfig {
                failure_threshold: config.breaker_failures,
                open_for: config.breaker_open_for,
                ..BreakerConfig::default()
            },
        );
        let metrics = Arc::new(RedisMetrics::default());
        let conn = open(config).await?;
        let conn = Guarded::new(
            conn,
            config.clone(),
            Guard::new(breaker.clone(), config.command_timeout),
            metrics.clone(),
        );
        Ok(Self {
            config: config.clone(),
            conn,
            metrics,
            breaker,
        })
    }

    /// The deadline and breaker of the shared connection. Changing them
    /// changes every clone of [`Redis::conn`] at once (a ResiliencyPolicy
    /// applied to a running sidecar); blocking connections keep their own
    /// deadline. On a cluster the client's own response timeout stays
    /// `command_timeout`: a deadline longer than that does not lengthen a
    /// cluster command.
    pub fn guard(&self) -> &Guard {
        self.conn.guard()
    }

    /// The shared multiplexed connection (clone it freely).
    pub fn conn(&self) -> Guarded {
        self.conn.clone()
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// A connection of its own for blocking commands, guarded by the same
    /// breaker with a deadline of `timeout` (longer than the block).
    pub async fn dedicated(&self, timeout: std::time::Duration) -> Result<Guarded, ConnectError> {
        // The cluster client enforces its own per-command deadline: raise it
        // too, or a blocking read is cut off at `command_timeout`.
        let config = RedisConfig {
            command_timeout: timeout,
            ..self.config.clone()
        };
        let conn = open(&config).await?;
        Ok(Guarded::new(
            conn,
            config,
            Guard::new(self.breaker.clone(), timeout),
            self.metrics.clone(),
        ))
    }

    /// A pub/sub connection. On a cluster, classic PUBLISH reaches every
    /// node, so subscribing on the first seed that answers hears everything.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, ConnectError> {
        let mut last = None;
        for url in self.config.url_list() {
            let attempt = async { redis::Client::open(url.as_str())?.get_async_pubsub().await };
            match tokio::time::timeout(self.config.connect_timeout, attempt).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(err)) => last = Some(err),
                Err(_) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "connect timed out",
                    )));
                }
            }
        }
        Err(ConnectError::Connect {
            urls: self.config.urls.clone(),
            source: last.unwrap_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no URLs"))
            }),
        })
    }

    /// Registers command latency, errors, in-flight use and the breaker.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let sub = registry.sub_registry_with_prefix("redis");
        self.metrics.register(sub);
        self.breaker.register_metrics(registry);
    }
}

/// Small commands must leave at once: with Nagle's algorithm on (redis-rs's
/// default), a command written while another is unanswered waits for the ACK.
fn tcp() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

pub(crate) async fn open(config: &RedisConfig) -> Result<Conn, ConnectError> {
    let urls = config.url_list();
    let failed = |source| ConnectError::Connect {
        urls: config.urls.clone(),
        source,
    };
    match config.mode {
        RedisMode::Standalone => {
            let url = urls
                .first()
                .ok_or_else(|| ConnectError::Config("redis.urls is empty".into()))?;
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(failed)?
                .set_tcp_settings(tcp());
            let client = redis::Client::open(info).map_err(failed)?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                // The guard gives every command its deadline (configured,
                // or changed while running by a ResiliencyPolicy); redis-rs's
                // own default would cut every command at 500 ms whatever
                // `command_timeout` says.
                .set_response_timeout(None)
                .set_number_of_retries(config.retries as usize);
            let manager = tokio::time::timeout(
                config.connect_timeout,
                redis::aio::ConnectionManager::new_with_config(client, manager_config),
            )
            .await
            .map_err(|_| failed((redis::ErrorKind::Io, "connect timed out").into()))?
            .map_err(failed)?;
            Ok(Conn::Standalone(manager))
        }
        RedisMode::Cluster => {
            // Each node gets a quarter of the budget: the client waits for
            // every seed, and one that accepts connections but never answers
            // (paused, partitioned) must not sink the whole connect.
            // Retries (TRYAGAIN while a slot migrates, MOVED/ASK, a lost
            // connection) wait 5 ms growing to at most 200 ms — redis-rs's
            // default first wait is over a second, longer than a command's
            // whole deadline.
            let client = redis::cluster::ClusterClientBuilder::new(urls)
                .retries(config.retries)
                .tcp_settings(tcp())
                .min_retry_wait(5)
                .max_retry_wait(200)
                .connection_timeout(config.connect_timeout / 4)
                .response_timeout(config.command_timeout)
                .build()
                .map_err(failed)?;
            let conn = tokio::time::timeout(config.connect_timeout, client.get_async_connection())
                .await
                .map_err(|_| failed((redis::ErrorKind::Io, "connect timed out").into()))?
                .map_err(failed)?;
            Ok(Conn::Cluster(conn))
        }
    }
}
