//! The Postgres saga store (`migrations/postgres/0014_sagas.sql`).
//!
//! [`PgSagaStore`] is the engine's: it connects as a member of
//! `statefabric_saga_engine_role` (every tenant's rows) and sends a
//! transition as one call to `statefabric_saga_commit` (a batch of them to
//! `statefabric_saga_commit_many`), so it is one round trip and one
//! transaction, fenced by the leader's epoch.
//! [`PgTaskQueue`] is a sidecar's: it connects as the application role with
//! its tenant set for the whole session, so Row-Level Security confines
//! every statement to that tenant. Both listen for `NOTIFY`s (new inbox
//! rows, new tasks) to wake their waiters at once instead of polling.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use statefabric_saga::Definition;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    Committed, DueTimer, Fence, Filter, HistoryEntry, InboxItem, InboxMessage, OpenTasks, Replied,
    Result, SagaStore, StoreError, Stored, Summary, TaskRow, TaskStatus, Transition, Trigger,
    duration_ms, parse_status, parse_timer_kind, status_str, timer_kind_str,
};

mod batched;
mod coalesce;
mod queue;

pub use queue::PgTaskQueue;

const INBOX_CHANNEL: &str = "statefabric_saga_inbox";
const TASKS_CHANNEL: &str = "statefabric_saga_tasks";

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("SF001") => StoreError::Fenced(db.message().to_owned()),
            Some("SF002") => StoreError::Conflict(db.message().to_owned()),
            _ => StoreError::Backend(e.to_string()),
        },
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

async fn pool(url: &str, connections: u32, tenant: Option<&str>) -> Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| StoreError::Invalid(format!("postgres url: {e}")))?;
    let mut settings = vec![("statement_timeout", "10000".to_owned())];
    if let Some(tenant) = tenant {
        settings.push(("statefabric.tenant", tenant.to_owned()));
    }
    let options = options
        .options(settings.iter().map(|(k, v)| (*k, v.as_str())))
        .application_name("statefabric-sagas");
    PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

/// Calls `on_payload` on every notification on `channel` (and with an
/// empty payload after each (re)connect, when some may have been missed),
/// until `stop`. The caller spawns it where its other tasks live.
async fn listen(
    pool: PgPool,
    channel: &'static str,
    on_payload: impl Fn(&str) + Send + 'static,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let listener = match PgListener::connect_with(&pool).await {
            Ok(mut l) => l.listen(channel).await.map(|()| l),
            Err(err) => Err(err),
        };
        let mut listener = match listener {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(error = %err, channel, "cannot listen; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        on_payload("");
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = listener.recv() => match received {
                    Ok(n) => on_payload(n.payload()),
                    Err(err) => {
                        tracing::warn!(error = %err, channel, "listener lost; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct PgSagaStore {
    pool: PgPool,
    inbox: Arc<watch::Sender<u64>>,
}

impl PgSagaStore {
    /// Connects as the engine (a member of `statefabric_saga_engine_role`).
    pub async fn connect(url: &str, connections: u32) -> Result<Self> {
        Ok(Self {
            pool: pool(url, connections, None).await?,
            inbox: Arc::new(watch::channel(0).0),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Wakes [`SagaStore::inbox_signal`] on new inbox rows until `stop`.
    pub fn listen(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let signal = self.inbox.clone();
        listen(
            self.pool.clone(),
            INBOX_CHANNEL,
            move |_| {
                signal.send_modify(|n| *n += 1);
            },
            stop,
        )
    }
}

/// The transition as the JSON document `statefabric_saga_commit` reads.
fn document(t: &Transition) -> Result<Value> {
    let state =
        serde_json::to_value(&t.instance).map_err(|e| StoreError::Backend(e.to_string()))?;
    let (trigger, inbox_id, timer_key, timer_kind) = match &t.trigger {
        Trigger::Direct => ("direct", None, None, None),
        Trigger::Inbox(id) => ("inbox", Some(*id), None, None),
        Trigger::Timer { key, kind } => (
            "timer",
            None,
            Some(key.clone()),
            Some(timer_kind_str(*kind)),
        ),
    };
    let dispatch: Vec<Value> = t
        .dispatch
        .iter()
        .map(|task| {
            json!({
                "task_key": task.key.to_string(),
                "step": task.key.step,
                "visit": task.key.visit,
                "attempt": task.key.attempt,
                "compensation": task.key.compensation,
                "agent": task.agent,
                "action": task.action,
                "input": task.input,
                "timeout_ms": duration_ms(task.timeout),
            })
        })
        .collect();
    let timers: Vec<Value> = t
        .timers
        .iter()
        .map(|(key, kind, after)| {
            json!({"task_key": key.to_string(), "kind": timer_kind_str(*kind), "after_ms": duration_ms(*after)})
        })
        .collect();
    Ok(json!({
        "saga_id": t.instance.id,
        "tenant_id": t.tenant,
        "definition": t.instance.definition,
        "version": t.instance.version,
        "status": status_str(t.instance.status),
        "paused": t.instance.paused,
        "final": t.instance.status.is_final(),
        "progressed": t.progressed,
        "outbox": t.outbox,
        "state": state,
        "expected": t.expected,
        "trigger": trigger,
        "inbox_id": inbox_id,
        "timer_key": timer_key,
        "timer_kind": timer_kind,
        "finish": t.finish.as_ref().map(|f| json!({
            "key": f.key.to_string(),
            "status": f.status.as_str(),
            "output": f.output,
            "error": f.error,
        })),
        "cancel": t.cancel.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "dispatch": dispatch,
        "timers": timers,
        "history": t.history,
    }))
}

/// `statefabric_saga_apply`'s result codes.
fn committed(result: i64) -> Committed {
    match result {
        -1 => Committed::TriggerGone,
        -2 => Committed::Exists,
        -3 => Committed::Conflict,
        revision => Committed::Written(revision),
    }
}

fn fence_args(fence: Option<&Fence>) -> (Option<&str>, Option<i64>) {
    match fence {
        Some(f) => (
            Some(f.lease.as_str()),
            Some(i64::try_from(f.epoch).unwrap_or(i64::MAX)),
        ),
        None => (None, None),
    }
}

fn stored(row: &PgRow) -> Result<Stored> {
    let state: Value = row.try_get("state").map_err(map_err)?;
    Ok(Stored {
        tenant: row.try_get("tenant_id").map_err(map_err)?,
        instance: serde_json::from_value(state)
            .map_err(|e| StoreError::Backend(format!("stored saga state: {e}")))?,
        revision: row.try_get("revision").map_err(map_err)?,
        started_at: row.try_get("started_at").map_err(map_err)?,
        updated_at: row.try_get("updated_at").map_err(map_err)?,
        progressed_at: row.try_get("progressed_at").map_err(map_err)?,
        ended_at: row.try_get("ended_at").map_err(map_err)?,
    })
}

fn task_row(row: &PgRow) -> Result<TaskRow> {
    let status: String = row.try_get("status").map_err(map_err)?;
    let visit: i32 = row.try_get("visit").map_err(map_err)?;
    let attempt: i32 = row.try_get("attempt").map_err(map_err)?;
    Ok(TaskRow {
        key: row.try_get("task_key").map_err(map_err)?,
        saga_id: row.try_get("saga_id").map_err(map_err)?,
        tenant: row.try_get("tenant_id").map_err(map_err)?,
        step: row.try_get("step").map_err(map_err)?,
        visit: u32::try_from(visit).unwrap_or_default(),
        attempt: u32::try_from(attempt).unwrap_or_default(),
        compensation: row.try_get("compensation").map_err(map_err)?,
        agent: row.try_get("agent").map_err(map_err)?,
        action: row.try_get("action").map_err(map_err)?,
        input: row.try_get("input").map_err(map_err)?,
        timeout_ms: row.try_get("timeout_ms").map_err(map_err)?,
        status: TaskStatus::parse(&status),
        claimed_by: row.try_get("claimed_by").map_err(map_err)?,
        dispatched_at: row.try_get("dispatched_at").map_err(map_err)?,
        finished_at: row.try_get("finished_at").map_err(map_err)?,
        output: row.try_get("output").map_err(map_err)?,
        error: row.try_get("error").map_err(map_err)?,
        // Only a claim reads it (the saga's, joined in).
        traceparent: row.try_get("traceparent").ok().flatten(),
    })
}

const TASK_COLUMNS: &str = "task_key, saga_id, tenant_id, step, visit, attempt, compensation, \
     agent, action, input, timeout_ms, status, claimed_by, dispatched_at, finished_at, output, error";

#[async_trait]
impl SagaStore for PgSagaStore {
    async fn save_definition(&self, definition: &Definition) -> Result<()> {
        let body =
            serde_json::to_value(definition).map_err(|e| StoreError::Backend(e.to_string()))?;
        let version = i32::try_from(definition.version).unwrap_or(i32::MAX);
        sqlx::query(
            "INSERT INTO saga_definitions (name, version, body) VALUES ($1, $2, $3)
             ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(&definition.name)
        .bind(version)
        .bind(&body)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        let existing: Option<Value> = sqlx::query_scalar(
            "SELECT body FROM saga_definitions WHERE name = $1 AND version = $2",
        )
        .bind(&definition.name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let same = existing
            .and_then(|v| serde_json::from_value::<Definition>(v).ok())
            .is_none_or(|d| d == *definition);
        if same {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "definition {} version {} is already stored with different content; publish a new version",
                definition.name, definition.version
            )))
        }
    }

    async fn definitions(&self) -> Result<Vec<Definition>> {
        let bodies: Vec<Value> =
            sqlx::query_scalar("SELECT body FROM saga_definitions ORDER BY name, version")
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)?;
        bodies
            .into_iter()
            .map(|b| {
                serde_json::from_value(b)
                    .map_err(|e| StoreError::Backend(format!("stored definition: {e}")))
            })
            .collect()
    }

    async fn load(&self, saga_id: &str) -> Result<Option<Stored>> {
        let row = sqlx::query(
            "SELECT tenant_id, state, revision, started_at, updated_at, progressed_at, ended_at
               FROM saga_instances WHERE saga_id = $1",
        )
        .bind(saga_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(stored).transpose()
    }

    async fn commit(&self, fence: Option<&Fence>, transition: Transition) -> Result<Committed> {
        let doc = document(&transition)?;
        let (lease, epoch) = fence_args(fence);
        let revision: i64 = sqlx::query_scalar("SELECT statefabric_saga_commit($1, $2, $3)")
            .bind(lease)
            .bind(epoch)
            .bind(&doc)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(committed(revision))
    }

    async fn commit_many(
        &self,
        fence: Option<&Fence>,
        transitions: Vec<Transition>,
    ) -> Result<Vec<Committed>> {
        let docs = transitions
            .iter()
            .map(document)
            .collect::<Result<Vec<_>>>()?;
        let (lease, epoch) = fence_args(fence);
        let results: Vec<i64> =
            sqlx::query_scalar("SELECT statefabric_saga_commit_many($1, $2, $3)")
                .bind(lease)
                .bind(epoch)
                .bind(Value::Array(docs))
                .fetch_one(&self.pool)
                .await
                .map_err(map_err)?;
        if results.len() != transitions.len() {
            return Err(StoreError::Backend(format!(
                "{} outcomes for {} transitions",
                results.len(),
                transitions.len()
            )));
        }
        Ok(results.into_iter().map(committed).collect())
    }

    async fn inbox(&self, limit: u32) -> Result<Vec<InboxItem>> {
        let rows = sqlx::query(
            "SELECT inbox_id, tenant_id, saga_id, body, sender FROM saga_inbox
              ORDER BY inbox_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let body: Value = row.try_get("body").map_err(map_err)?;
                Ok(InboxItem {
                    id: row.try_get("inbox_id").map_err(map_err)?,
                    tenant: row.try_get("tenant_id").map_err(map_err)?,
                    saga_id: row.try_get("saga_id").map_err(map_err)?,
                    message: serde_json::from_value(body)
                        .map_err(|e| StoreError::Backend(format!("inbox row: {e}")))?,
                    sender: row.try_get("sender").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn accept_reply(
        &self,
        tenant: &str,
        sender: &str,
        saga_id: &str,
        message: InboxMessage,
    ) -> Result<Replied> {
        let reply = batched::Reply::new(saga_id, sender, message)?;
        batched::replies(self.pool.clone(), tenant.to_owned(), vec![reply])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Backend("no outcome for the reply".into()))
    }

    async fn discard(&self, fence: Option<&Fence>, inbox_id: i64) -> Result<()> {
        let (lease, epoch) = fence_args(fence);
        sqlx::query("SELECT statefabric_saga_discard($1, $2, $3)")
            .bind(lease)
            .bind(epoch)
            .bind(inbox_id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn due_timers(&self, limit: u32) -> Result<Vec<DueTimer>> {
        let rows = sqlx::query(
            "SELECT saga_id, task_key, kind FROM saga_timers WHERE fire_at <= now()
              ORDER BY fire_at LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind").map_err(map_err)?;
                Ok(DueTimer {
                    saga_id: row.try_get("saga_id").map_err(map_err)?,
                    key: row.try_get("task_key").map_err(map_err)?,
                    kind: parse_timer_kind(&kind),
                })
            })
            .collect()
    }

    async fn next_timer_in(&self) -> Result<Option<Duration>> {
        let row = sqlx::query(
            "SELECT GREATEST(0, EXTRACT(EPOCH FROM (min(fire_at) - now())) * 1000)::bigint AS ms
               FROM saga_timers",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let ms: Option<i64> = row.try_get("ms").map_err(map_err)?;
        Ok(ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<Summary>> {
        let rows = sqlx::query(
            "SELECT saga_id, tenant_id, definition, version, status, paused, started_at,
                    progressed_at, ended_at
               FROM saga_instances
              WHERE ($1::text IS NULL OR definition = $1)
                AND ($2::text IS NULL OR status = $2)
                AND ($3::text IS NULL OR tenant_id = $3)
                AND ($4::timestamptz IS NULL OR started_at < $4)
                AND ($5::timestamptz IS NULL OR (ended_at IS NULL
                     AND (progressed_at < $5 OR status = 'STUCK')))
              ORDER BY started_at DESC, saga_id LIMIT $6",
        )
        .bind(filter.definition.as_deref())
        .bind(filter.status.map(status_str))
        .bind(filter.tenant.as_deref())
        .bind(filter.started_before)
        .bind(filter.idle_since)
        .bind(i64::from(filter.limit.unwrap_or(100)))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status").map_err(map_err)?;
                let version: i32 = row.try_get("version").map_err(map_err)?;
                Ok(Summary {
                    saga_id: row.try_get("saga_id").map_err(map_err)?,
                    tenant: row.try_get("tenant_id").map_err(map_err)?,
                    definition: row.try_get("definition").map_err(map_err)?,
                    version: u32::try_from(version).unwrap_or_default(),
                    status: parse_status(&status)?,
                    paused: row.try_get("paused").map_err(map_err)?,
                    started_at: row.try_get("started_at").map_err(map_err)?,
                    progressed_at: row.try_get("progressed_at").map_err(map_err)?,
                    ended_at: row.try_get("ended_at").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn history(&self, saga_id: &str) -> Result<Vec<HistoryEntry>> {
        let rows = sqlx::query(
            "SELECT revision, at, kind, actor, epoch, detail FROM saga_history
              WHERE saga_id = $1 ORDER BY revision, idx",
        )
        .bind(saga_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                Ok(HistoryEntry {
                    revision: row.try_get("revision").map_err(map_err)?,
                    at: row.try_get("at").map_err(map_err)?,
                    kind: row.try_get("kind").map_err(map_err)?,
                    actor: row.try_get("actor").map_err(map_err)?,
                    epoch: row.try_get("epoch").map_err(map_err)?,
                    detail: row.try_get("detail").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn tasks(&self, saga_id: &str) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TASK_COLUMNS} FROM saga_tasks WHERE saga_id = $1 ORDER BY dispatched_at, task_key"
        )))
        .bind(saga_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(task_row).collect()
    }

    async fn count_stalled(&self, definition: &str, since: DateTime<Utc>) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM saga_instances
              WHERE definition = $1 AND ended_at IS NULL
                AND (progressed_at < $2 OR status = 'STUCK')",
        )
        .bind(definition)
        .bind(since)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn open_tasks(&self) -> Result<Vec<OpenTasks>> {
        sqlx::query_as(OpenTasks::QUERY)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)
    }

    fn inbox_signal(&self) -> watch::Receiver<u64> {
        self.inbox.subscribe()
    }

    async fn audit_operator(&self, entry: &super::OperatorAudit) -> Result<()> {
        // Any tenant's row, of this kind only (migration 0026's policy).
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, actor, action, target, details)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&entry.tenant)
        .bind(&entry.operator)
        .bind(entry.action_name())
        .bind(&entry.saga_id)
        .bind(&entry.details)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }
}
