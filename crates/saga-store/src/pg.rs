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
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{Column, PgPool, Row};
use statefabric_saga::{Definition, SagaId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    Committed, DueTimer, Fence, Filter, HistoryEntry, InboxItem, OpenTasks, Replied, Result,
    SagaStore, StoreError, Stored, Summary, TaskRow, Transition, Trigger, duration_ms, status_str,
    timer_kind_str,
};
use crate::Reply;
use crate::row::{self, Columns, stored, task_row};
use statefabric_domain::TenantId;

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
    let mut options = statefabric_db::pg::PoolOptions::new(url, connections);
    options.application_name = "statefabric-sagas";
    options
        .settings
        .push(("statement_timeout", "10000".to_owned()));
    if let Some(tenant) = tenant {
        options
            .settings
            .push(("statefabric.tenant", tenant.to_owned()));
    }
    statefabric_db::pg::connect(&options)
        .await
        .map_err(|e| match e {
            sqlx::Error::Configuration(_) => StoreError::Invalid(format!("postgres url: {e}")),
            other => StoreError::Unavailable(other.to_string()),
        })
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

/// The saga store on Postgres, for replicated control planes (writes
/// fenced by the leader's term) and the sidecars' task queues.
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

    /// The store's pool (for its gauges).
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
/// How Postgres columns read, for the shared row decoders.
impl Columns for PgRow {
    fn text(&self, column: &str) -> Result<String> {
        self.try_get(column).map_err(map_err)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        self.try_get(column).map_err(map_err)
    }

    fn int(&self, column: &str) -> Result<i64> {
        self.opt_int(column)?
            .ok_or_else(|| StoreError::Backend(format!("stored {column}: unexpected null")))
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        // sqlx decodes only the column's own width: `int4` columns as i32.
        let narrow = self
            .try_column(column)
            .map(|c| <i32 as sqlx::Type<sqlx::Postgres>>::compatible(c.type_info()))
            .map_err(map_err)?;
        if narrow {
            let value: Option<i32> = self.try_get(column).map_err(map_err)?;
            Ok(value.map(i64::from))
        } else {
            self.try_get(column).map_err(map_err)
        }
    }

    fn flag(&self, column: &str) -> Result<bool> {
        self.try_get(column).map_err(map_err)
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T> {
        let value: Value = self.try_get(column).map_err(map_err)?;
        serde_json::from_value(value).map_err(|e| row::bad_json(column, e))
    }

    fn opt_json<T: DeserializeOwned>(&self, column: &str) -> Result<Option<T>> {
        let value: Option<Value> = self.try_get(column).map_err(map_err)?;
        value
            .map(|v| serde_json::from_value(v).map_err(|e| row::bad_json(column, e)))
            .transpose()
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>> {
        self.try_get(column).map_err(map_err)
    }

    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>> {
        self.try_get(column).map_err(map_err)
    }
}

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

    async fn load(&self, saga_id: &SagaId) -> Result<Option<Stored>> {
        let row = sqlx::query(
            "SELECT tenant_id, state, revision, started_at, updated_at, progressed_at, ended_at
               FROM saga_instances WHERE saga_id = $1",
        )
        .bind(saga_id.as_str())
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
        rows.iter().map(row::inbox_item).collect()
    }

    async fn accept_reply(&self, tenant: &TenantId, reply: Reply<'_>) -> Result<Replied> {
        let reply = batched::Reply::new(reply.saga_id, reply.sender, reply.message)?;
        batched::replies(self.pool.clone(), tenant.to_string(), vec![reply])
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
        rows.iter().map(row::due_timer).collect()
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
        .bind(filter.tenant.as_ref().map(TenantId::as_str))
        .bind(filter.started_before)
        .bind(filter.idle_since)
        .bind(i64::from(filter.limit.unwrap_or(100)))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(row::summary).collect()
    }

    async fn history(&self, saga_id: &SagaId) -> Result<Vec<HistoryEntry>> {
        let rows = sqlx::query(
            "SELECT revision, at, kind, actor, epoch, detail FROM saga_history
              WHERE saga_id = $1 ORDER BY revision, idx",
        )
        .bind(saga_id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(row::history_entry).collect()
    }

    async fn tasks(&self, saga_id: &SagaId) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TASK_COLUMNS} FROM saga_tasks WHERE saga_id = $1 ORDER BY dispatched_at, task_key"
        )))
        .bind(saga_id.as_str())
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
        .bind(entry.tenant.as_str())
        .bind(&entry.operator)
        .bind(entry.action_name())
        .bind(entry.saga_id.as_str())
        .bind(&entry.details)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }
}
