//! Saga tasks and replies over Kafka (the production transport).
//!
//! The way out is the outbox: the saga engine writes each task it
//! dispatches to `event_outbox` in the transition's own transaction
//! (migration 0018), and the relay publishes it to the tenant's command
//! topic for the agent type (`tenants.<tenant>.sagas.commands.<agent>`, Avro
//! `SagaCommand`, keyed by saga id). The way back is `sagas.replies` (Avro
//! `SagaReply`, keyed by saga id), which the leader's [`ReplyConsumer`] turns
//! into inbox rows — the same checks as the tables transport, so a
//! duplicate or late reply has no effect. It runs on the consumer framework
//! ([`statefabric_kafka::consumer`]): a reply that does not decode or names an invalid
//! saga goes to `dlq.sagas.replies` at once, one that keeps failing (the
//! database is down) after retries with backoff.
//!
//! [`KafkaTaskQueue`] is a sidecar's side: one consumer per agent type it
//! is asked for (group `statefabric-agents.<tenant>.<agent>`), feeding a
//! bounded buffer; when the buffer is full the consumer pauses its
//! partitions instead of buffering more, and resumes at half. A task is
//! handed to one worker; the offset is stored once the task is buffered, so
//! a sidecar that dies with tasks in its buffer loses them to their
//! deadlines, after which the engine retries them (the lease is the
//! recovery, as for a worker that dies). Heartbeats and start requests go to
//! the saga tables directly (`heartbeat` pushes a deadline, which only the
//! database can do atomically with the engine's timer check).
//!
//! Its own crate beside the saga store whose ports it implements; Kafka
//! clients, topics and the consumer framework come from `statefabric-kafka`.
#![warn(missing_docs)]

use statefabric_kafka::brokers::Brokers;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use statefabric_domain::{SagaId, TenantId};
use statefabric_leader::{Leadership, Role};
use statefabric_saga_store::{
    Claim, InboxMessage, Replied, Reply, Result, SagaStore, StartRequest, StartRequested,
    StoreError, TaskQueue, TaskRow, TaskStatus,
};
use statefabric_schema::AvroCodec;
use statefabric_schema::codec::WriterSchema;
use statefabric_schema::messages::{Outcome, SagaCommand, SagaReply, saga_reply_schema};
use tokio::sync::{Notify, OnceCell, watch};
use tokio_util::sync::CancellationToken;

use statefabric_kafka::consumer::partitioned::PartitionedConsumer;
use statefabric_kafka::consumer::{ConsumerMetrics, ConsumerSettings, Handler};
use statefabric_kafka::dead_letter::{Failure, RetryPolicy};
use statefabric_kafka::topics::{self, Planned, TopicClass, TopicSettings};

/// A failure that is only logged (and the loop restarted).
type Logged = std::result::Result<(), String>;

/// The engine's consumer group on the reply topic.
pub const ENGINE_GROUP: &str = "statefabric-saga-engine";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("Kafka: {e}"))
}

/// One agent type's tasks, consumed and waiting for a worker.
#[derive(Debug)]
struct Feed {
    queue: Mutex<VecDeque<TaskRow>>,
    signal: watch::Sender<u64>,
    /// Wakes a paused consumer when workers take tasks.
    space: Notify,
}

/// A sidecar's task queue over Kafka: tasks from the command topics,
/// replies to `sagas.replies`, heartbeats and start requests through the
/// saga tables.
#[derive(Clone)]
pub struct KafkaTaskQueue {
    /// Heartbeats and start requests (the saga tables).
    tables: Arc<dyn TaskQueue>,
    brokers: Brokers,
    codec: Arc<AvroCodec>,
    producer: FutureProducer,
    reply_writer: Arc<OnceCell<WriterSchema>>,
    feeds: Arc<Mutex<HashMap<String, Arc<Feed>>>>,
    /// Tasks buffered per agent type before its consumer pauses.
    buffer: usize,
    timeout: Duration,
    stop: CancellationToken,
}

impl std::fmt::Debug for KafkaTaskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTaskQueue")
            .field("bootstrap", &self.brokers.bootstrap)
            .field("buffer", &self.buffer)
            .finish_non_exhaustive()
    }
}

impl KafkaTaskQueue {
    /// The queue on `brokers`, buffering up to `buffer` tasks per agent
    /// type, each Kafka call within `timeout`, until `stop`.
    pub fn new(
        tables: Arc<dyn TaskQueue>,
        brokers: &Brokers,
        codec: Arc<AvroCodec>,
        buffer: usize,
        timeout: Duration,
        stop: CancellationToken,
    ) -> Result<Self> {
        let producer: FutureProducer = brokers
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()
            .map_err(unavailable)?;
        Ok(Self {
            tables,
            brokers: brokers.clone(),
            codec,
            producer,
            reply_writer: Arc::default(),
            feeds: Arc::default(),
            buffer: buffer.max(1),
            timeout,
            stop,
        })
    }

    fn feed(&self, tenant: &str, agent: &str) -> Result<Arc<Feed>> {
        let key = format!("{tenant}/{agent}");
        let mut feeds = self
            .feeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(feed) = feeds.get(&key) {
            return Ok(feed.clone());
        }
        let topic = topics::tenant_commands_topic(agent, tenant);
        let consumer: StreamConsumer = self
            .brokers
            .client()
            .set("group.id", topics::agent_group(tenant, agent))
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // The relay creates command topics on first use: notice soon.
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create()
            .map_err(unavailable)?;
        consumer.subscribe(&[&topic]).map_err(unavailable)?;
        let feed = Arc::new(Feed {
            queue: Mutex::default(),
            signal: watch::channel(0).0,
            space: Notify::new(),
        });
        feeds.insert(key, feed.clone());
        tokio::spawn(consume(
            consumer,
            feed.clone(),
            self.codec.clone(),
            self.buffer,
            tenant.to_owned(),
            self.stop.clone(),
        ));
        tracing::info!(%topic, "taking saga tasks from Kafka");
        Ok(feed)
    }

    async fn reply_writer(&self) -> Result<&WriterSchema> {
        self.reply_writer
            .get_or_try_init(|| async {
                let (subject, schema) = saga_reply_schema();
                self.codec
                    .writer(subject, schema)
                    .await
                    .map_err(unavailable)
            })
            .await
    }
}

/// The command as a task; an id that does not parse is the message's fault.
fn task_row(command: SagaCommand) -> Result<TaskRow, String> {
    let input = serde_json::from_slice(&command.input).unwrap_or(Value::Null);
    Ok(TaskRow {
        key: command.idempotency_key,
        saga_id: SagaId::new(command.saga_id).map_err(|e| e.to_string())?,
        tenant: TenantId::new(command.tenant_id).map_err(|e| e.to_string())?,
        step: command.step,
        visit: u32::try_from(command.visit).unwrap_or_default(),
        attempt: u32::try_from(command.attempt).unwrap_or_default(),
        compensation: command.compensation,
        agent: command.agent_type,
        action: command.action,
        input,
        timeout_ms: command.timeout_ms,
        status: TaskStatus::Dispatched,
        claimed_by: None,
        dispatched_at: DateTime::from_timestamp_millis(command.issued_at).unwrap_or_default(),
        finished_at: None,
        output: None,
        error: None,
        // From the message's headers (the relay copies the outbox row's).
        traceparent: None,
    })
}

/// Moves commands into the feed, pausing the partitions while it is full.
async fn consume(
    consumer: StreamConsumer,
    feed: Arc<Feed>,
    codec: Arc<AvroCodec>,
    limit: usize,
    tenant: String,
    stop: CancellationToken,
) {
    let mut paused = false;
    loop {
        let queued = feed
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        if let Ok(assignment) = consumer.assignment() {
            if !paused && queued >= limit {
                paused = consumer.pause(&assignment).is_ok();
            } else if paused && queued <= limit / 2 {
                paused = consumer.resume(&assignment).is_err();
            }
        }
        let message = tokio::select! {
            () = stop.cancelled() => break,
            () = feed.space.notified(), if paused => continue,
            received = tokio::time::timeout(Duration::from_millis(500), consumer.recv()) => received,
        };
        let message = match message {
            Err(_) => continue,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "saga command consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Ok(Ok(message)) => message,
        };
        let decoded = match message.payload() {
            Some(bytes) => codec
                .decode::<SagaCommand>(bytes, None)
                .await
                .map_err(|e| e.to_string()),
            None => Err("empty message".to_owned()),
        };
        match decoded {
            Ok(command) if command.tenant_id == tenant => match task_row(command) {
                Ok(mut task) => {
                    task.traceparent = statefabric_kafka::consumer::header(&message, "traceparent");
                    feed.queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push_back(task);
                    feed.signal.send_modify(|n| *n += 1);
                }
                // The engine retries the attempt after its deadline.
                Err(err) => tracing::warn!(error = %err, "skipping a saga command with a bad id"),
            },
            Ok(command) => tracing::warn!(
                saga = %command.saga_id,
                "skipping another tenant's saga command"
            ),
            // The engine retries the attempt after its deadline.
            Err(err) => tracing::warn!(error = %err, "skipping an undecodable saga command"),
        }
        if let Err(err) = consumer.store_offset_from_message(&message) {
            tracing::warn!(error = %err, "cannot store the command offset");
        }
    }
    // Leave the group at once, so another sidecar takes the partitions.
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    consumer.unsubscribe();
}

#[async_trait]
impl TaskQueue for KafkaTaskQueue {
    async fn claim(&self, tenant: &TenantId, claim: Claim<'_>) -> Result<Vec<TaskRow>> {
        let tenant = tenant.as_str();
        let Claim { agent, worker, max } = claim;
        let feed = self.feed(tenant, agent)?;
        let mut queue = feed
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = queue.len().min(max as usize);
        let tasks: Vec<TaskRow> = queue
            .drain(..n)
            .map(|mut t| {
                t.claimed_by = Some(worker.to_owned());
                t
            })
            .collect();
        drop(queue);
        if !tasks.is_empty() {
            feed.space.notify_one();
        }
        Ok(tasks)
    }

    async fn heartbeat(&self, tenant: &TenantId, key: &str) -> Result<Option<DateTime<Utc>>> {
        self.tables.heartbeat(tenant, key).await
    }

    async fn reply(&self, tenant: &TenantId, reply: Reply<'_>) -> Result<Replied> {
        let tenant = tenant.as_str();
        let Reply {
            sender,
            saga_id,
            message,
        } = reply;
        let (key, outcome, output, error) = match message {
            InboxMessage::Completed { key, output } => (
                key,
                Outcome::Completed,
                Some(output.to_string().into_bytes()),
                None,
            ),
            InboxMessage::Failed { key, error } => (key, Outcome::Failed, None, Some(error)),
            InboxMessage::Start { .. } => {
                return Err(StoreError::Invalid("a reply names its task".into()));
            }
        };
        let reply = SagaReply {
            idempotency_key: key,
            tenant_id: tenant.to_owned(),
            saga_id: saga_id.to_string(),
            outcome,
            output,
            error,
            agent: sender.to_owned(),
            answered_at: Utc::now().timestamp_millis(),
        };
        let writer = self.reply_writer().await?;
        let value = self
            .codec
            .encode(writer, &reply)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        // The reply goes on in the trace of the call that made it (the
        // task's, as the SDKs send it), for the engine's consumer to join.
        let mut headers = rdkafka::message::OwnedHeaders::new();
        if let Some(traceparent) =
            statefabric_runtime::trace_context::traceparent_of(&tracing::Span::current())
        {
            headers = headers.insert(rdkafka::message::Header {
                key: "traceparent",
                value: Some(traceparent.as_bytes()),
            });
        }
        let record = FutureRecord::to(topics::REPLIES_TOPIC)
            .key(saga_id.as_str())
            .payload(&value)
            .headers(headers);
        self.producer
            .send(record, self.timeout)
            .await
            .map_err(|(e, _)| unavailable(e))?;
        // Whether the attempt is still current is the engine's to decide.
        Ok(Replied::Accepted)
    }

    async fn request_start(
        &self,
        tenant: &TenantId,
        sender: &str,
        start: StartRequest,
    ) -> Result<StartRequested> {
        self.tables.request_start(tenant, sender, start).await
    }

    /// Kafka deliveries cannot be handed back: unanswered tasks wait out
    /// their deadlines and are retried.
    async fn release(&self, _tenant: &TenantId, _keys: Option<&[String]>) -> Result<u64> {
        Ok(0)
    }

    fn tasks_signal(&self, tenant: &TenantId, agent: &str) -> watch::Receiver<u64> {
        let tenant = tenant.as_str();
        match self.feed(tenant, agent) {
            Ok(feed) => feed.signal.subscribe(),
            Err(err) => {
                tracing::warn!(error = %err, "cannot consume saga commands");
                watch::channel(0).1
            }
        }
    }
}

/// The leader's side of the way back: replies from Kafka into the inbox.
#[derive(Debug)]
pub struct ReplyConsumer {
    /// Where `sagas.replies` is.
    pub brokers: Brokers,
    /// Decodes the Avro replies.
    pub codec: Arc<AvroCodec>,
    /// Where the replies become inbox rows.
    pub store: Arc<dyn SagaStore>,
    /// How the reply and dead-letter topics are made.
    pub topics: TopicSettings,
    /// Deadline of each Kafka call.
    pub timeout: Duration,
    /// The reply consumer's counts (register them once).
    pub metrics: ConsumerMetrics,
}

impl ReplyConsumer {
    /// Consumes while this instance leads, until `stop`.
    pub async fn run(self, leadership: Leadership, stop: CancellationToken) {
        while !stop.is_cancelled() {
            if let Role::Follower = leadership.role() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
            if let Err(err) = self.lead(&leadership, &stop).await {
                tracing::warn!(error = %err, "saga reply consumer failed; restarting");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// Runs the reply consumer (on the consumer framework) until this
    /// instance stops leading or `stop`.
    async fn lead(&self, leadership: &Leadership, stop: &CancellationToken) -> Logged {
        let admin = self.brokers.client().create().map_err(|e| e.to_string())?;
        topics::apply(
            &admin,
            &[Planned {
                name: topics::REPLIES_TOPIC.to_owned(),
                class: TopicClass::Replies,
            }],
            &self.topics,
            self.timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut settings =
            ConsumerSettings::new(self.brokers.clone(), ENGINE_GROUP, &[topics::REPLIES_TOPIC]);
        // A database outage is waited out for a while before a reply goes to
        // `dlq.sagas.replies` (from where an operator replays it).
        settings.retry = RetryPolicy {
            max_attempts: 8,
            ..RetryPolicy::default()
        };
        settings.timeout = self.timeout;
        let consumer = PartitionedConsumer::new(
            settings,
            REPLIES_IN_FLIGHT,
            Replies {
                codec: self.codec.clone(),
                store: self.store.clone(),
            },
        )
        .with_metrics(self.metrics.clone());
        let leading = stop.child_token();
        let mut running = tokio::spawn(consumer.run(leading.clone()));
        tracing::info!("taking saga replies from Kafka");
        let ended = loop {
            tokio::select! {
                () = stop.cancelled() => break None,
                ended = &mut running => break Some(ended),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if !matches!(leadership.role(), Role::Leader { .. }) {
                        break None;
                    }
                }
            }
        };
        leading.cancel();
        let ended = match ended {
            Some(ended) => ended,
            None => running.await,
        };
        match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// Replies taken at once per partition of `sagas.replies`.
const REPLIES_IN_FLIGHT: usize = 64;

/// Turns one reply into an inbox row.
struct Replies {
    codec: Arc<AvroCodec>,
    store: Arc<dyn SagaStore>,
}

#[async_trait]
impl Handler for Replies {
    async fn handle(&self, message: &OwnedMessage) -> std::result::Result<(), Failure> {
        let bytes = message
            .payload()
            .ok_or_else(|| Failure::Undecodable("an empty saga reply".into()))?;
        let reply = self
            .codec
            .decode::<SagaReply>(bytes, None)
            .await
            .map_err(|e| Failure::Undecodable(e.to_string()))?;
        let message = match reply.outcome {
            Outcome::Completed => InboxMessage::Completed {
                key: reply.idempotency_key,
                output: reply
                    .output
                    .as_deref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null),
            },
            Outcome::Failed => InboxMessage::Failed {
                key: reply.idempotency_key,
                error: reply.error.unwrap_or_else(|| "failed".into()),
            },
        };
        // A tenant id that does not parse is the message's fault: a dead letter.
        let tenant = TenantId::new(reply.tenant_id)
            .map_err(|e| Failure::Rejected(format!("saga reply: {e}")))?;
        let saga_id = SagaId::new(reply.saga_id)
            .map_err(|e| Failure::Rejected(format!("saga reply: {e}")))?;
        let answer = Reply {
            sender: &reply.agent,
            saga_id: &saga_id,
            message,
        };
        match self.store.accept_reply(&tenant, answer).await {
            Ok(_) => Ok(()),
            Err(StoreError::Invalid(m)) => Err(Failure::Rejected(m)),
            Err(err) => Err(Failure::Failed(err.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(tenant: &str, saga: &str) -> SagaCommand {
        SagaCommand {
            idempotency_key: format!("{saga}/PLAN/1/2"),
            tenant_id: tenant.into(),
            saga_id: saga.into(),
            step: "PLAN".into(),
            visit: 1,
            attempt: 2,
            compensation: false,
            agent_type: "planner".into(),
            action: "plan".into(),
            input: br#"{"task":"t"}"#.to_vec(),
            timeout_ms: 30_000,
            issued_at: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_command_becomes_a_dispatched_task() {
        let task = task_row(command("acme", "s-1")).expect("valid ids");
        assert_eq!(
            (task.saga_id.as_str(), task.tenant.as_str(), task.attempt),
            ("s-1", "acme", 2)
        );
        assert_eq!(task.status, TaskStatus::Dispatched);
        assert_eq!(task.input, serde_json::json!({"task": "t"}));
    }

    /// Ids that do not parse are the message's fault: the command is
    /// skipped with the reason (the engine retries after the deadline).
    #[test]
    fn a_command_with_a_bad_id_is_refused_with_the_reason() {
        let err = task_row(command("acme", "a/b")).expect_err("slash in the saga id");
        assert!(err.contains("saga id"), "{err}");
        let err = task_row(command("Acme", "s-1")).expect_err("uppercase tenant");
        assert!(err.contains("tenant id"), "{err}");
    }
}
