//! The topic plan: topics are named by class and configured per class, so
//! every environment gets the same layout and only the numbers differ
//! (production values in `k8s/charts/statefabric/files/kafka/`, single-broker
//! values in tests).
//!
//! | class | name | key | retention | why |
//! |---|---|---|---|---|
//! | events | `events.<aggregate type>` | aggregate id | 7 days, delete | the event store is the record; Kafka carries it to consumers |
//! | commands | `sagas.commands.<agent type>`, per tenant `tenants.<tenant>.sagas.commands.<agent type>` | saga id | 1 day, delete | a task nobody took in a day is handled by the saga's timeout |
//! | replies | `sagas.replies` | saga id | 1 day, delete | |
//! | dead letters | `dlq.<consumed topic>` | original key | 14 days, delete | time for an operator to inspect and replay |
//!
//! Keys keep order per aggregate (or saga): one key, one partition.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kinds of topic the plan makes, each with settings of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicClass {
    /// `events.<aggregate type>`: the outbox's events.
    Events,
    /// `sagas.commands.<agent type>`: saga tasks.
    Commands,
    /// `sagas.replies`: agents' answers.
    Replies,
    /// `dlq.<topic>`: what a consumer gave up on.
    DeadLetters,
}

/// How topics of one class are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSettings {
    /// Partitions per topic (only ever raised on an existing topic).
    pub partitions: i32,
    /// How long messages are kept (`retention.ms`).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

/// How the plan's topics are made and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    /// Copies of each partition.
    pub replication: i32,
    /// Copies that must have a write before it is acknowledged.
    pub min_insync_replicas: i32,
    /// Event topics.
    pub events: ClassSettings,
    /// Saga command topics.
    pub commands: ClassSettings,
    /// The reply topic.
    pub replies: ClassSettings,
    /// Dead-letter topics.
    pub dead_letters: ClassSettings,
}

impl Default for TopicSettings {
    /// Production: three replicas, two in sync for a write.
    fn default() -> Self {
        let day = Duration::from_secs(24 * 3600);
        Self {
            replication: 3,
            min_insync_replicas: 2,
            events: ClassSettings {
                partitions: 12,
                retention: day * 7,
            },
            commands: ClassSettings {
                partitions: 6,
                retention: day,
            },
            replies: ClassSettings {
                partitions: 6,
                retention: day,
            },
            dead_letters: ClassSettings {
                partitions: 3,
                retention: day * 14,
            },
        }
    }
}

impl TopicSettings {
    /// One broker (tests, `fabric dev` with Kafka).
    pub fn single_broker() -> Self {
        Self {
            replication: 1,
            min_insync_replicas: 1,
            ..Self::default()
        }
    }

    /// The settings of one class.
    pub fn class(&self, class: TopicClass) -> ClassSettings {
        match class {
            TopicClass::Events => self.events,
            TopicClass::Commands => self.commands,
            TopicClass::Replies => self.replies,
            TopicClass::DeadLetters => self.dead_letters,
        }
    }
}

/// Topic names keep to Kafka's alphabet; anything else becomes `_`.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The topic an aggregate type's events go to.
pub fn events_topic(aggregate_type: &str) -> String {
    format!("events.{}", sanitize(aggregate_type))
}

/// The topic an agent type's saga tasks go to.
pub fn commands_topic(agent_type: &str) -> String {
    format!("sagas.commands.{}", sanitize(agent_type))
}

/// One tenant's commands for an agent type:
/// `tenants.<tenant>.sagas.commands.<agent>`. Tenant first, so one prefixed
/// ACL (`tenants.<tenant>.`, [`tenant_topic_prefix`]) gives a tenant's own
/// Kafka principal its topics and no other tenant's.
pub fn tenant_commands_topic(agent_type: &str, tenant: &str) -> String {
    format!(
        "{}{}",
        tenant_topic_prefix(tenant),
        commands_topic(agent_type)
    )
}

/// Every topic of one tenant starts with this (the trailing dot keeps
/// tenant `a` from matching tenant `ab`).
pub fn tenant_topic_prefix(tenant: &str) -> String {
    format!("tenants.{}.", sanitize(tenant))
}

/// The consumer group a tenant's sidecars read an agent type's commands in.
pub fn agent_group(tenant: &str, agent_type: &str) -> String {
    format!("{}{}", tenant_group_prefix(tenant), sanitize(agent_type))
}

/// Every consumer group of one tenant starts with this.
pub fn tenant_group_prefix(tenant: &str) -> String {
    format!("statefabric-agents.{}.", sanitize(tenant))
}

/// The topic agents answer saga tasks on.
pub const REPLIES_TOPIC: &str = "sagas.replies";

/// Where a consumer of `consumed` puts what it gives up on.
pub fn dead_letter_topic(consumed: &str) -> String {
    format!("dlq.{}", sanitize(consumed))
}

/// A topic the plan wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The topic's name.
    pub name: String,
    /// Which settings it gets.
    pub class: TopicClass,
}

/// The whole layout for the given aggregate and agent types: their topics,
/// the reply topic, and a dead-letter topic for every consumed topic
/// (commands and replies are consumed; events by applications).
pub fn plan(aggregate_types: &[&str], agent_types: &[&str]) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut add = |name: String, class| out.push(Planned { name, class });
    for a in aggregate_types {
        add(events_topic(a), TopicClass::Events);
        add(dead_letter_topic(&events_topic(a)), TopicClass::DeadLetters);
    }
    for a in agent_types {
        add(commands_topic(a), TopicClass::Commands);
        add(
            dead_letter_topic(&commands_topic(a)),
            TopicClass::DeadLetters,
        );
    }
    add(REPLIES_TOPIC.to_owned(), TopicClass::Replies);
    add(dead_letter_topic(REPLIES_TOPIC), TopicClass::DeadLetters);
    out
}

#[cfg(feature = "client")]
pub use crate::topic_admin::{Applied, TopicError, apply};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_topics_and_groups_share_a_prefix_no_other_tenant_matches() {
        assert_eq!(
            tenant_commands_topic("coder", "acme"),
            "tenants.acme.sagas.commands.coder"
        );
        assert_eq!(
            agent_group("acme", "coder"),
            "statefabric-agents.acme.coder"
        );
        assert!(tenant_commands_topic("coder", "acme").starts_with(&tenant_topic_prefix("acme")));
        assert!(!tenant_commands_topic("coder", "acmex").starts_with(&tenant_topic_prefix("acme")));
        assert!(!agent_group("acmex", "coder").starts_with(&tenant_group_prefix("acme")));
    }

    #[test]
    fn the_plan_names_every_topic_by_class() {
        let planned = plan(&["task", "repo/file"], &["coder"]);
        let names: Vec<&str> = planned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "events.task",
                "dlq.events.task",
                "events.repo_file",
                "dlq.events.repo_file",
                "sagas.commands.coder",
                "dlq.sagas.commands.coder",
                "sagas.replies",
                "dlq.sagas.replies",
            ]
        );
    }
}
