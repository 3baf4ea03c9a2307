//! Kafka helpers for the tests and benchmarks: topics of their own, and the
//! Debezium outbox connector's configuration pointed at the test
//! environment.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};

/// Creates `name` with `partitions` partitions on the test broker.
pub async fn create_topic(name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", crate::kafka_bootstrap())
        .create()?;
    for result in admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        result.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code}"))?;
    }
    Ok(())
}

/// The name the tests register the Debezium outbox connector under.
pub const DEBEZIUM_CONNECTOR: &str = "statefabric-outbox-test";

/// `k8s/kafka/debezium-outbox-connector.json` with the test environment's
/// database address and credentials, its own slot, single-broker topics,
/// and routing to `cdc.events.<aggregate type>` (beside the built-in
/// relay's `events.*`, not on them).
pub fn debezium_test_config() -> anyhow::Result<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s/kafka/debezium-outbox-connector.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let port = crate::pg_admin_url()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next().map(str::to_owned))
        .unwrap_or_default();
    for (key, value) in [
        ("database.hostname", "127.0.0.1".to_owned()),
        ("database.port", port),
        ("database.password", "statefabric_cdc".to_owned()),
        ("slot.name", "statefabric_outbox_test".to_owned()),
        (
            "transforms.outbox.route.topic.replacement",
            "cdc.events.${routedByValue}".to_owned(),
        ),
        ("topic.creation.default.replication.factor", "1".to_owned()),
        ("topic.creation.default.partitions", "3".to_owned()),
    ] {
        config[key] = json!(value);
    }
    Ok(config)
}

/// Registers (or updates) the test connector on the test Kafka Connect.
pub async fn register_debezium() -> anyhow::Result<()> {
    let url = format!(
        "{}/connectors/{DEBEZIUM_CONNECTOR}/config",
        crate::connect_url()
    );
    let config = debezium_test_config()?;
    let put = crate::http(
        "PUT",
        &url,
        Some("application/json"),
        Some(config.to_string()),
    )
    .await?;
    anyhow::ensure!(
        matches!(put.status, 200 | 201),
        "registering the connector: {} {}",
        put.status,
        put.body
    );
    Ok(())
}
