//! The control plane's configuration: the shared sections plus leader
//! election.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use statefabric_kafka::topics::TopicSettings;
use statefabric_runtime::{AdminConfig, Issues, ServiceConfig, ShutdownConfig, TelemetryConfig};

pub const DEFAULT_ADMIN_PORT: u16 = 7501;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub leader: LeaderConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub lag: LagConfig,
}

/// Consumer-lag monitoring (every replica exports it; alerts take one
/// reading per partition).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LagConfig {
    pub kafka_bootstrap: String,
    /// Consumer group → comma-separated topics it consumes.
    pub groups: std::collections::BTreeMap<String, String>,
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
    pub enabled: bool,
    pub kafka_bootstrap: String,
    /// The Schema Registry's Confluent-compatible API root.
    pub registry_url: String,
    /// Shared by every replica, so Kafka fences a former leader's producer.
    pub transactional_id: String,
    pub batch: u32,
    /// Pause when the outbox is empty.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// Deadline of each Kafka and registry step.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub topics: TopicSettings,
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LeaderBackend {
    /// A single instance (embedded): always leader.
    #[default]
    Solo,
    /// A lease row in Postgres, shared by the replicas.
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderConfig {
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
    /// How long a lease lasts without renewal; a successor takes over this
    /// long after a leader stops renewing.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
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
            ttl: Duration::from_secs(5),
            renew_every: Duration::from_secs(1),
        }
    }
}

impl ControlPlaneConfig {
    pub fn defaults() -> Self {
        Self {
            admin: AdminConfig::on_port(DEFAULT_ADMIN_PORT),
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
            leader: LeaderConfig::default(),
            relay: RelayConfig::default(),
            lag: LagConfig::default(),
        }
    }
}

impl ServiceConfig for ControlPlaneConfig {
    const SECTIONS: &'static [&'static str] =
        &["admin", "telemetry", "shutdown", "leader", "relay", "lag"];

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
        if l.backend == LeaderBackend::Postgres
            && !l.postgres_url.starts_with("postgres://")
            && !l.postgres_url.starts_with("postgresql://")
        {
            issues.push("leader.postgres_url", "must be a postgres:// URL");
        }
        if l.name.is_empty() || l.name.len() > 128 {
            issues.push("leader.name", "must be 1-128 characters");
        }
        let r = &self.relay;
        if r.enabled {
            if l.backend != LeaderBackend::Postgres {
                issues.push("relay.enabled", "the relay needs leader.backend = postgres");
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
}
