//! The Debezium outbox path on the real Kafka Connect: the connector
//! configuration the chart registers (`k8s/charts/statefabric/files/kafka/`,
//! JSON for Connect's REST API) is registered with the test environment's
//! addresses, and an appended event arrives on its routed
//! topic, keyed by aggregate id, with the event id in a header.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};
use statefabric_domain::{ExpectedVersion, NewEvent, StreamId, TenantId};
use statefabric_store::pg::{PgConfig, PgEventStore};
use statefabric_store::{AppendRequest, EventStore, Scope};
use statefabric_tests as env;

#[tokio::test]
async fn an_appended_event_arrives_on_its_routed_topic() -> anyhow::Result<()> {
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    env::kafka::register_debezium().await?;
    let name = env::kafka::DEBEZIUM_CONNECTOR;
    let status_url = format!("{}/connectors/{name}/status", env::connect_url());
    env::eventually(
        "connector and task running",
        Duration::from_secs(90),
        || {
            let status_url = status_url.clone();
            async move {
                let status = env::http("GET", &status_url, None, None).await?.json()?;
                let running = status["connector"]["state"] == "RUNNING"
                    && status["tasks"].as_array().is_some_and(|t| {
                        !t.is_empty() && t.iter().all(|t| t["state"] == "RUNNING")
                    });
                if status["tasks"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t["state"] == "FAILED"))
                {
                    anyhow::bail!("connector task failed: {status}");
                }
                Ok(running.then_some(()))
            }
        },
    )
    .await?;

    let run = uuid::Uuid::new_v4().simple().to_string();
    let stream_type = format!("cdctest_{}", &run[..8]);
    let tenant = TenantId::new(format!("t-{}", &run[..12]))?;
    statefabric_db::pg::create_tenant(&env::pg_admin_url(), &tenant, "cdc test").await?;
    let store = PgEventStore::connect(PgConfig {
        url: env::pg_app_url(),
        ..PgConfig::default()
    })
    .await?;
    let aggregate = StreamId::new("order-7")?;
    let written = store
        .append(
            &Scope::new(tenant.clone(), "cdc-test"),
            AppendRequest::new(
                aggregate.clone(),
                &stream_type,
                ExpectedVersion::NoStream,
                (0..3)
                    .map(|n| NewEvent::new("OrderChanged", json!({"n": n})))
                    .collect(),
            ),
        )
        .await?;
    let _ = written;

    let topic = format!("cdc.events.{stream_type}");
    let consumer: StreamConsumer = env::kafka::admin()
        .set("group.id", format!("cdc-test-{run}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    env::eventually("the routed topic exists", Duration::from_secs(60), || {
        let found = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .is_ok_and(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == topic && !t.partitions().is_empty())
            });
        async move { Ok(found.then_some(())) }
    })
    .await?;
    consumer.subscribe(&[&topic])?;
    let mut received = Vec::new();
    while received.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {} of 3 events arrived", received.len()))??;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        assert_eq!(key, aggregate.as_str(), "keyed by aggregate id");
        let event_id = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "event_id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).trim_matches('"').to_owned())
            .ok_or_else(|| anyhow::anyhow!("no event_id header"))?;
        let payload: Value = serde_json::from_slice(message.payload().unwrap_or_default())?;
        // The payload is the outbox row's JSON (a JSON string when the
        // converter keeps Debezium's Json type as text).
        let payload = match payload {
            Value::String(text) => serde_json::from_str(&text)?,
            other => other,
        };
        assert_eq!(payload["id"].as_str(), Some(event_id.as_str()));
        received.push(payload["data"]["n"].as_i64().unwrap_or(-1));
    }
    assert_eq!(received, [0, 1, 2], "in order for the aggregate");
    Ok(())
}
