//! The agents' writes to the inbox, many calls in one statement (through
//! [`super::coalesce::Coalescer`]): answers to tasks and start requests.
//! Each call gets the outcome it would have had alone, duplicates within
//! a batch included (the first is accepted, the rest are repeats).

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::PgPool;

use super::map_err;
use statefabric_saga::SagaId;

use crate::{InboxMessage, Replied, Result, StartRequested, StoreError, TaskStatus, not_queued};

/// An answer to a task, as queued.
#[derive(Debug)]
pub(super) struct Reply {
    pub saga_id: String,
    pub sender: String,
    pub key: String,
    pub message: InboxMessage,
}

impl Reply {
    /// `message` from `sender`; it must name its task.
    pub(super) fn new(saga_id: &SagaId, sender: &str, message: InboxMessage) -> Result<Self> {
        let Some(key) = message.task_key().map(str::to_owned) else {
            return Err(StoreError::Invalid("a reply names its task".into()));
        };
        Ok(Self {
            saga_id: saga_id.to_string(),
            sender: sender.to_owned(),
            key,
            message,
        })
    }
}

/// A start request, as queued.
#[derive(Debug)]
pub(super) struct Start {
    pub sender: String,
    pub request: crate::StartRequest,
}

fn body(message: &InboxMessage) -> Result<Value> {
    serde_json::to_value(message).map_err(|e| StoreError::Backend(e.to_string()))
}

/// Answers into the inbox, each if its attempt is still out.
pub(super) async fn replies(
    pool: PgPool,
    tenant: String,
    batch: Vec<Reply>,
) -> Result<Vec<Replied>> {
    let mut columns: [Vec<String>; 4] = Default::default();
    let mut bodies = Vec::with_capacity(batch.len());
    for reply in &batch {
        columns[0].push(reply.saga_id.clone());
        columns[1].push(reply.message.kind().to_owned());
        columns[2].push(reply.key.clone());
        columns[3].push(reply.sender.clone());
        bodies.push(body(&reply.message)?);
    }
    let [sagas, kinds, keys, senders] = columns;
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO saga_inbox (tenant_id, saga_id, kind, task_key, body, sender)
         SELECT $1, t.saga_id, r.kind, r.task_key, r.body, r.sender
           FROM unnest($2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[])
                WITH ORDINALITY AS r(saga_id, kind, task_key, body, sender, i)
           JOIN saga_tasks t
             ON t.task_key = r.task_key AND t.saga_id = r.saga_id AND t.status = 'dispatched'
          ORDER BY r.i
         ON CONFLICT (task_key) WHERE task_key IS NOT NULL DO NOTHING
         RETURNING task_key",
    )
    .bind(&tenant)
    .bind(&sagas)
    .bind(&kinds)
    .bind(&keys)
    .bind(&bodies)
    .bind(&senders)
    .fetch_all(&pool)
    .await
    .map_err(map_err)?;
    let mut inserted: HashSet<String> = inserted.into_iter().collect();
    let statuses: HashMap<(String, String), String> = if inserted.len() < batch.len() {
        sqlx::query_as("SELECT task_key, saga_id, status FROM saga_tasks WHERE task_key = ANY ($1)")
            .bind(&keys)
            .fetch_all(&pool)
            .await
            .map_err(map_err)?
            .into_iter()
            .map(|(key, saga, status): (String, String, String)| ((key, saga), status))
            .collect()
    } else {
        HashMap::new()
    };
    Ok(batch
        .iter()
        .map(|reply| {
            if inserted.remove(&reply.key) {
                return Replied::Accepted;
            }
            let status = statuses
                .get(&(reply.key.clone(), reply.saga_id.clone()))
                .map(|s| TaskStatus::parse(s));
            not_queued(reply.message.kind(), status)
        })
        .collect())
}

/// Start requests into the inbox, each unless its saga exists or is asked
/// for already.
pub(super) async fn starts(
    pool: PgPool,
    tenant: String,
    batch: Vec<Start>,
) -> Result<Vec<StartRequested>> {
    let names: Vec<String> = batch
        .iter()
        .map(|s| s.request.definition.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let known: HashSet<String> =
        sqlx::query_scalar("SELECT DISTINCT name FROM saga_definitions WHERE name = ANY ($1)")
            .bind(&names)
            .fetch_all(&pool)
            .await
            .map_err(map_err)?
            .into_iter()
            .collect();
    let mut columns: [Vec<String>; 2] = Default::default();
    let mut bodies = Vec::new();
    for start in batch
        .iter()
        .filter(|s| known.contains(&s.request.definition))
    {
        columns[0].push(start.request.saga_id.to_string());
        columns[1].push(start.sender.clone());
        bodies.push(body(&InboxMessage::Start {
            definition: start.request.definition.clone(),
            data: start.request.data.clone(),
            traceparent: start.request.traceparent.clone(),
        })?);
    }
    let [sagas, senders] = columns;
    let mut inserted: HashSet<String> = if sagas.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar(
            "INSERT INTO saga_inbox (tenant_id, saga_id, kind, body, sender)
             SELECT $1, r.saga_id, 'start', r.body, r.sender
               FROM unnest($2::text[], $3::jsonb[], $4::text[])
                    WITH ORDINALITY AS r(saga_id, body, sender, i)
              WHERE NOT EXISTS (SELECT 1 FROM saga_instances s WHERE s.saga_id = r.saga_id)
              ORDER BY r.i
             ON CONFLICT (saga_id) WHERE kind = 'start' DO NOTHING
             RETURNING saga_id",
        )
        .bind(&tenant)
        .bind(&sagas)
        .bind(&bodies)
        .bind(&senders)
        .fetch_all(&pool)
        .await
        .map_err(map_err)?
        .into_iter()
        .collect()
    };
    Ok(batch
        .iter()
        .map(|start| {
            if !known.contains(&start.request.definition) {
                StartRequested::UnknownDefinition
            } else if inserted.remove(start.request.saga_id.as_str()) {
                StartRequested::Accepted
            } else {
                StartRequested::Exists
            }
        })
        .collect())
}
