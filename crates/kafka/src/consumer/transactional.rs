//! Kafka to Kafka exactly once (see the module above): consume a batch,
//! turn each message into output records (or a dead letter), and produce
//! them together with the batch's input offsets in one Kafka transaction.
//!
//! The batch is the bound on in-flight work: the consumer is not polled
//! while a batch is processed, and librdkafka's prefetch is capped by
//! `queued.max.messages.kbytes`. On any failure the transaction is aborted
//! and the consumer and producer are made anew, so the batch is read again
//! from the committed offsets; a producer that was fenced by a newer
//! instance with the same transactional id gives up the same way.

use std::collections::BTreeMap;
use std::time::Duration;
use tracing::Instrument;

use async_trait::async_trait;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{ConsumerMetrics, ConsumerSettings};
use crate::dead_letter::{self, Failure};
use crate::topics::dead_letter_topic;

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The topic.
    pub topic: String,
    /// The key (partitioning).
    pub key: Option<Vec<u8>>,
    /// The value.
    pub payload: Vec<u8>,
}

/// What a batch was, for [`Transform::before_commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Input messages in the transaction.
    pub inputs: usize,
    /// Output records produced in it (dead letters included).
    pub outputs: usize,
}

/// Turns one input message into its outputs.
#[async_trait]
pub trait Transform: Send + Sync + 'static {
    /// The records `message` becomes; a rejected or (after its retries)
    /// failing one becomes a dead letter instead, in the same transaction.
    async fn transform(&self, message: &OwnedMessage) -> Result<Vec<Output>, Failure>;

    /// Runs when a batch's outputs and offsets are in its transaction, just
    /// before the commit. An error aborts the transaction and the batch is
    /// consumed again (a leader checks its fencing epoch here, say).
    async fn before_commit(&self, _batch: &Batch) -> Result<(), String> {
        Ok(())
    }
}

/// A record on its way: an output or a dead letter.
struct Pending {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
}

impl Pending {
    fn record(&self) -> FutureRecord<'_, Vec<u8>, Vec<u8>> {
        let mut record = FutureRecord::to(&self.topic);
        if let Some(key) = &self.key {
            record = record.key(key);
        }
        if let Some(payload) = &self.payload {
            record = record.payload(payload);
        }
        if let Some(headers) = &self.headers {
            record = record.headers(headers.clone());
        }
        record
    }
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("before commit: {0}")]
    Vetoed(String),
    #[error("no consumer group metadata yet")]
    NoGroup,
}

/// A Kafka-to-Kafka consumer that produces its outputs and commits its
/// input offsets in one Kafka transaction per batch.
pub struct TransactionalConsumer<T> {
    settings: ConsumerSettings,
    transactional_id: String,
    batch: usize,
    transform: T,
    metrics: ConsumerMetrics,
}

impl<T> std::fmt::Debug for TransactionalConsumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalConsumer")
            .field("group", &self.settings.group)
            .field("transactional_id", &self.transactional_id)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl<T: Transform> TransactionalConsumer<T> {
    /// `transactional_id` is shared by the instances that take over from
    /// one another (Kafka fences the older); `batch` (at least 1) bounds the
    /// messages per transaction.
    pub fn new(
        settings: ConsumerSettings,
        transactional_id: &str,
        batch: usize,
        transform: T,
    ) -> Self {
        Self {
            settings,
            transactional_id: transactional_id.to_owned(),
            batch: batch.max(1),
            transform,
            metrics: ConsumerMetrics::default(),
        }
    }

    /// Its metrics, to register before it runs.
    pub fn metrics(&self) -> ConsumerMetrics {
        self.metrics.clone()
    }

    /// Consumes until `stop`; a batch in hand at stop is committed (or
    /// aborted if it fails), then the consumer leaves the group.
    pub async fn run(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            match self.session(&stop).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(group = %self.settings.group, error = %err, "transactional consumer restarts");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// One consumer and producer, batch after batch, until stop or error.
    async fn session(&self, stop: &CancellationToken) -> Result<(), BatchError> {
        let s = &self.settings;
        let consumer: StreamConsumer = s
            .brokers
            .client()
            .set("group.id", &s.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "session.timeout.ms",
                s.session_timeout.as_millis().to_string(),
            )
            .set("isolation.level", "read_committed")
            .set("queued.max.messages.kbytes", "4096")
            .create()?;
        let topics: Vec<&str> = s.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let producer: FutureProducer = s
            .brokers
            .client()
            .set("transactional.id", &self.transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()?;
        producer.init_transactions(s.timeout)?;
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                first = consumer.recv() => first?.detach(),
            };
            let mut batch = vec![first];
            while batch.len() < self.batch {
                match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                    Ok(message) => batch.push(message?.detach()),
                    Err(_) => break,
                }
            }
            self.metrics.count(&s.group, "taken", batch.len() as u64);
            producer.begin_transaction()?;
            if let Err(err) = self.fill(&consumer, &producer, &batch).await {
                if let Err(abort) = producer.abort_transaction(s.timeout) {
                    tracing::warn!(error = %abort, "abort failed");
                }
                return Err(err);
            }
        }
    }

    /// Produces the batch's outputs and offsets and commits them.
    async fn fill(
        &self,
        consumer: &StreamConsumer,
        producer: &FutureProducer,
        batch: &[OwnedMessage],
    ) -> Result<(), BatchError> {
        let s = &self.settings;
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut records: Vec<Pending> = Vec::new();
        let mut dead_lettered = 0;
        for message in batch {
            match dead_letter::attempt(message, &s.retry, |_| self.transform.transform(message))
                .instrument(super::consume_span(message, &s.group))
                .await
            {
                Ok((outputs, _)) => records.extend(outputs.into_iter().map(|o| Pending {
                    topic: o.topic,
                    key: o.key,
                    payload: Some(o.payload),
                    headers: None,
                })),
                Err((error, attempts)) => {
                    dead_lettered += 1;
                    records.push(Pending {
                        topic: dead_letter_topic(message.topic()),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().map(<[u8]>::to_vec),
                        headers: Some(dead_letter::letter_headers(
                            message, &error, attempts, &s.group,
                        )),
                    });
                }
            }
            next.insert(
                (message.topic().to_owned(), message.partition()),
                message.offset() + 1,
            );
        }
        // Queue them all, then wait for every acknowledgement.
        let mut deliveries = Vec::with_capacity(records.len());
        for pending in &records {
            let mut record = pending.record();
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => break deliveries.push(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((err, _)) => return Err(err.into()),
                }
            }
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => return Err(err.into()),
                Err(_) => return Err(KafkaError::Canceled.into()),
            }
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in &next {
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        let group = consumer.group_metadata().ok_or(BatchError::NoGroup)?;
        producer.send_offsets_to_transaction(&offsets, &group, s.timeout)?;
        self.transform
            .before_commit(&Batch {
                inputs: batch.len(),
                outputs: records.len(),
            })
            .await
            .map_err(BatchError::Vetoed)?;
        crate::txn::commit(producer, s.timeout)?;
        self.metrics
            .count(&s.group, "handled", (batch.len() - dead_lettered) as u64)
            .count(&s.group, "dead_lettered", dead_lettered as u64);
        Ok(())
    }
}
