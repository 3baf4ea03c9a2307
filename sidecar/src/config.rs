//! The sidecar's configuration: the shared sections plus who it serves and
//! where its state lives.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use statefabric_domain::{AgentId, TenantId};
use statefabric_runtime::{AdminConfig, Issues, ServiceConfig, ShutdownConfig, TelemetryConfig};
use statefabric_store::pg::PgConfig;
use statefabric_store::sqlite::SqliteConfig;

/// Default gRPC port of the State API; admin sits beside it on 7401.
pub const DEFAULT_GRPC_PORT: u16 = 7400;
pub const DEFAULT_ADMIN_PORT: u16 = 7401;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    pub sidecar: SidecarSection,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub locks: LocksConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LockBackend {
    /// In this process: the embedded default (one sidecar).
    #[default]
    Memory,
    /// One Redis server (`urls[0]`).
    Redis,
    /// A Redis Cluster (`urls` are seed nodes).
    RedisCluster,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    pub backend: LockBackend,
    /// Comma-separated `redis://host:port` URLs.
    pub urls: String,
}

impl LocksConfig {
    pub fn url_list(&self) -> Vec<String> {
        self.urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarSection {
    /// The State API's address. Localhost: only the agent in the same pod
    /// talks to its sidecar.
    pub listen: SocketAddr,
    /// The tenant this sidecar acts for (set by the injector from the pod's
    /// annotations). Every request acts for this tenant and no other.
    pub tenant: String,
    /// This sidecar's identity: the audit actor and its vector-clock entry.
    pub identity: String,
    /// Events buffered per subscription before a slow consumer is noticed.
    pub subscription_buffer: usize,
    /// How long a full subscription buffer may stay full before the consumer
    /// is cut off (it resumes from its last checkpoint).
    #[serde(with = "humantime_serde")]
    pub subscriber_lag_timeout: Duration,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Hot context documents kept in memory: at most this many ...
    pub cache_max_entries: usize,
    /// ... and at most this many bytes of content.
    pub cache_max_bytes: usize,
}

impl Default for SidecarSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_GRPC_PORT)),
            // Convenient for local runs; the injector sets both per pod.
            tenant: "default".to_owned(),
            identity: "sidecar".to_owned(),
            subscription_buffer: 1024,
            subscriber_lag_timeout: Duration::from_secs(5),
            // An append's limit (8 MiB of events) plus envelope overhead.
            max_request_bytes: 9 * 1024 * 1024,
            cache_max_entries: 10_000,
            cache_max_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One SQLite file: the embedded default, no server needed.
    #[default]
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    pub postgres: PgConfig,
    /// Owner-role URL used to apply migrations at start; when unset the
    /// schema must already be migrated (e.g. by a deployment job).
    pub postgres_migrate_url: Option<String>,
    pub sqlite: SqliteConfig,
}

impl SidecarConfig {
    pub fn defaults() -> Self {
        Self {
            admin: AdminConfig::on_port(DEFAULT_ADMIN_PORT),
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
            sidecar: SidecarSection::default(),
            storage: StorageConfig::default(),
            locks: LocksConfig::default(),
        }
    }

    /// The validated tenant (valid after [`ServiceConfig::validate`]).
    pub fn tenant(&self) -> Result<TenantId, statefabric_domain::IdError> {
        TenantId::new(self.sidecar.tenant.clone())
    }

    pub fn identity(&self) -> Result<AgentId, statefabric_domain::IdError> {
        AgentId::new(self.sidecar.identity.clone())
    }
}

impl ServiceConfig for SidecarConfig {
    const SECTIONS: &'static [&'static str] = &[
        "admin",
        "telemetry",
        "shutdown",
        "sidecar",
        "storage",
        "locks",
    ];

    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn shutdown(&self) -> &ShutdownConfig {
        &self.shutdown
    }

    fn validate(&self, issues: &mut Issues) {
        if let Err(err) = self.tenant() {
            issues.push("sidecar.tenant", err.to_string());
        }
        if let Err(err) = self.identity() {
            issues.push("sidecar.identity", err.to_string());
        }
        if self.sidecar.subscription_buffer == 0 {
            issues.push("sidecar.subscription_buffer", "must be at least 1");
        }
        if self.sidecar.subscriber_lag_timeout.is_zero() {
            issues.push(
                "sidecar.subscriber_lag_timeout",
                "must be greater than zero",
            );
        }
        if self.sidecar.cache_max_entries == 0 || self.sidecar.cache_max_bytes == 0 {
            issues.push(
                "sidecar.cache_max_entries",
                "the cache bounds must be at least 1",
            );
        }
        if self.sidecar.max_request_bytes < 1024 {
            issues.push("sidecar.max_request_bytes", "must be at least 1024");
        }
        if self.locks.backend != LockBackend::Memory {
            let urls = self.locks.url_list();
            if urls.is_empty() {
                issues.push(
                    "locks.urls",
                    "a Redis backend needs at least one redis:// URL",
                );
            }
            if let Some(bad) = urls.iter().find(|u| !u.starts_with("redis://")) {
                issues.push("locks.urls", format!("`{bad}` is not a redis:// URL"));
            }
        }
        if self.storage.backend == Backend::Postgres {
            let pg = &self.storage.postgres;
            if !pg.url.starts_with("postgres://") && !pg.url.starts_with("postgresql://") {
                issues.push("storage.postgres.url", "must be a postgres:// URL");
            }
            if pg.max_connections == 0 || pg.min_connections > pg.max_connections {
                issues.push(
                    "storage.postgres.max_connections",
                    "must be at least 1 and at least min_connections",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use statefabric_runtime::config::load_from;

    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<SidecarConfig, statefabric_runtime::ConfigError> {
        load_from(
            SidecarConfig::defaults(),
            None,
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn defaults_are_valid_and_embedded() {
        let config = load(&[]).expect("defaults");
        assert_eq!(config.storage.backend, Backend::Sqlite);
        assert_eq!(config.locks.backend, LockBackend::Memory);
        assert_eq!(config.sidecar.listen.port(), DEFAULT_GRPC_PORT);
    }

    #[test]
    fn every_sidecar_problem_is_named() {
        let err = load(&[
            ("STATEFABRIC_SIDECAR__TENANT", "Not Valid"),
            ("STATEFABRIC_SIDECAR__IDENTITY", ""),
            ("STATEFABRIC_SIDECAR__SUBSCRIPTION_BUFFER", "0"),
            ("STATEFABRIC_SIDECAR__CACHE_MAX_BYTES", "0"),
            ("STATEFABRIC_LOCKS__BACKEND", "redis_cluster"),
            ("STATEFABRIC_STORAGE__BACKEND", "postgres"),
            ("STATEFABRIC_STORAGE__POSTGRES__URL", "mysql://nope"),
        ])
        .expect_err("invalid");
        let text = err.to_string();
        for key in [
            "sidecar.tenant",
            "sidecar.identity",
            "sidecar.subscription_buffer",
            "sidecar.cache_max_entries",
            "locks.urls",
            "storage.postgres.url",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        let err = load(&[
            ("STATEFABRIC_LOCKS__BACKEND", "redis"),
            ("STATEFABRIC_LOCKS__URLS", "http://x"),
        ])
        .expect_err("bad url");
        assert!(err.to_string().contains("is not a redis:// URL"), "{err}");
        let ok = load(&[
            ("STATEFABRIC_LOCKS__BACKEND", "redis_cluster"),
            ("STATEFABRIC_LOCKS__URLS", "redis://a:1, redis://b:2"),
        ])
        .expect("valid");
        assert_eq!(ok.locks.url_list(), ["redis://a:1", "redis://b:2"]);
    }
}
