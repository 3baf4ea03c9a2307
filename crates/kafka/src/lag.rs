//! Consumer lag: for each configured group and topic, the high watermark of
//! every partition minus the group's committed offset, exported as
//! `statefabric_kafka_consumer_lag{group,topic,partition}` for the alert at
//! 10,000 messages (`k8s/charts/statefabric/files/rules/kafka.rules.yaml`).
//!
//! Groups are named in configuration with their topics: Kafka's API has no
//! cheap "all offsets of every group" call in librdkafka's client, and
//! naming them keeps the label set bounded.

use crate::brokers::Brokers;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabel {
    group: String,
    topic: String,
    partition: i32,
}

/// (group, topic, partition) → messages not yet consumed.
pub type Lags = BTreeMap<(String, String, i32), i64>;

/// Reads how far consumer groups are behind and exports it as
/// `kafka_consumer_lag` per group, topic and partition.
#[derive(Clone)]
pub struct LagMonitor {
    brokers: Brokers,
    /// group → topics.
    targets: BTreeMap<String, Vec<String>>,
    timeout: Duration,
    gauges: Family<LagLabel, Gauge>,
    /// One reader per group, made on first use and kept: a poll reuses its
    /// broker connections instead of opening new ones every interval.
    readers: Arc<Mutex<BTreeMap<String, Arc<BaseConsumer>>>>,
}

impl std::fmt::Debug for LagMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagMonitor")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl LagMonitor {
    /// A monitor of `targets` (group → the topics it consumes), each read
    /// within `timeout`.
    pub fn new(
        brokers: Brokers,
        targets: BTreeMap<String, Vec<String>>,
        timeout: Duration,
    ) -> Self {
        Self {
            brokers,
            targets,
            timeout,
            gauges: Family::default(),
            readers: Arc::default(),
        }
    }

    /// Registers the lag gauges in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "kafka_consumer_lag",
            "Messages a consumer group has not yet committed, per partition",
            self.gauges.clone(),
        );
    }

    /// Reads every target once and updates the gauges.
    pub async fn poll(&self) -> Result<Lags, rdkafka::error::KafkaError> {
        let this = self.clone();
        let lags = tokio::task::spawn_blocking(move || this.read())
            .await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)??;
        for ((group, topic, partition), lag) in &lags {
            self.gauges
                .get_or_create(&LagLabel {
                    group: group.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                })
                .set(*lag);
        }
        Ok(lags)
    }

    fn read(&self) -> Result<Lags, rdkafka::error::KafkaError> {
        let mut lags = Lags::new();
        for (group, topics) in &self.targets {
            let consumer = self.reader(group)?;
            let mut partitions = TopicPartitionList::new();
            for topic in topics {
                let metadata = consumer.fetch_metadata(Some(topic), self.timeout)?;
                for t in metadata.topics() {
                    for p in t.partitions() {
                        partitions.add_partition(t.name(), p.id());
                    }
                }
            }
            let committed = consumer.committed_offsets(partitions, self.timeout)?;
            for element in committed.elements() {
                let (low, high) = consumer.fetch_watermarks(
                    element.topic(),
                    element.partition(),
                    self.timeout,
                )?;
                let consumed = match element.offset() {
                    Offset::Offset(o) => o,
                    // Nothing committed: everything still there is unread.
                    _ => low,
                };
                lags.insert(
                    (
                        group.clone(),
                        element.topic().to_owned(),
                        element.partition(),
                    ),
                    (high - consumed).max(0),
                );
            }
        }
        Ok(lags)
    }

    /// The group's reader. Not subscribed: it only reads the group's
    /// commits, it never joins the group.
    fn reader(&self, group: &str) -> Result<Arc<BaseConsumer>, rdkafka::error::KafkaError> {
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reader) = readers.get(group) {
            return Ok(reader.clone());
        }
        let reader: Arc<BaseConsumer> = Arc::new(
            self.brokers
                .client()
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .create()?,
        );
        readers.insert(group.to_owned(), reader.clone());
        Ok(reader)
    }

    /// Polls every `interval` until `stop`.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        loop {
            if let Err(err) = self.poll().await {
                tracing::warn!(error = %err, "cannot read consumer lag");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// Parses `topic,topic` lists from configuration.
pub fn topics(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}
