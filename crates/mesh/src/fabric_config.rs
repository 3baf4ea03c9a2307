//! `FabricConfig`: the sidecar settings for the pods it selects.

#![allow(
    unreachable_pub,
    reason = "kube's KubeSchema derive (the x_kube validation rules) re-emits these structs in a private module"
)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::GoDuration;
use crate::status::MeshStatus;

/// Settings for the sidecars of the pods it selects. A namespace has at
/// most one `default` (it selects every pod no other config selects); a pod
/// may name its config with the `statefabric.io/config` annotation.
#[derive(CustomResource, KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "statefabric.io",
    version = "v1alpha1",
    kind = "FabricConfig",
    namespaced,
    status = "MeshStatus",
    shortname = "fabcfg",
    category = "statefabric",
    doc = "Sidecar settings for the pods a FabricConfig selects.",
    printcolumn(name = "Default", type_ = "boolean", json_path = ".spec.default"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.sidecars.applied"
    ),
    printcolumn(
        name = "Refused",
        type_ = "integer",
        json_path = ".status.sidecars.refused"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!(has(self.default) && self.default && has(self.selector))").message("a default FabricConfig selects every pod of its namespace: remove spec.selector or spec.default"))]
#[serde(rename_all = "camelCase")]
pub struct FabricConfigSpec {
    /// The namespace's fallback config (for pods no other config selects).
    #[serde(default)]
    pub default: bool,
    /// The pods this config is for (by their labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Where the sidecars keep state: addresses, and credentials as
    /// Secret references. A change takes effect at a sidecar's next start.
    #[serde(default)]
    pub backends: Backends,
    /// The context cache (applied without a restart).
    #[serde(default)]
    pub cache: CacheSettings,
    /// Session namespaces and their TTL policies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub sessions: BTreeMap<String, SessionPolicy>,
    /// Bounds on what one agent may ask of the lock service.
    #[serde(default)]
    pub locks: LockLimits,
    /// The sidecars' log level (applied without a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// The building blocks served (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub building_blocks: Option<Vec<BuildingBlock>>,
}

/// Where a sidecar's state lives. Addresses only: credentials are Secret
/// references, mounted into the sidecar container alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backends {
    /// Events and context documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresBackend>,
    /// Locks, sessions and change updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisBackend>,
    /// Event publishing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaBackend>,
}

/// A Postgres server for the event and context store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresBackend {
    /// `host:port`.
    #[schemars(length(min = 1, max = 253))]
    pub address: String,
    /// The database holding Statefabric's tables.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// A Secret with `username` and `password`.
    pub credentials: SecretRef,
    /// The sidecar's pool size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 200))]
    pub max_connections: Option<u32>,
}

/// A Redis server or cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisBackend {
    /// `host:port` of the server, or seed nodes of a cluster.
    #[schemars(length(min = 1, max = 16))]
    pub addresses: Vec<String>,
    /// The addresses are seeds of a Redis Cluster.
    #[serde(default)]
    pub cluster: bool,
    /// A Secret with `username` and `password` (an ACL user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretRef>,
}

/// A Kafka cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBackend {
    /// `host:port` of bootstrap brokers.
    #[schemars(length(min = 1, max = 16))]
    pub bootstrap: Vec<String>,
    /// A Secret with `username` and `password` (SASL/SCRAM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretRef>,
}

/// A Secret in the resource's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The context cache (hot: applied without a restart).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSettings {
    /// Documents kept, at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10_000_000))]
    pub max_entries: Option<u64>,
    /// Bytes of content kept, at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 17_179_869_184_u64))]
    pub max_bytes: Option<u64>,
    /// The oldest an entry may be and still be served, a duration such as
    /// `30s` (bounds the harm of a change announcement lost by its sender).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<GoDuration>,
}

/// How long a session namespace's sessions live.
#[derive(KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("!has(self.maxTtl) || duration(self.maxTtl) >= duration(self.ttl)").message("maxTtl must be at least ttl"))]
#[serde(rename_all = "camelCase")]
pub struct SessionPolicy {
    /// How long a session lives (from creation, or from its last use), a
    /// duration such as `30m`.
    pub ttl: GoDuration,
    /// Whether use extends it.
    #[serde(default)]
    pub expiry: Expiry,
    /// The longest TTL a single write may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<GoDuration>,
}

/// When a session's lifetime starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Expiry {
    /// Lifetime from creation.
    #[default]
    Absolute,
    /// Each read or write restarts it.
    Sliding,
}

/// Bounds on what one agent may ask of the lock service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockLimits {
    /// The longest lease an acquire may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lease: Option<GoDuration>,
    /// The longest an acquire may wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<GoDuration>,
}

/// The least severe log events a sidecar writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(
    missing_docs,
    reason = "documented variants make schemars emit a oneOf, which kube turns into an enum without the null this Option field needs listed"
)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive of this level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// A part of the sidecar's API an agent may be given.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum BuildingBlock {
    /// Event streams (`Events`).
    Events,
    /// Shared context documents (`SharedContext`).
    Context,
    /// Distributed locks (`Locks`).
    Locks,
    /// Sessions (`Sessions`).
    Sessions,
    /// Saga tasks (`Tasks`).
    Tasks,
    /// The egress listener for the agent's outbound calls.
    Egress,
}
