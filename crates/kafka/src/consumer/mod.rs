//! The consumer framework: how Statefabric consumes Kafka, written once.
//!
//! Two runners over one contract (a message is handled, retried with
//! exponential backoff and jitter, or dead-lettered to `dlq.<topic>` with
//! where it came from and why, and consumption goes on):
//!
//! - [`partitioned::PartitionedConsumer`] hands each assigned partition to
//!   its own worker, in offset order, with at most
//!   `in_flight_per_partition` messages taken and not finished per
//!   partition; a partition with a full worker is *paused* at the broker
//!   (not buffered) and resumed once its worker drains. Offsets are stored
//!   only after their message is finished, so delivery is at least once;
//!   a handler that writes to Postgres makes it exactly once with
//!   [`crate::inbox::Inbox`] (the position recorded in the effect's
//!   transaction).
//! - [`transactional::TransactionalConsumer`] is Kafka to Kafka exactly
//!   once: a batch's outputs, its dead letters and its input offsets go in
//!   one Kafka transaction (`send_offsets_to_transaction`); anything that
//!   fails aborts it and the batch is consumed again from the committed
//!   offsets. Downstream readers use `read_committed`.
//!
//! Both stop cleanly: no new messages are taken, work in hand finishes (an
//! open transaction is committed or aborted), offsets are committed, and
//! the consumer closes so the group rebalances at once rather than after a
//! session timeout.
//!
//! Why our own and not a crate: rust-rdkafka gives the client; no
//! maintained crate adds per-partition backpressure by pausing, dead
//! letters and the transactional loop on top of it.

pub mod partitioned;
pub mod transactional;

use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::message::OwnedMessage;

use crate::brokers::Brokers;
use crate::dead_letter::{Failure, RetryPolicy};

/// What every consumer needs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Where to consume from.
    pub brokers: Brokers,
    /// The consumer group.
    pub group: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// How a failing message is retried before it becomes a dead letter.
    pub retry: RetryPolicy,
    /// Deadline of each Kafka call (dead-letter sends, commits, transactions).
    pub timeout: Duration,
    /// How long the group waits for a member that stopped answering before
    /// its partitions move to another (a crashed consumer's partitions are
    /// idle this long).
    pub session_timeout: Duration,
}

impl ConsumerSettings {
    /// Settings for `group` reading `topics`, the rest at their defaults.
    pub fn new(brokers: Brokers, group: &str, topics: &[&str]) -> Self {
        Self {
            brokers,
            group: group.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(10),
            session_timeout: Duration::from_secs(10),
        }
    }
}

/// Handles one message of a [`partitioned::PartitionedConsumer`]. Called
/// for one partition's messages in order, one at a time; different
/// partitions run concurrently.
/// A header's value as text.
pub fn header(message: &impl rdkafka::Message, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    })
}

/// One span per consumed message, in the trace its producer sent it in
/// (the `traceparent` header: the relay copies an event's, the sidecar
/// sends its call's with a saga reply).
pub fn consume_span(message: &impl rdkafka::Message, group: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "kafka.consume",
        otel.kind = "consumer",
        messaging.destination.name = message.topic(),
        messaging.kafka.partition = message.partition(),
        messaging.kafka.offset = message.offset(),
        messaging.consumer.group.name = group,
    );
    statefabric_runtime::trace_context::continue_from_values(
        &span,
        header(message, "traceparent").as_deref(),
        header(message, "tracestate").as_deref(),
    );
    span
}

/// What an at-least-once consumer does with each message.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one message: retried while it fails with a retryable
    /// failure, sent to the dead-letter topic when it is rejected or the
    /// retries run out.
    async fn handle(&self, message: &OwnedMessage) -> Result<(), Failure>;
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    group: String,
    outcome: &'static str,
}

/// What a consumer did; exported to Prometheus and read by tests.
#[derive(Debug, Clone, Default)]
pub struct ConsumerMetrics {
    /// Messages taken from Kafka, handled and dead-lettered.
    messages: Family<OutcomeLabel, Counter>,
    paused: Family<GroupLabel, Gauge>,
}

impl ConsumerMetrics {
    /// Registers the consumer's counters and gauges in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "consumer_messages",
            "Messages per consumer group: taken from Kafka, handled, dead-lettered",
            self.messages.clone(),
        );
        registry.register(
            "consumer_paused_partitions",
            "Partitions paused because their in-flight work is at its bound",
            self.paused.clone(),
        );
    }

    fn count(&self, group: &str, outcome: &'static str, n: u64) -> &Self {
        if n > 0 {
            self.messages
                .get_or_create(&OutcomeLabel {
                    group: group.to_owned(),
                    outcome,
                })
                .inc_by(n);
        }
        self
    }

    fn paused_gauge(&self, group: &str) -> Gauge {
        self.paused
            .get_or_create(&GroupLabel {
                group: group.to_owned(),
            })
            .clone()
    }

    /// How many messages of `group` had `outcome` (`taken`, `handled`,
    /// `dead_lettered`).
    pub fn get(&self, group: &str, outcome: &'static str) -> u64 {
        self.messages
            .get_or_create(&OutcomeLabel {
                group: group.to_owned(),
                outcome,
            })
            .get()
    }

    /// Partitions of `group` paused now.
    pub fn paused(&self, group: &str) -> i64 {
        self.paused_gauge(group).get()
    }
}
