//! The topic plan on the real Kafka: applying it creates every topic with
//! its class's partitions and settings, and applying it again changes
//! nothing but re-asserts the settings. The production manifests in
//! `k8s/charts/statefabric/files/kafka/topics.yaml` carry the code's production values.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use serde_json::Value;
use statefabric_kafka::topics::{self, TopicSettings};
use statefabric_tests as env;

#[tokio::test]
async fn the_plan_is_applied_idempotently_with_each_class_settings() -> anyhow::Result<()> {
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let admin: AdminClient<DefaultClientContext> = env::kafka::admin().create()?;
    let aggregate = format!("plan_{run}");
    let agent = format!("agent_{run}");
    let planned: Vec<_> = topics::plan(&[&aggregate], &[&agent])
        .into_iter()
        .filter(|p| p.name.contains(run))
        .collect();
    assert_eq!(planned.len(), 4, "events, commands and their dead letters");
    let mut settings = TopicSettings::single_broker();
    settings.events.partitions = 4;
    let first = topics::apply(&admin, &planned, &settings, Duration::from_secs(10)).await?;
    assert_eq!(first.created.len(), 4, "{first:?}");
    let again = topics::apply(&admin, &planned, &settings, Duration::from_secs(10)).await?;
    assert!(
        again.created.is_empty() && again.updated.len() == 4,
        "{again:?}"
    );

    let events = topics::events_topic(&aggregate);
    let metadata = admin
        .inner()
        .fetch_metadata(Some(&events), Duration::from_secs(10))?;
    assert_eq!(metadata.topics()[0].partitions().len(), 4);
    let configs = admin
        .describe_configs(&[ResourceSpecifier::Topic(&events)], &AdminOptions::new())
        .await?;
    let config = configs
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no config"))?
        .map_err(|code| anyhow::anyhow!("{code}"))?;
    let entries = config.entry_map();
    let value = |k: &str| entries.get(k).and_then(|e| e.value.clone());
    assert_eq!(value("retention.ms").as_deref(), Some("604800000"));
    assert_eq!(value("cleanup.policy").as_deref(), Some("delete"));
    assert_eq!(value("min.insync.replicas").as_deref(), Some("1"));
    Ok(())
}

#[test]
fn the_production_manifests_carry_the_code_values() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../k8s/charts/statefabric/files/kafka/topics.yaml"),
    )?;
    let production = TopicSettings::default();
    let mut seen = 0;
    for doc in text.split("\n---\n") {
        let topic: Value = yaml_serde::from_str(doc)?;
        let name = topic["metadata"]["name"].as_str().unwrap_or_default();
        let class = if name.starts_with("dlq.") {
            production.dead_letters
        } else {
            production.replies
        };
        assert_eq!(topic["spec"]["partitions"], class.partitions, "{name}");
        assert_eq!(topic["spec"]["replicas"], production.replication, "{name}");
        let config = &topic["spec"]["config"];
        assert_eq!(
            config["retention.ms"].as_str(),
            Some(class.retention.as_millis().to_string().as_str()),
            "{name}"
        );
        assert_eq!(
            config["min.insync.replicas"].as_str(),
            Some(production.min_insync_replicas.to_string().as_str()),
            "{name}"
        );
        seen += 1;
    }
    assert_eq!(seen, 2);
    Ok(())
}
