//! The built-in outbox relay: while this instance leads, committed outbox
//! rows go to `events.<aggregate type>` in commit order, keyed by aggregate
//! id, as Avro [`EventEnvelope`]s (Confluent framing), with the event id,
//! tenant and trace context in headers. Saga tasks written to the outbox by
//! the saga engine (aggregate type [`SAGA_COMMAND`]) go instead to their
//! tenant's command topic for the agent type, as Avro [`SagaCommand`]s keyed
//! by saga id.
//!
//! One batch is one Kafka transaction (idempotent, transactional producer);
//! once committed, the relay moves its cursor past the batch and reads the
//! next (`statefabric_relay_batch_after`, migration 0019), while a deleter
//! removes the sent rows in the background, in a Postgres transaction that
//! first checks the leader epoch. Delivery is at-least-once: a crash
//! between the Kafka commit and the delete sends the batch again, and
//! consumers deduplicate by event id. Order per aggregate holds: rows come
//! in commit order (below the oldest running transaction: the event store's
//! gap-free rule) and one key maps to one partition. The transactional id is the same on every
//! replica, so Kafka fences a former leader's producer as soon as the new
//! leader initializes its own. Repeated Kafka failures open a circuit
//! breaker (`statefabric_circuit_state{dependency="kafka"}`): the relay
//! then waits for a probe instead of piling up timeouts. A transaction left
//! open (shutdown, lost leadership, a failure) is aborted explicitly.

use crate::brokers::Brokers;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::Value;
use sqlx::PgPool;
use statefabric_leader::{Leadership, Role};
use statefabric_resilience::{Breaker, BreakerConfig};
use statefabric_schema::AvroCodec;
use statefabric_schema::codec::WriterSchema;
use statefabric_schema::messages::{
    EventEnvelope, SagaCommand, event_envelope_schema, saga_command_schema,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::topics::{self, Planned, TopicClass, TopicSettings};

/// The outbox aggregate type of saga tasks (written by the saga engine).
pub const SAGA_COMMAND: &str = "saga.command";

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub brokers: Brokers,
    /// Shared by every replica (Kafka fences the older producer).
    pub transactional_id: String,
    /// The leader lease whose epoch guards the deletes.
    pub lease: String,
    pub batch: u32,
    /// Pause when the outbox is empty.
    pub idle_poll: Duration,
    /// Deadline of Kafka transaction steps.
    pub kafka_timeout: Duration,
    pub topics: TopicSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topics: {0}")]
    Topics(#[from] topics::TopicError),
    #[error("schema: {0}")]
    Schema(#[from] statefabric_schema::CodecError),
    #[error("outbox row {id}: {reason}")]
    BadRow { id: String, reason: String },
    #[error("lost leadership (epoch {0} is stale)")]
    Deposed(u64),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    /// read | encode | produce | commit | delete
    stage: &'static str,
}

#[derive(Debug, Clone)]
struct Metrics {
    sent: Counter,
    batches: Counter,
    failures: Counter,
    lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Where a batch's time goes.
    stages: Family<StageLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sent: Counter::default(),
            batches: Counter::default(),
            failures: Counter::default(),
            lag_seconds: Gauge::default(),
            // 100 µs .. ~1.6 s
            stages: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 15))
            }),
        }
    }
}

impl Metrics {
    /// Records the time since `*mark` under `stage` and moves the mark.
    fn stage(&self, stage: &'static str, mark: &mut Instant) {
        let now = Instant::now();
        self.stages
            .get_or_create(&StageLabel { stage })
            .observe((now - *mark).as_secs_f64());
        *mark = now;
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: uuid::Uuid,
    tenant_id: String,
    aggregatetype: String,
    aggregateid: String,
    #[sqlx(rename = "type")]
    event_type: String,
    payload: Value,
    headers: Value,
    global_position: i64,
    /// The writing transaction's id (commit order), as text.
    commit_id: String,
}

/// The relay; run it with [`Relay::run`].
#[derive(Debug)]
pub struct Relay {
    settings: RelaySettings,
    pool: PgPool,
    codec: Arc<AvroCodec>,
    metrics: Metrics,
    /// Opens after repeated Kafka failures: the relay then stops calling
    /// Kafka until a probe is due, instead of piling up timeouts.
    breaker: Breaker,
}

struct Session {
    epoch: u64,
    producer: FutureProducer,
    writer: WriterSchema,
    command_writer: WriterSchema,
    /// A Kafka transaction is open (begun, not yet committed or aborted).
    open: AtomicBool,
    /// The last row sent: (transaction id, position). Reads continue after
    /// it, so sent rows need not be deleted before the next batch.
    cursor: std::sync::Mutex<Option<(String, i64)>>,
    /// Sent rows on their way to the session's deleter.
    sent: mpsc::Sender<Vec<uuid::Uuid>>,
    deleter: JoinHandle<()>,
    /// Set by the deleter when the epoch check refused a delete.
    deposed: Arc<AtomicBool>,
}

impl Session {
    /// Ends the session: aborts a transaction left open and lets the deleter
    /// finish what was sent (for at most `timeout`; rows it did not delete
    /// are sent again by the next session — at least once).
    async fn close(self, timeout: Duration) {
        self.abort_open(timeout);
        drop(self.sent);
        let mut deleter = self.deleter;
        if tokio::time::timeout(timeout, &mut deleter).await.is_err() {
            deleter.abort();
        }
    }

    /// Aborts a transaction left open (its batch was interrupted: shutdown,
    /// lost leadership, a failure), so nothing waits for it to time out.
    fn abort_open(&self, timeout: Duration) {
        if self.open.swap(false, Ordering::SeqCst) {
            match self.producer.abort_transaction(timeout) {
                Ok(()) => tracing::info!("aborted the open relay transaction"),
                Err(err) => tracing::warn!(error = %err, "could not abort the relay transaction"),
            }
        }
    }
}

impl Relay {
    pub fn new(settings: RelaySettings, pool: PgPool, codec: Arc<AvroCodec>) -> Self {
        Self {
            settings,
            pool,
            codec,
            metrics: Metrics::default(),
            breaker: Breaker::new("kafka", BreakerConfig::default()),
        }
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        self.breaker.register_metrics(registry);
        registry.register(
            "relay_events_sent",
            "Outbox events published",
            m.sent.clone(),
        );
        registry.register(
            "relay_batches",
            "Kafka transactions committed",
            m.batches.clone(),
        );
        registry.register(
            "relay_failures",
            "Batches that failed and were retried",
            m.failures.clone(),
        );
        registry.register(
            "relay_stage_seconds",
            "Time per batch in each stage: read the outbox, encode, produce and \
             await acknowledgements, commit the Kafka transaction, delete the rows",
            m.stages.clone(),
        );
        registry
            .sub_registry_with_label(("stage".into(), "relay".into()))
            .register(
                "event_processing_lag_seconds",
                "Age of the oldest event in the last batch when it was handled",
                m.lag_seconds.clone(),
            );
    }

    /// Relays while this instance leads, until `stop`.
    pub async fn run(self, leadership: Leadership, stop: CancellationToken) {
        let timeout = self.settings.kafka_timeout;
        let mut session: Option<Session> = None;
        let mut known_topics = std::collections::BTreeSet::new();
        loop {
            if stop.is_cancelled() {
                break;
            }
            let Role::Leader { epoch } = leadership.role() else {
                if let Some(old) = session.take() {
                    old.close(timeout).await;
                    tracing::info!("relay stopped: not the leader");
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.settings.idle_poll.max(Duration::from_millis(100))) => {}
                }
                continue;
            };
            let Some(permit) = self.breaker.permit() else {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            };
            if session.as_ref().is_some_and(|s| s.epoch != epoch)
                && let Some(old) = session.take()
            {
                old.close(timeout).await;
            }
            let outcome = async {
                if session.is_none() {
                    session = Some(self.open(epoch).await?);
                }
                let s = session.as_ref().ok_or(RelayError::Deposed(epoch))?;
                self.batch(s, &mut known_topics).await
            };
            let result = tokio::select! {
                () = stop.cancelled() => break,
                result = outcome => result,
            };
            match &result {
                Err(RelayError::Kafka(_) | RelayError::Topics(_)) => permit.failure(),
                _ => permit.success(),
            }
            match result {
                Ok(0) => {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(self.settings.idle_poll) => {}
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    self.metrics.failures.inc();
                    tracing::warn!(error = %err, "relay batch failed; retrying");
                    if let Some(old) = session.take() {
                        old.close(timeout).await;
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        if let Some(old) = session.take() {
            old.close(timeout).await;
        }
    }

    async fn open(&self, epoch: u64) -> Result<Session, RelayError> {
        let producer: FutureProducer = self
            .settings
            .brokers
            .client()
            .set("transactional.id", &self.settings.transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "transaction.timeout.ms",
                (self.settings.kafka_timeout * 6).as_millis().to_string(),
            )
            .create()?;
        producer.init_transactions(self.settings.kafka_timeout)?;
        let (subject, schema) = event_envelope_schema();
        let writer = self.codec.writer(subject, schema).await?;
        let (subject, schema) = saga_command_schema();
        let command_writer = self.codec.writer(subject, schema).await?;
        tracing::info!(epoch, "relay producing");
        // Bounded: a deleter that falls behind holds the relay back.
        let (sent, batches) = mpsc::channel(16);
        let deposed = Arc::new(AtomicBool::new(false));
        let deleter = tokio::spawn(delete_sent(
            self.pool.clone(),
            self.settings.lease.clone(),
            epoch,
            batches,
            deposed.clone(),
            self.metrics.clone(),
        ));
        Ok(Session {
            epoch,
            producer,
            writer,
            command_writer,
            open: AtomicBool::new(false),
            cursor: std::sync::Mutex::default(),
            sent,
            deleter,
            deposed,
        })
    }

    async fn ensure_topics(
        &self,
        rows: &[Row],
        known: &mut std::collections::BTreeSet<String>,
    ) -> Result<(), RelayError> {
        let missing: Vec<Planned> = rows
            .iter()
            .map(topic)
            .filter(|(t, _)| !known.contains(t))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .map(|(name, class)| Planned { name, class })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let admin = self.settings.brokers.client().create()?;
        topics::apply(
            &admin,
            &missing,
            &self.settings.topics,
            self.settings.kafka_timeout,
        )
        .await?;
        known.extend(missing.into_iter().map(|p| p.name));
        Ok(())
    }

    /// One transaction's worth; how many events it sent.
    async fn batch(
        &self,
        session: &Session,
        known: &mut std::collections::BTreeSet<String>,
    ) -> Result<usize, RelayError> {
        if session.deposed.load(Ordering::SeqCst) {
            return Err(RelayError::Deposed(session.epoch));
        }
        let mut mark = Instant::now();
        let cursor = session
            .cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, tenant_id, aggregatetype, aggregateid, type, payload, headers, \
                    global_position, commit_id \
             FROM statefabric_relay_batch_after($1, $2, $3)",
        )
        .bind(i32::try_from(self.settings.batch).unwrap_or(i32::MAX))
        .bind(cursor.as_ref().map(|(tx, _)| tx.clone()))
        .bind(cursor.as_ref().map(|(_, pos)| *pos))
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        self.metrics.stage("read", &mut mark);
        self.ensure_topics(&rows, known).await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let value = if row.aggregatetype == SAGA_COMMAND {
                self.codec.encode(&session.command_writer, &command(row)?)?
            } else {
                self.codec.encode(&session.writer, &envelope(row)?)?
            };
            records.push((topic(row).0, value, headers(row)));
        }
        self.metrics.stage("encode", &mut mark);
        let producer = &session.producer;
        producer.begin_transaction()?;
        session.open.store(true, Ordering::SeqCst);
        let sent = async {
            let mut deliveries = Vec::with_capacity(records.len());
            for ((topic, value, headers), row) in records.iter().zip(&rows) {
                let record = FutureRecord::to(topic)
                    .key(&row.aggregateid)
                    .payload(value)
                    .headers(headers.clone());
                match producer.send_result(record) {
                    Ok(delivery) => deliveries.push(delivery),
                    Err((err, _)) => return Err(RelayError::Kafka(err)),
                }
            }
            for delivery in deliveries {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((err, _))) => return Err(RelayError::Kafka(err)),
                    Err(_) => {
                        return Err(RelayError::Kafka(rdkafka::error::KafkaError::Canceled));
                    }
                }
            }
            self.metrics.stage("produce", &mut mark);
            producer.commit_transaction(self.settings.kafka_timeout)?;
            session.open.store(false, Ordering::SeqCst);
            self.metrics.stage("commit", &mut mark);
            Ok(())
        }
        .await;
        if let Err(err) = sent {
            session.abort_open(self.settings.kafka_timeout);
            return Err(err);
        }
        let oldest = rows
            .iter()
            .filter_map(|r| r.payload.get("created_at").and_then(Value::as_str))
            .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .min();
        if let Some(last) = rows.last() {
            *session
                .cursor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((last.commit_id.clone(), last.global_position));
        }
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
        if session.sent.send(ids).await.is_err() {
            return Err(RelayError::Deposed(session.epoch));
        }
        self.metrics.sent.inc_by(rows.len() as u64);
        self.metrics.batches.inc();
        if let Some(oldest) = oldest {
            let lag = (chrono::Utc::now() - oldest.with_timezone(&chrono::Utc))
                .num_milliseconds()
                .max(0);
            self.metrics.lag_seconds.set(lag as f64 / 1000.0);
        }
        Ok(rows.len())
    }
}

/// Deletes sent rows after their Kafka commit, off the relay's path:
/// whatever has queued up goes in one call, which checks the leader epoch
/// first. A refused epoch marks the session deposed; other failures are
/// retried (the rows stay until deleted, and a later session would send
/// them again).
async fn delete_sent(
    pool: PgPool,
    lease: String,
    epoch: u64,
    mut batches: mpsc::Receiver<Vec<uuid::Uuid>>,
    deposed: Arc<AtomicBool>,
    metrics: Metrics,
) {
    while let Some(mut ids) = batches.recv().await {
        while let Ok(more) = batches.try_recv() {
            ids.extend(more);
        }
        loop {
            let mut mark = Instant::now();
            let deleted =
                sqlx::query_scalar::<_, i64>("SELECT statefabric_relay_delete($1, $2, $3)")
                    .bind(&ids)
                    .bind(&lease)
                    .bind(i64::try_from(epoch).unwrap_or(i64::MAX))
                    .fetch_one(&pool)
                    .await;
            match deleted {
                Ok(_) => {
                    metrics.stage("delete", &mut mark);
                    break;
                }
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("SF001") => {
                    deposed.store(true, Ordering::SeqCst);
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "deleting sent outbox rows failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// Where a row goes, and the class of that topic.
fn topic(row: &Row) -> (String, TopicClass) {
    if row.aggregatetype == SAGA_COMMAND {
        let agent = row
            .payload
            .get("agent_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        (
            topics::tenant_commands_topic(agent, &row.tenant_id),
            TopicClass::Commands,
        )
    } else {
        (topics::events_topic(&row.aggregatetype), TopicClass::Events)
    }
}

/// The saga engine's outbox payload (migration 0018) as the Avro record.
fn command(row: &Row) -> Result<SagaCommand, RelayError> {
    let p = &row.payload;
    let bad = |field: &str| RelayError::BadRow {
        id: row.id.to_string(),
        reason: format!("saga command without {field}"),
    };
    let text = |field: &str| {
        p.get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| bad(field))
    };
    let number = |field: &str| {
        p.get(field)
            .and_then(Value::as_i64)
            .ok_or_else(|| bad(field))
    };
    Ok(SagaCommand {
        idempotency_key: text("task_key")?,
        tenant_id: row.tenant_id.clone(),
        saga_id: row.aggregateid.clone(),
        step: text("step")?,
        visit: i32::try_from(number("visit")?).map_err(|_| bad("visit"))?,
        attempt: i32::try_from(number("attempt")?).map_err(|_| bad("attempt"))?,
        compensation: p
            .get("compensation")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("compensation"))?,
        agent_type: text("agent_type")?,
        action: text("action")?,
        input: p
            .get("input")
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_default(),
        timeout_ms: number("timeout_ms")?,
        issued_at: p
            .get("issued_at")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or(0, |t| t.timestamp_millis()),
    })
}

fn headers(row: &Row) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: "event_id",
            value: Some(&row.id.to_string()),
        })
        .insert(Header {
            key: "event_type",
            value: Some(&row.event_type),
        });
    if let Some(map) = row.headers.as_object() {
        for (key, value) in map {
            if let Some(text) = value.as_str() {
                headers = headers.insert(Header {
                    key,
                    value: Some(text),
                });
            } else {
                headers = headers.insert(Header {
                    key,
                    value: Some(&value.to_string()),
                });
            }
        }
    }
    headers
}

fn envelope(row: &Row) -> Result<EventEnvelope, RelayError> {
    let bad = |reason: &str| RelayError::BadRow {
        id: row.id.to_string(),
        reason: reason.to_owned(),
    };
    let p = &row.payload;
    let metadata: BTreeMap<String, String> = p
        .get("metadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let vector_clock: BTreeMap<String, i64> = p
        .pointer("/metadata/vector_clock")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_i64().map(|n| (k.clone(), n)))
                .collect()
        })
        .unwrap_or_default();
    let recorded_at = p
        .get("created_at")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis())
        .ok_or_else(|| bad("created_at missing or not a timestamp"))?;
    Ok(EventEnvelope {
        event_id: row.id.to_string(),
        tenant_id: row.tenant_id.clone(),
        stream_id: row.aggregateid.clone(),
        stream_type: row.aggregatetype.clone(),
        version: p
            .get("stream_version")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad("stream_version missing"))?,
        commit_position: row.global_position,
        event_type: row.event_type.clone(),
        content_type: "application/json".to_owned(),
        payload: serde_json::to_vec(p.get("data").unwrap_or(&Value::Null))
            .map_err(|e| bad(&e.to_string()))?,
        metadata,
        vector_clock,
        recorded_at,
    })
}
