//! Consumer lag on the real Kafka: a group that committed part of a topic is
//! reported that many messages behind, per partition, and zero once caught
//! up; a group without commits is behind by everything; the gauge is
//! exported for Prometheus.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use statefabric_kafka::lag::LagMonitor;
use statefabric_tests as env;

fn commit(group: &str, topic: &str, offset: i64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = env::kafka::admin()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))?;
    consumer.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

#[tokio::test]
async fn lag_is_what_a_group_has_not_committed() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("lag-test-{run}");
    env::kafka::create_topic(&topic, 2).await?;
    let producer: FutureProducer = env::kafka::admin().create()?;
    for i in 0..10 {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("k")
                    .payload(&format!("m{i}")),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let (caught_up, behind, never) = (
        format!("lag-a-{run}"),
        format!("lag-b-{run}"),
        format!("lag-c-{run}"),
    );
    commit(&behind, &topic, 4)?;
    commit(&caught_up, &topic, 10)?;
    let monitor = LagMonitor::new(
        // As the control plane, whose ACLs it runs under.
        env::kafka::Principal::ControlPlane.brokers(),
        BTreeMap::from([
            (caught_up.clone(), vec![topic.clone()]),
            (behind.clone(), vec![topic.clone()]),
            (never.clone(), vec![topic.clone()]),
        ]),
        Duration::from_secs(10),
    );
    let mut registry = prometheus_client::registry::Registry::with_prefix("statefabric");
    monitor.register_metrics(&mut registry);
    let lags = monitor.poll().await?;
    let lag = |g: &str, p: i32| lags.get(&(g.to_owned(), topic.clone(), p)).copied();
    assert_eq!(lag(&behind, 0), Some(6));
    assert_eq!(lag(&caught_up, 0), Some(0));
    assert_eq!(lag(&never, 0), Some(10), "nothing committed: all of it");
    assert_eq!(
        lag(&behind, 1),
        Some(0),
        "the empty partition is reported too"
    );
    commit(&behind, &topic, 10)?;
    assert_eq!(
        monitor
            .poll()
            .await?
            .get(&(behind.clone(), topic.clone(), 0)),
        Some(&0)
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    assert!(
        text.contains(&format!(
            "statefabric_kafka_consumer_lag{{group=\"{never}\",topic=\"{topic}\",partition=\"0\"}} 10"
        )),
        "{text}"
    );
    Ok(())
}
