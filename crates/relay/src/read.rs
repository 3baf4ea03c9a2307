//! The relay's reading side: outbox rows after the session's cursor, in
//! commit order, encoded into Kafka records — ahead of the producing side,
//! so reading and encoding overlap with the Kafka transaction of the
//! current batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, FixedOffset};
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::Value;
use sqlx::PgPool;
use statefabric_schema::AvroCodec;
use statefabric_schema::codec::WriterSchema;
use statefabric_schema::messages::{EventEnvelope, SagaCommand};
use tokio::sync::mpsc;

use super::{Metrics, RelayError, RelaySettings, SAGA_COMMAND};
use statefabric_kafka::topics::{self, Planned, TopicClass};

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

/// One Kafka record, encoded.
pub(super) struct Record {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: OwnedHeaders,
}

/// A batch ready for its Kafka transaction.
pub(super) struct Prepared {
    pub records: Vec<Record>,
    /// The outbox rows it came from (deleted once it is committed).
    pub ids: Vec<uuid::Uuid>,
    /// The oldest event's creation time (for the processing-lag gauge).
    pub oldest: Option<DateTime<FixedOffset>>,
    /// When its first read was encoded (how long it waited for the
    /// producing side is the `wait` stage).
    pub ready_at: Instant,
}

/// Reads and encodes for one relay session.
pub(super) struct Reader {
    pub pool: PgPool,
    pub codec: Arc<AvroCodec>,
    pub writer: WriterSchema,
    pub command_writer: WriterSchema,
    pub settings: RelaySettings,
    pub metrics: Metrics,
}

impl Reader {
    /// Hands batch after batch to `out` (which holds one while the previous
    /// is produced), until `out` closes; a failure is handed over and ends
    /// the reader. The cursor lives and dies with the reader: a new session
    /// starts again at the front of the outbox.
    pub(super) async fn run(self, out: mpsc::Sender<Result<Prepared, RelayError>>) {
        let mut cursor: Option<(String, i64)> = None;
        let mut known = BTreeSet::new();
        loop {
            match self.next(&mut cursor, &mut known).await {
                Ok(Some(batch)) => {
                    if out.send(Ok(batch)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    if out.is_closed() {
                        return;
                    }
                    tokio::time::sleep(self.settings.idle_poll).await;
                }
                Err(err) => {
                    let _ = out.send(Err(err)).await;
                    return;
                }
            }
        }
    }

    async fn next(
        &self,
        cursor: &mut Option<(String, i64)>,
        known: &mut BTreeSet<String>,
    ) -> Result<Option<Prepared>, RelayError> {
        let mut mark = Instant::now();
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
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        *cursor = Some((last.commit_id.clone(), last.global_position));
        self.metrics.stage("read", &mut mark);
        self.ensure_topics(&rows, known).await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let value = if row.aggregatetype == SAGA_COMMAND {
                self.codec.encode(&self.command_writer, &command(row)?)?
            } else {
                self.codec.encode(&self.writer, &envelope(row)?)?
            };
            records.push(Record {
                topic: topic(row).0,
                key: row.aggregateid.clone(),
                value,
                headers: headers(row),
            });
        }
        self.metrics.stage("encode", &mut mark);
        Ok(Some(Prepared {
            ready_at: mark,
            records,
            ids: rows.iter().map(|r| r.id).collect(),
            oldest: rows
                .iter()
                .filter_map(|r| r.payload.get("created_at").and_then(Value::as_str))
                .filter_map(|t| DateTime::parse_from_rfc3339(t).ok())
                .min(),
        }))
    }

    async fn ensure_topics(
        &self,
        rows: &[Row],
        known: &mut BTreeSet<String>,
    ) -> Result<(), RelayError> {
        let missing: Vec<Planned> = rows
            .iter()
            .map(topic)
            .filter(|(t, _)| !known.contains(t))
            .collect::<BTreeMap<_, _>>()
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
