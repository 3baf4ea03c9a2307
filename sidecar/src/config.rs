//! The sidecar's configuration: the shared sections plus who it serves and
//! where its state lives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use statefabric_domain::{AgentId, TenantId};
use statefabric_kafka::brokers::KafkaAuth;
use statefabric_redis::RedisConfig;
use statefabric_runtime::{AdminConfig, Issues, ServiceConfig, ShutdownConfig, TelemetryConfig};
use statefabric_session::{Expiry, Policy};
use statefabric_store::pg::PgConfig;
use statefabric_store::sqlite::SqliteConfig;

/// Default gRPC port of the State API; admin sits beside it on 7401.
pub const DEFAULT_GRPC_PORT: u16 = 7400;
/// Default port of the admin endpoints (probes, metrics).
pub const DEFAULT_ADMIN_PORT: u16 = 7401;

/// The sidecar's configuration: one TOML file and `STATEFABRIC_*`
/// variables, validated at start-up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Admin endpoints.
    pub admin: AdminConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Drain deadline.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The State API's address, tenant and identity.
    pub sidecar: SidecarSection,
    /// Where events and shared context are kept.
    #[serde(default)]
    pub storage: StorageConfig,
    /// The Redis the building blocks below may use.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Distributed locks.
    #[serde(default)]
    pub locks: LocksConfig,
    /// Sessions.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Change announcements between sidecars.
    #[serde(default)]
    pub updates: UpdatesConfig,
    /// Saga tasks for the agent.
    #[serde(default)]
    pub tasks: TasksConfig,
    /// This sidecar's Kafka login (the Kafka task transport).
    #[serde(default)]
    pub kafka: KafkaAuth,
    /// Where the mesh configuration comes from.
    #[serde(default)]
    pub mesh: MeshClientConfig,
    /// The egress listener for the agent's outbound calls.
    #[serde(default)]
    pub egress: EgressConfig,
}

/// The egress listener agents send their outbound calls to
/// (`src/egress/`); routes come from the mesh configuration's Upstreams.
/// Off unless enabled: the injector turns it on in agent pods (on the
/// template's egress port) unless a pod opts out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Whether the listener runs.
    pub enabled: bool,
    /// Loopback: the agent's own calls, not the pod network's.
    pub listen: SocketAddr,
    /// Request bodies up to this size are kept so a retry can resend them;
    /// larger ones are streamed and sent once.
    pub max_retry_body_bytes: usize,
    /// Roots trusted besides the system's and webpki's (PEM), e.g. a
    /// company CA in front of the upstreams.
    pub ca_file: Option<std::path::PathBuf>,
    /// Without a policy: establishing a connection, ...
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// ... the whole call until the response's headers, ...
    #[serde(with = "humantime_serde")]
    pub total_timeout: Duration,
    /// ... and silence between two chunks of a streamed response.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a recorded response answers a repeat of its request (a
    /// request with a task key or an `Idempotency-Key`).
    #[serde(with = "humantime_serde")]
    pub replay_ttl: Duration,
    /// Responses larger than this are passed on but not recorded.
    pub max_replay_body_bytes: usize,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            max_retry_body_bytes: 1024 * 1024,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            replay_ttl: Duration::from_secs(24 * 3600),
            max_replay_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Mesh configuration from the control plane (`src/mesh.rs`). The pod's
/// identity is the injector's to set (from the downward API).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshClientConfig {
    /// Subscribe to the control plane.
    pub enabled: bool,
    /// Or read the same documents from these local YAML files at start
    /// (`fabric dev`: no Kubernetes, no control plane).
    pub files: Vec<std::path::PathBuf>,
    /// The control plane's configuration service (`https://…:7504`).
    pub control_plane: String,
    /// The CA that signed its certificate (https only), as a file...
    pub ca_file: Option<std::path::PathBuf>,
    /// ...or as PEM text (what the injector sets: a CA certificate is
    /// public, and the pod's namespace holds no copy of the fabric's).
    pub ca_pem: Option<String>,
    /// The pod's projected ServiceAccount token (audience `statefabric`).
    pub token_file: std::path::PathBuf,
    /// The pod's namespace (from the downward API).
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The agent type the pod runs (its annotation).
    pub agent_type: String,
    /// The FabricConfig the pod names, if any.
    pub config_name: String,
    /// Where the last applied configuration is kept.
    pub state_file: std::path::PathBuf,
    /// First wait before reconnecting to the configuration service.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest wait between reconnects (the wait doubles up to it).
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for MeshClientConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            files: Vec::new(),
            control_plane: String::new(),
            ca_file: None,
            ca_pem: None,
            token_file: "/var/run/secrets/statefabric.io/token".into(),
            namespace: String::new(),
            pod: String::new(),
            agent_type: String::new(),
            config_name: String::new(),
            state_file: "statefabric-mesh.json".into(),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
        }
    }
}

/// How saga tasks reach the sidecar.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskTransport {
    /// Claimed from the saga tables (embedded, or Postgres without Kafka).
    #[default]
    Tables,
    /// From the tenant's command topics; replies to `sagas.replies`
    /// (Postgres storage only; the control plane's `[sagas] transport`
    /// must match).
    Kafka,
}

/// Where saga tasks come from and answers go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Tables or Kafka.
    pub transport: TaskTransport,
    /// Kafka's bootstrap servers (the Kafka transport).
    pub kafka_bootstrap: String,
    /// The Schema Registry's Confluent-compatible API root.
    pub registry_url: String,
    /// Tasks buffered per agent type before consumption pauses.
    pub buffer: usize,
    /// Deadline of each Kafka and registry call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            transport: TaskTransport::Tables,
            kafka_bootstrap: String::new(),
            registry_url: String::new(),
            buffer: 256,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Where a Redis-capable building block keeps its state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisBackend {
    /// In this process: the embedded default (one sidecar).
    #[default]
    Memory,
    /// On the Redis configured in `[redis]` (standalone or cluster).
    Redis,
}

/// Distributed locks (`[locks]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    /// In this process (memory) or on Redis.
    pub backend: RedisBackend,
}

/// Sessions (`[sessions]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// In this process (memory) or on Redis.
    pub backend: RedisBackend,
    /// Largest session value accepted, in bytes.
    pub max_value_bytes: usize,
    /// The namespaces agents may use, each with its expiry policy.
    pub namespaces: BTreeMap<String, Policy>,
    /// How often the live-session gauges are refreshed.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            backend: RedisBackend::Memory,
            max_value_bytes: statefabric_session::DEFAULT_MAX_VALUE_BYTES,
            namespaces: BTreeMap::from([
                (
                    "conversation".to_owned(),
                    Policy {
                        ttl: Duration::from_secs(30 * 60),
                        expiry: Expiry::Sliding,
                        max_ttl: Some(Duration::from_secs(24 * 3600)),
                    },
                ),
                (
                    "task".to_owned(),
                    Policy {
                        ttl: Duration::from_secs(24 * 3600),
                        expiry: Expiry::Absolute,
                        max_ttl: Some(Duration::from_secs(7 * 24 * 3600)),
                    },
                ),
            ]),
            metrics_interval: Duration::from_secs(15),
        }
    }
}

/// Change announcements (`[updates]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UpdatesConfig {
    /// Memory: changes stay in this process (with Postgres storage, other
    /// sidecars' changes still arrive by LISTEN/NOTIFY). Redis: changes are
    /// announced on pub/sub and logged on a Stream per tenant.
    pub backend: RedisBackend,
    /// Update-stream entries kept (about), per tenant ... Unset: 100,000 on
    /// Redis, where a restarted sidecar resumes its consumer group from the
    /// stream; 20,000 in memory, where the stream only serves this
    /// process's own follower, which is woken by every append and keeps up
    /// (100,000 entries held about 15 MB there for nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
    /// ... and for at most this long.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Entries another consumer of this sidecar's group left unacknowledged
    /// this long are taken over.
    #[serde(with = "humantime_serde")]
    pub claim_after: Duration,
}

impl Default for UpdatesConfig {
    fn default() -> Self {
        Self {
            backend: RedisBackend::Memory,
            max_len: None,
            max_age: Duration::from_secs(3600),
            claim_after: Duration::from_secs(30),
        }
    }
}

impl UpdatesConfig {
    /// Entries kept when `max_len` is unset, on Redis and in memory.
    pub const DEFAULT_MAX_LEN_REDIS: u64 = 100_000;
    /// See [`UpdatesConfig::max_len`].
    pub const DEFAULT_MAX_LEN_MEMORY: u64 = 20_000;

    /// The update stream's retention: `max_len`, or the backend's default.
    pub fn retention(&self) -> statefabric_updates::Retention {
        let max_len = self.max_len.unwrap_or(match self.backend {
            RedisBackend::Redis => Self::DEFAULT_MAX_LEN_REDIS,
            RedisBackend::Memory => Self::DEFAULT_MAX_LEN_MEMORY,
        });
        statefabric_updates::Retention {
            max_len,
            max_age: self.max_age,
        }
    }
}

/// The State API's own settings (`[sidecar]`).
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
    /// ... and at most this many bytes of content ...
    pub cache_max_bytes: usize,
    /// ... each for at most this long (bounds staleness should a change
    /// announcement be lost).
    #[serde(with = "humantime_serde")]
    pub cache_max_age: Duration,
    /// Runtime worker threads (1-64). One is usually fastest: the sidecar
    /// shares the pod's CPU with its agent.
    pub worker_threads: usize,
    /// Postgres connections for the saga task API (1-64).
    pub task_connections: u32,
    /// State API calls served at once; the next is refused at once with
    /// RESOURCE_EXHAUSTED rather than queued (open streams count only until
    /// their first message).
    pub max_concurrent_calls: usize,
    /// The longest a call may run: the caller's deadline (`grpc-timeout`)
    /// is capped at this. Above the longest wait a call may ask for (a lock
    /// acquisition's 10 minutes).
    #[serde(with = "humantime_serde")]
    pub max_call_duration: Duration,
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
            cache_max_age: Duration::from_secs(30),
            worker_threads: 1,
            task_connections: 4,
            max_concurrent_calls: 1024,
            max_call_duration: Duration::from_secs(15 * 60),
        }
    }
}

/// The storage backend.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One SQLite file: the embedded default, no server needed.
    #[default]
    Sqlite,
    /// PostgreSQL, shared by the tenant's sidecars and the control plane.
    Postgres,
}

/// Where events and shared context are kept (`[storage]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// SQLite or Postgres.
    pub backend: Backend,
    /// The Postgres connection (backend `postgres`).
    pub postgres: PgConfig,
    /// Owner-role URL used to apply migrations at start; when unset the
    /// schema must already be migrated (e.g. by a deployment job).
    pub postgres_migrate_url: Option<String>,
    /// The SQLite file (backend `sqlite`).
    pub sqlite: SqliteConfig,
}

impl SidecarConfig {
    /// Every section at its default: a sidecar on SQLite on the default
    /// ports.
    pub fn defaults() -> Self {
        Self {
            admin: AdminConfig::on_port(DEFAULT_ADMIN_PORT),
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
            sidecar: SidecarSection::default(),
            storage: StorageConfig::default(),
            redis: RedisConfig::default(),
            locks: LocksConfig::default(),
            sessions: SessionsConfig::default(),
            updates: UpdatesConfig::default(),
            tasks: TasksConfig::default(),
            kafka: KafkaAuth::default(),
            mesh: MeshClientConfig::default(),
            egress: EgressConfig::default(),
        }
    }

    /// The validated tenant (valid after [`ServiceConfig::validate`]).
    pub fn tenant(&self) -> Result<TenantId, statefabric_domain::IdError> {
        TenantId::new(self.sidecar.tenant.clone())
    }

    /// Whether any building block is configured to use Redis.
    pub fn uses_redis(&self) -> bool {
        [
            self.locks.backend,
            self.sessions.backend,
            self.updates.backend,
        ]
        .contains(&RedisBackend::Redis)
    }

    /// The validated identity this sidecar writes as (valid after
    /// [`ServiceConfig::validate`]).
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
        "redis",
        "locks",
        "sessions",
        "updates",
        "tasks",
        "kafka",
        "mesh",
        "egress",
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
        let e = &self.egress;
        if e.enabled
            && (e.connect_timeout.is_zero()
                || e.total_timeout.is_zero()
                || e.idle_timeout.is_zero())
        {
            issues.push("egress.connect_timeout", "egress timeouts must be positive");
        }
        let m = &self.mesh;
        if m.enabled && !m.files.is_empty() {
            issues.push(
                "mesh.files",
                "use the control plane (enabled) or local files, not both",
            );
        }
        if m.enabled {
            if !m.control_plane.starts_with("https://") && !m.control_plane.starts_with("http://") {
                issues.push("mesh.control_plane", "must be an https:// (or http://) URL");
            }
            if m.ca_file.is_some() && !m.control_plane.starts_with("https://") {
                issues.push("mesh.ca_file", "applies only to an https:// control_plane");
            }
            if let Some(pem) = &m.ca_pem {
                if m.ca_file.is_some() {
                    issues.push("mesh.ca_pem", "set ca_file or ca_pem, not both");
                } else if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    issues.push("mesh.ca_pem", "must be a PEM certificate");
                }
            }
            if m.namespace.is_empty() || m.pod.is_empty() {
                issues.push(
                    "mesh.namespace",
                    "namespace and pod are needed to subscribe",
                );
            }
            if m.reconnect_min.is_zero() || m.reconnect_max < m.reconnect_min {
                issues.push(
                    "mesh.reconnect_min",
                    "must be positive and at most reconnect_max",
                );
            }
        }
        if let Err(err) = self.tenant() {
            issues.push("sidecar.tenant", err.to_string());
        }
        if let Err(err) = self.identity() {
            issues.push("sidecar.identity", err.to_string());
        }
        if self.sidecar.max_concurrent_calls == 0 {
            issues.push("sidecar.max_concurrent_calls", "must be at least 1");
        }
        if self.sidecar.max_call_duration < Duration::from_secs(1) {
            issues.push("sidecar.max_call_duration", "must be at least 1s");
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
        if self.sidecar.cache_max_entries == 0
            || self.sidecar.cache_max_bytes == 0
            || self.sidecar.cache_max_age.is_zero()
        {
            issues.push(
                "sidecar.cache_max_entries",
                "the cache bounds must be at least 1",
            );
        }
        if let Some(problem) = self.kafka.problem() {
            issues.push("kafka.password", problem);
        }
        if self.tasks.transport == TaskTransport::Kafka {
            if self.storage.backend != Backend::Postgres {
                issues.push("tasks.transport", "kafka needs storage.backend = postgres");
            }
            if self.tasks.kafka_bootstrap.is_empty() {
                issues.push("tasks.kafka_bootstrap", "must name at least one broker");
            }
            if !self.tasks.registry_url.starts_with("http://")
                && !self.tasks.registry_url.starts_with("https://")
            {
                issues.push("tasks.registry_url", "must be an http(s):// URL");
            }
            if self.tasks.buffer == 0 || self.tasks.timeout.is_zero() {
                issues.push("tasks.buffer", "buffer and timeout must be positive");
            }
        }
        if !(1..=64).contains(&self.sidecar.task_connections) {
            issues.push("sidecar.task_connections", "must be 1 to 64");
        }
        if !(1..=64).contains(&self.sidecar.worker_threads) {
            issues.push("sidecar.worker_threads", "must be 1 to 64");
        }
        if self.sidecar.max_request_bytes < 1024 {
            issues.push("sidecar.max_request_bytes", "must be at least 1024");
        }
        if self.uses_redis() {
            for (key, problem) in self.redis.problems() {
                issues.push(key, problem);
            }
        }
        for (name, policy) in &self.sessions.namespaces {
            let key = "sessions.namespaces";
            if let Err(err) = statefabric_session::check_namespace(name) {
                issues.push(key, err.to_string());
            }
            if policy.ttl < Duration::from_millis(1) {
                issues.push(
                    key,
                    format!("namespace `{name}`: ttl must be at least 1 ms"),
                );
            }
            if policy.max_ttl() < policy.ttl {
                issues.push(key, format!("namespace `{name}`: max_ttl is below ttl"));
            }
        }
        if self.sessions.max_value_bytes == 0 {
            issues.push("sessions.max_value_bytes", "must be at least 1");
        }
        if self.updates.max_len == Some(0) || self.updates.max_age.is_zero() {
            issues.push(
                "updates.max_len",
                "retention must keep at least one entry for some time",
            );
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
        assert_eq!(config.locks.backend, RedisBackend::Memory);
        assert!(!config.uses_redis());
        assert_eq!(config.sidecar.listen.port(), DEFAULT_GRPC_PORT);
    }

    #[test]
    fn mesh_problems_are_named() {
        let err = load(&[
            ("STATEFABRIC_MESH__ENABLED", "true"),
            ("STATEFABRIC_MESH__FILES", "[\"mesh.yaml\"]"),
            ("STATEFABRIC_MESH__CONTROL_PLANE", "control-plane:7504"),
            ("STATEFABRIC_MESH__CA_FILE", "/etc/ca.crt"),
            ("STATEFABRIC_MESH__CA_PEM", "not a certificate"),
            ("STATEFABRIC_MESH__RECONNECT_MIN", "0s"),
        ])
        .expect_err("invalid");
        let text = err.to_string();
        for key in [
            "mesh.files",
            "mesh.control_plane",
            "mesh.ca_file",
            "mesh.ca_pem",
            "mesh.namespace",
            "mesh.reconnect_min",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
    }

    #[test]
    fn every_sidecar_problem_is_named() {
        let err = load(&[
            ("STATEFABRIC_SIDECAR__TENANT", "Not Valid"),
            ("STATEFABRIC_SIDECAR__IDENTITY", ""),
            ("STATEFABRIC_SIDECAR__SUBSCRIPTION_BUFFER", "0"),
            ("STATEFABRIC_SIDECAR__CACHE_MAX_BYTES", "0"),
            ("STATEFABRIC_LOCKS__BACKEND", "redis"),
            ("STATEFABRIC_STORAGE__BACKEND", "postgres"),
            ("STATEFABRIC_STORAGE__POSTGRES__URL", "mysql://nope"),
            ("STATEFABRIC_SESSIONS__NAMESPACES__CHAT__TTL", "0s"),
        ])
        .expect_err("invalid");
        let text = err.to_string();
        for key in [
            "sidecar.tenant",
            "sidecar.identity",
            "sidecar.subscription_buffer",
            "sidecar.cache_max_entries",
            "redis.urls",
            "storage.postgres.url",
            "sessions.namespaces",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        let err = load(&[
            ("STATEFABRIC_SESSIONS__BACKEND", "redis"),
            ("STATEFABRIC_REDIS__URLS", "http://x"),
        ])
        .expect_err("bad url");
        assert!(err.to_string().contains("is not a redis:// URL"), "{err}");
        let ok = load(&[
            ("STATEFABRIC_UPDATES__BACKEND", "redis"),
            ("STATEFABRIC_REDIS__MODE", "cluster"),
            ("STATEFABRIC_REDIS__URLS", "redis://a:1, redis://b:2"),
            ("STATEFABRIC_SESSIONS__NAMESPACES__CHAT__TTL", "5m"),
            ("STATEFABRIC_SESSIONS__NAMESPACES__CHAT__EXPIRY", "absolute"),
        ])
        .expect("valid");
        assert_eq!(ok.redis.url_list(), ["redis://a:1", "redis://b:2"]);
        let chat = ok.sessions.namespaces["chat"];
        assert_eq!(
            (chat.ttl, chat.expiry),
            (Duration::from_secs(300), Expiry::Absolute)
        );
        assert!(
            ok.sessions.namespaces.contains_key("conversation"),
            "defaults kept"
        );
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecar.example.toml");
        // The password comes from the environment, as in a deployment.
        let env = [(
            "STATEFABRIC_KAFKA__PASSWORD".to_owned(),
            "from-a-secret".to_owned(),
        )];
        let config =
            load_from(SidecarConfig::defaults(), Some(&path), env).expect("sidecar.example.toml");
        assert_eq!(config.storage.backend, Backend::Postgres);
        assert!(config.uses_redis());
        assert_eq!(config.redis.url_list().len(), 3);
        assert_eq!(config.sessions.namespaces["task"].expiry, Expiry::Absolute);
        assert_eq!(config.tasks.transport, TaskTransport::Kafka);
        assert_eq!(config.kafka.username, "statefabric-sidecar");
        assert_eq!(config.kafka.password, "from-a-secret");
        let without = load_from(SidecarConfig::defaults(), Some(&path), std::iter::empty())
            .expect_err("a username without a password");
        assert!(without.to_string().contains("kafka.password"), "{without}");
    }

    #[test]
    fn the_update_stream_keeps_less_in_memory_than_on_redis_unless_told() {
        let load = |vars: &[(&str, &str)]| {
            load_from(
                SidecarConfig::defaults(),
                None,
                vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            )
        };
        let kept = |vars: &[(&str, &str)]| load(vars).expect("valid").updates.retention().max_len;
        assert_eq!(kept(&[]), UpdatesConfig::DEFAULT_MAX_LEN_MEMORY);
        let redis = [
            ("STATEFABRIC_UPDATES__BACKEND", "redis"),
            ("STATEFABRIC_REDIS__URLS", "redis://127.0.0.1:6379"),
        ];
        assert_eq!(kept(&redis), UpdatesConfig::DEFAULT_MAX_LEN_REDIS);
        assert_eq!(kept(&[("STATEFABRIC_UPDATES__MAX_LEN", "500")]), 500);
        let zero = load(&[("STATEFABRIC_UPDATES__MAX_LEN", "0")]).expect_err("nothing kept");
        assert!(zero.to_string().contains("updates.max_len"), "{zero}");
    }

    #[test]
    fn kafka_tasks_need_postgres_a_broker_and_a_registry() {
        let err = load_from(
            SidecarConfig::defaults(),
            None,
            [("STATEFABRIC_TASKS__TRANSPORT", "kafka")].map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .expect_err("incomplete");
        let text = err.to_string();
        for field in [
            "tasks.transport",
            "tasks.kafka_bootstrap",
            "tasks.registry_url",
        ] {
            assert!(text.contains(field), "{field}: {text}");
        }
    }
}
