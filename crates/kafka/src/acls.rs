//! A tenant's own Kafka principal: what it may reach (its command topics
//! and consumer groups by prefix, the shared reply topic to answer), and
//! the Strimzi `KafkaUser` that creates it with a password the onboarding
//! chose. Data only: Strimzi applies it on a cluster; the tests apply the
//! same list with Kafka's own ACL tool. A leaked tenant credential reads
//! one tenant's tasks, and writes nothing but replies (which the saga
//! engine checks against the task they answer).

use serde_json::{Value, json};

use crate::topics;

/// The tenant principal's user name (as its Redis user's).
pub fn tenant_principal(tenant: &str) -> String {
    format!("sf-tenant-{}", topics::sanitize(tenant))
}

/// What an ACL is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Topics.
    Topic,
    /// Consumer groups.
    Group,
}

/// How an ACL's name matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Exactly that name.
    Literal,
    /// Every name starting with it.
    Prefixed,
}

/// One ACL: allow `operations` on the resources `name` matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// Topics or groups.
    pub resource: Resource,
    /// How `name` matches.
    pub pattern: Pattern,
    /// The name or prefix.
    pub name: String,
    /// Kafka's operation names (`Read`, `Write`, `Describe`, …).
    pub operations: &'static [&'static str],
}

/// What `tenant`'s principal may do.
pub fn tenant_acls(tenant: &str) -> Vec<Acl> {
    vec![
        Acl {
            resource: Resource::Topic,
            pattern: Pattern::Prefixed,
            name: topics::tenant_topic_prefix(tenant),
            operations: &["Describe", "Read"],
        },
        Acl {
            resource: Resource::Group,
            pattern: Pattern::Prefixed,
            name: topics::tenant_group_prefix(tenant),
            operations: &["Read"],
        },
        Acl {
            resource: Resource::Topic,
            pattern: Pattern::Literal,
            name: topics::REPLIES_TOPIC.to_owned(),
            operations: &["Describe", "Write"],
        },
    ]
}

/// The Strimzi `KafkaUser` (`kafka.strimzi.io/v1`) for `tenant` in the
/// Kafka cluster's `namespace`: SCRAM-SHA-512 with the password in
/// `password_secret` (key `password`, same namespace), and
/// [`tenant_acls`].
pub fn kafka_user(tenant: &str, namespace: &str, cluster: &str, password_secret: &str) -> Value {
    let acls: Vec<Value> = tenant_acls(tenant)
        .into_iter()
        .map(|acl| {
            json!({
                "resource": {
                    "type": match acl.resource { Resource::Topic => "topic", Resource::Group => "group" },
                    "name": acl.name,
                    "patternType": match acl.pattern { Pattern::Literal => "literal", Pattern::Prefixed => "prefix" },
                },
                "operations": acl.operations,
                "host": "*",
            })
        })
        .collect();
    json!({
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaUser",
        "metadata": {
            "name": tenant_principal(tenant),
            "namespace": namespace,
            "labels": {"strimzi.io/cluster": cluster, "statefabric.io/tenant": tenant},
        },
        "spec": {
            "authentication": {
                "type": "scram-sha-512",
                "password": {"valueFrom": {"secretKeyRef": {"name": password_secret, "key": "password"}}},
            },
            "authorization": {"type": "simple", "acls": acls},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_reads_its_own_prefix_and_writes_only_replies() {
        let acls = tenant_acls("acme");
        let reads: Vec<&str> = acls
            .iter()
            .filter(|a| a.operations.contains(&"Read"))
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(reads, ["tenants.acme.", "statefabric-agents.acme."]);
        let writes: Vec<&str> = acls
            .iter()
            .filter(|a| a.operations.contains(&"Write"))
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(writes, ["sagas.replies"]);
        let user = kafka_user("acme", "kafka", "statefabric", "sf-tenant-acme-kafka");
        assert_eq!(user["metadata"]["name"], "sf-tenant-acme");
        assert_eq!(
            user["spec"]["authorization"]["acls"][0]["resource"]["patternType"],
            "prefix"
        );
    }
}
