//! The control plane's configuration: the shared sections plus leader
//! election, the saga engine, the operator API, the outbox relay and lag
//! monitoring.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use statefabric_kafka::brokers::{Brokers, KafkaAuth};
use statefabric_kafka::topics::TopicSettings;
use statefabric_runtime::{AdminConfig, Issues, ServiceConfig, ShutdownConfig, TelemetryConfig};

/// Where the admin endpoints (health, readiness, metrics) listen by default.
pub const DEFAULT_ADMIN_PORT: u16 = 7501;
/// Where the operator REST API and the saga page listen by default.
pub const DEFAULT_API_PORT: u16 = 7502;
/// Where the operator gRPC API listens by default.
pub const DEFAULT_API_GRPC_PORT: u16 = 7503;

/// The whole configuration of a control-plane process, one section per
/// part; validated at start-up ([`ServiceConfig::validate`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Health, readiness and metrics endpoints.
    pub admin: AdminConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// How long a stop may take.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Leader election among the replicas.
    #[serde(default)]
    pub leader: LeaderConfig,
    /// The outbox relay to Kafka (on the leader).
    #[serde(default)]
    pub relay: RelayConfig,
    /// Consumer-lag monitoring.
    #[serde(default)]
    pub lag: LagConfig,
    /// The saga engine (on the leader).
    #[serde(default)]
    pub sagas: SagasConfig,
    /// The operator API and the saga page.
    #[serde(default)]
    pub api: ApiConfig,
    /// This process's Kafka login (relay, reply consumer, lag monitor).
    #[serde(default)]
    pub kafka: KafkaAuth,
    /// Mesh configuration for the sidecars.
    #[serde(default)]
    pub mesh: MeshConfig,
}

/// Where the configuration stream for sidecars listens by default.
pub const DEFAULT_MESH_PORT: u16 = 7504;

/// Mesh configuration for the sidecars: watched on the Kubernetes API (every
/// replica), served as a gRPC stream (`statefabric.control.v1.ConfigDistribution`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Watch the resources and serve the stream (off: neither).
    pub enabled: bool,
    /// The stream's gRPC address.
    pub listen: SocketAddr,
    /// PEM certificate chain and key for TLS (both or neither; a pod's
    /// sidecars should only ever reach the stream over TLS).
    pub tls_cert: Option<PathBuf>,
    /// The PEM key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The audience sidecars' projected ServiceAccount tokens are minted
    /// for; each token is checked with a TokenReview.
    pub audience: String,
    /// How often resources' status (Ready, sidecar counts) is written, at
    /// most (leader only).
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// How often the Secrets Upstreams name are read again, so a rotated
    /// key reaches running sidecars.
    #[serde(with = "humantime_serde")]
    pub secret_refresh: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_MESH_PORT)),
            tls_cert: None,
            tls_key: None,
            audience: "statefabric".to_owned(),
            status_interval: Duration::from_secs(1),
            secret_refresh: Duration::from_secs(30),
        }
    }
}

/// Where sagas are kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SagaBackend {
    /// The embedded SQLite file (single node, `leader.backend = solo`).
    #[default]
    Sqlite,
    /// Postgres (`leader.backend = postgres`: writes are fenced by its epoch).
    Postgres,
}

/// How saga tasks reach the agents' sidecars and their replies come back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SagaTransport {
    /// Sidecars claim tasks from the saga tables and answer into the inbox.
    #[default]
    Tables,
    /// Tasks go through the outbox and the relay to Kafka; replies come back
    /// on `sagas.replies` (needs `[relay] enabled`).
    Kafka,
}

/// The saga engine (runs on the leader).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SagasConfig {
    /// Run the engine (on the leader) and serve the operator API.
    pub enabled: bool,
    /// Default: postgres with `leader.backend = postgres`, else sqlite.
    pub store: Option<SagaBackend>,
    /// Tables (the default) or Kafka.
    pub transport: SagaTransport,
    /// A login that is a member of `statefabric_saga_engine_role` (default:
    /// `leader.postgres_url`).
    pub postgres_url: String,
    /// The engine's Postgres pool size.
    pub connections: u32,
    /// The embedded database file (shared with a sidecar in `fabric dev`).
    pub sqlite_path: PathBuf,
    /// Registers the built-in Planner → Coder → Critic definition.
    pub builtin: bool,
    /// Definition files (YAML or JSON), validated at start.
    pub definitions: Vec<PathBuf>,
    /// Inbox rows and due timers per engine pass.
    pub batch: u32,
    /// Sagas whose transitions are committed in one transaction.
    pub commit_batch: usize,
    /// Batches committed at once.
    pub concurrency: usize,
    /// The longest pause between idle passes on Postgres. Passes run when
    /// inbox rows arrive and when the next timer is due; the tick only
    /// bounds how late a row the arrival signal missed is seen. The
    /// embedded store's signal misses nothing, so there it is not used.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How often the stalled-sagas gauge is counted.
    #[serde(with = "humantime_serde")]
    pub stalled_every: Duration,
}

impl Default for SagasConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store: None,
            transport: SagaTransport::Tables,
            postgres_url: String::new(),
            connections: 16,
            sqlite_path: PathBuf::from("statefabric-data/events.db"),
            builtin: true,
            definitions: Vec::new(),
            batch: 512,
            commit_batch: 64,
            concurrency: 4,
            tick: Duration::from_secs(1),
            stalled_every: Duration::from_secs(15),
        }
    }
}

/// The operator API and the saga page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// REST with JSON, and the saga page (`/ui`).
    pub listen: SocketAddr,
    /// gRPC (`statefabric.control.v1.Sagas`).
    pub grpc_listen: SocketAddr,
    /// Operator name → bearer token. The name is recorded with each action.
    pub operators: BTreeMap<String, String>,
    /// Serve without tokens (the embedded `fabric dev` on localhost only).
    pub allow_anonymous: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_GRPC_PORT)),
            operators: BTreeMap::new(),
            allow_anonymous: false,
        }
    }
}

impl SagasConfig {
    /// The store in use: `store` if set, else what the leader backend
    /// implies (Postgres wherever leaders are fenced there).
    pub fn backend(&self, leader: LeaderBackend) -> SagaBackend {
        self.store.unwrap_or(match leader {
            LeaderBackend::Solo => SagaBackend::Sqlite,
            LeaderBackend::Postgres | LeaderBackend::Kubernetes => SagaBackend::Postgres,
        })
    }

    /// Every problem, with the field it is in.
    pub fn check(&self, issues: &mut Issues) {
        if self.connections == 0
            || self.batch == 0
            || self.commit_batch == 0
            || self.concurrency == 0
        {
            issues.push(
                "sagas.batch",
                "batch, commit_batch, concurrency and connections must be positive",
            );
        }
        if self.tick.is_zero() || self.tick > Duration::from_secs(10) {
            issues.push("sagas.tick", "must be between 1ms and 10s");
        }
    }
}

impl ApiConfig {
    /// Every problem, with the field it is in: anonymous access off
    /// loopback, operator tokens too short to be secrets.
    pub fn check(&self, issues: &mut Issues) {
        if self.allow_anonymous
            && !(self.listen.ip().is_loopback() && self.grpc_listen.ip().is_loopback())
        {
            issues.push(
                "api.allow_anonymous",
                "only on loopback addresses (api.listen, api.grpc_listen)",
            );
        }
        for (name, token) in &self.operators {
            if token.len() < 16 {
                issues.push(
                    "api.operators",
                    format!("the token of {name:?} must be at least 16 characters"),
                );
            }
        }
    }
}

/// Consumer-lag monitoring (every replica exports it; alerts take one
/// reading per partition).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LagConfig {
    /// Brokers to read offsets from (empty: no monitoring).
    pub kafka_bootstrap: String,
    /// Consumer group → comma-separated topics it consumes.
    pub groups: std::collections::BTreeMap<String, String>,
    /// How often lag is read.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for LagConfig {
    fn default() -> Self {
        Self {
            kafka_bootstrap: String::new(),
            groups: Default::default(),
            interval: Duration::from_secs(15),
        }
    }
}

/// The built-in outbox relay (runs on the leader; needs the Postgres
/// leader backend, whose URL it uses: that login needs
/// `statefabric_relay_role`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Run the relay on the leader.
    pub enabled: bool,
    /// Brokers the relay produces to.
    pub kafka_bootstrap: String,
    /// The Schema Registry's Confluent-compatible API root.
    pub registry_url: String,
    /// Shared by every replica, so Kafka fences a former leader's producer.
    pub transactional_id: String,
    /// Outbox rows per Kafka transaction, at most.
    pub batch: u32,
    /// Pause when the outbox is empty.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// Deadline of each Kafka and registry step.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Partitions, replication and retention of the topics it creates.
    pub topics: TopicSettings,
}

impl RelayConfig {
    /// The relay's brokers, with this process's Kafka login.
    pub fn brokers(&self, auth: &KafkaAuth) -> Brokers {
        Brokers::new(&self.kafka_bootstrap, auth.clone())
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kafka_bootstrap: String::new(),
            registry_url: String::new(),
            transactional_id: "statefabric-outbox-relay".to_owned(),
            batch: 500,
            idle_poll: Duration::from_millis(10),
            timeout: Duration::from_secs(10),
            topics: TopicSettings::default(),
        }
    }
}

/// How the replicas elect their leader.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LeaderBackend {
    /// A single instance (embedded): always leader.
    #[default]
    Solo,
    /// A lease row in Postgres, shared by the replicas.
    Postgres,
    /// A Kubernetes Lease (`coordination.k8s.io/v1`) in
    /// `kubernetes_namespace`; the Postgres lease row of the same name still
    /// fences the writes, so `postgres_url` is needed too.
    Kubernetes,
}

impl LeaderBackend {
    /// Whether leaders' writes are fenced by an epoch in Postgres.
    pub fn fenced_in_postgres(self) -> bool {
        matches!(self, Self::Postgres | Self::Kubernetes)
    }
}

/// Leader election: one replica runs the saga engine, the relay and the
/// status writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderConfig {
    /// Solo, Postgres or Kubernetes.
    pub backend: LeaderBackend,
    /// Application-role URL (postgres backend).
    pub postgres_url: String,
    /// Owner-role URL used to apply migrations at start, if set.
    pub postgres_migrate_url: Option<String>,
    /// The role elected for; replicas of one deployment share it.
    pub name: String,
    /// This replica's name in the lease (default: host, pid and a random
    /// suffix, unique per process).
    pub identity: String,
    /// The Lease's namespace (kubernetes backend; default: the pod's own,
    /// from its ServiceAccount mount, else `default`).
    pub kubernetes_namespace: String,
    /// How long a lease lasts without renewal; a successor takes over this
    /// long after a leader stops renewing.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How often the leader renews (well under `ttl`).
    #[serde(with = "humantime_serde")]
    pub renew_every: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            backend: LeaderBackend::Solo,
            postgres_url: String::new(),
            postgres_migrate_url: None,
            name: "control-plane".to_owned(),
            identity: String::new(),
            kubernetes_namespace: String::new(),
            ttl: Duration::from_secs(5),
            renew_every: Duration::from_secs(1),
        }
    }
}

impl ControlPlaneConfig {
    /// Every section at its default: a solo control plane on SQLite.
    pub fn defaults() -> Self {
        Self {
            admin: AdminConfig::on_port(DEFAULT_ADMIN_PORT),
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
            leader: LeaderConfig::default(),
            relay: RelayConfig::default(),
            lag: LagConfig::default(),
            sagas: SagasConfig::default(),
            api: ApiConfig::default(),
            kafka: KafkaAuth::default(),
            mesh: MeshConfig::default(),
        }
    }
}

impl ServiceConfig for ControlPlaneConfig {
    const SECTIONS: &'static [&'static str] = &[
        "admin",
        "telemetry",
        "shutdown",
        "leader",
        "relay",
        "lag",
        "sagas",
        "api",
        "kafka",
        "mesh",
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
        let l = &self.leader;
        if l.backend.fenced_in_postgres()
            && !l.postgres_url.starts_with("postgres://")
            && !l.postgres_url.starts_with("postgresql://")
        {
            issues.push("leader.postgres_url", "must be a postgres:// URL");
        }
        let m = &self.mesh;
        if m.enabled {
            if m.tls_cert.is_some() != m.tls_key.is_some() {
                issues.push(
                    "mesh.tls_cert",
                    "give both tls_cert and tls_key, or neither",
                );
            }
            if m.audience.is_empty() {
                issues.push("mesh.audience", "must not be empty");
            }
            if m.status_interval.is_zero() {
                issues.push("mesh.status_interval", "must be positive");
            }
            if m.secret_refresh < Duration::from_secs(1) {
                issues.push("mesh.secret_refresh", "must be at least 1s");
            }
        }
        if l.name.is_empty() || l.name.len() > 128 {
            issues.push("leader.name", "must be 1-128 characters");
        }
        let sagas = &self.sagas;
        if sagas.enabled {
            sagas.check(issues);
            self.api.check(issues);
            match (sagas.backend(l.backend), l.backend) {
                (SagaBackend::Postgres, LeaderBackend::Solo) => issues.push(
                    "sagas.store",
                    "postgres needs leader.backend = postgres or kubernetes (its epoch fences the writes)",
                ),
                (SagaBackend::Sqlite, LeaderBackend::Postgres | LeaderBackend::Kubernetes) => issues.push(
                    "sagas.store",
                    "sqlite is single-node: use it with leader.backend = solo",
                ),
                _ => {}
            }
            if sagas.transport == SagaTransport::Kafka && !self.relay.enabled {
                issues.push(
                    "sagas.transport",
                    "kafka needs the outbox relay ([relay] enabled = true)",
                );
            }
        }
        if let Some(problem) = self.kafka.problem() {
            issues.push("kafka.password", problem);
        }
        let r = &self.relay;
        if r.enabled {
            if !l.backend.fenced_in_postgres() {
                issues.push(
                    "relay.enabled",
                    "the relay needs leader.backend = postgres or kubernetes",
                );
            }
            if r.kafka_bootstrap.is_empty() {
                issues.push("relay.kafka_bootstrap", "must name at least one broker");
            }
            if !r.registry_url.starts_with("http://") && !r.registry_url.starts_with("https://") {
                issues.push("relay.registry_url", "must be an http(s):// URL");
            }
            if r.batch == 0 || r.timeout.is_zero() || r.idle_poll.is_zero() {
                issues.push(
                    "relay.batch",
                    "batch, idle_poll and timeout must be positive",
                );
            }
            if r.topics.replication < 1 || r.topics.min_insync_replicas > r.topics.replication {
                issues.push(
                    "relay.topics.replication",
                    "must be at least 1 and at least min_insync_replicas",
                );
            }
        }
        if !self.lag.groups.is_empty()
            && (self.lag.kafka_bootstrap.is_empty() || self.lag.interval.is_zero())
        {
            issues.push(
                "lag.kafka_bootstrap",
                "lag monitoring needs a broker and a positive interval",
            );
        }
        if l.renew_every.is_zero() || l.renew_every * 2 > l.ttl {
            issues.push(
                "leader.renew_every",
                "must be greater than zero and at most half of leader.ttl",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use statefabric_runtime::config::load_from;

    use super::*;

    #[test]
    fn defaults_are_solo_and_problems_are_named() {
        let ok =
            load_from(ControlPlaneConfig::defaults(), None, std::iter::empty()).expect("defaults");
        assert_eq!(ok.leader.backend, LeaderBackend::Solo);
        let err = load_from(
            ControlPlaneConfig::defaults(),
            None,
            [
                ("STATEFABRIC_LEADER__BACKEND", "postgres"),
                ("STATEFABRIC_LEADER__RENEW_EVERY", "4s"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("leader.postgres_url") && text.contains("leader.renew_every"),
            "{text}"
        );
    }

    #[test]
    fn mesh_settings_that_cannot_work_are_named() {
        let err = load_from(
            ControlPlaneConfig::defaults(),
            None,
            [
                ("STATEFABRIC_MESH__ENABLED", "true"),
                ("STATEFABRIC_MESH__TLS_CERT", "/etc/mesh.crt"),
                ("STATEFABRIC_MESH__AUDIENCE", ""),
                ("STATEFABRIC_MESH__STATUS_INTERVAL", "0s"),
                ("STATEFABRIC_MESH__SECRET_REFRESH", "0s"),
                ("STATEFABRIC_LEADER__BACKEND", "kubernetes"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .expect_err("invalid");
        let text = err.to_string();
        for key in [
            "mesh.tls_cert",
            "mesh.audience",
            "mesh.status_interval",
            "mesh.secret_refresh",
            "leader.postgres_url",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
    }

    #[test]
    fn saga_and_api_settings_that_cannot_work_are_named() {
        let err = load_from(
            ControlPlaneConfig::defaults(),
            None,
            [
                ("STATEFABRIC_SAGAS__STORE", "postgres"),
                ("STATEFABRIC_SAGAS__TRANSPORT", "kafka"),
                ("STATEFABRIC_SAGAS__TICK", "0s"),
                ("STATEFABRIC_API__LISTEN", "0.0.0.0:7502"),
                ("STATEFABRIC_API__ALLOW_ANONYMOUS", "true"),
                ("STATEFABRIC_API__OPERATORS__ALICE", "short"),
                ("STATEFABRIC_KAFKA__USERNAME", "statefabric-control-plane"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .expect_err("invalid");
        let text = err.to_string();
        for (field, why) in [
            ("sagas.store", "leader.backend = postgres"),
            ("sagas.transport", "relay"),
            ("sagas.tick", "between"),
            ("api.allow_anonymous", "loopback"),
            ("api.operators", "16 characters"),
            ("kafka.password", "needs a password"),
        ] {
            assert!(
                text.contains(field) && text.contains(why),
                "{field}: {text}"
            );
        }
    }
}
