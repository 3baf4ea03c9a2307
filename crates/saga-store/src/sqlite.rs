//! The embedded saga store: the saga tables in the SQLite file of the
//! embedded event store (`migrations/sqlite/0004_sagas.sql`), written through
//! its single writer connection. One process owns the file, so there is no
//! leader epoch to check (the fence is ignored) and no row security (every
//! statement names its tenant). Waiters are woken in-process: the engine's
//! commits wake the agents' claimers and their replies wake the engine, which
//! makes this also the in-process bus of the embedded mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};
use statefabric_saga::{Definition, SagaId};
use tokio::sync::watch;

use super::{
    Committed, DueTimer, Fence, Filter, HistoryEntry, InboxItem, OpenTasks, Replied, Result,
    SagaStore, StoreError, Stored, Summary, TaskQueue, TaskRow, Transition, status_str,
};
use crate::Reply;
use crate::row::{self, Columns, stored, task_row};
use statefabric_domain::TenantId;

mod queue;
mod write;

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Backend(format!("stored JSON: {e}"))
}

/// How SQLite columns read, for the shared row decoders: times are epoch
/// milliseconds, JSON is text.
impl Columns for SqliteRow {
    fn text(&self, column: &str) -> Result<String> {
        self.try_get(column).map_err(map_err)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        self.try_get(column).map_err(map_err)
    }

    fn int(&self, column: &str) -> Result<i64> {
        self.try_get(column).map_err(map_err)
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        self.try_get(column).map_err(map_err)
    }

    fn flag(&self, column: &str) -> Result<bool> {
        self.try_get(column).map_err(map_err)
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T> {
        let text: String = self.try_get(column).map_err(map_err)?;
        serde_json::from_str(&text).map_err(|e| row::bad_json(column, e))
    }

    fn opt_json<T: DeserializeOwned>(&self, column: &str) -> Result<Option<T>> {
        let text: Option<String> = self.try_get(column).map_err(map_err)?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| row::bad_json(column, e)))
            .transpose()
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>> {
        self.try_get(column).map(time).map_err(map_err)
    }

    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>> {
        self.try_get::<Option<i64>, _>(column)
            .map(|ms| ms.map(time))
            .map_err(map_err)
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The saga store in the embedded SQLite file (`fabric dev`, a solo
/// control plane): one writer connection, readers beside it.
#[derive(Debug, Clone)]
pub struct SqliteSagaStore {
    writer: SqlitePool,
    reader: SqlitePool,
    inbox: Arc<watch::Sender<u64>>,
    tasks: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

impl SqliteSagaStore {
    /// Over the embedded event store's pools (its migrations create the
    /// saga tables): `writer` must be its single writer connection.
    pub fn new(writer: SqlitePool, reader: SqlitePool) -> Self {
        Self {
            writer,
            reader,
            inbox: Arc::new(watch::channel(0).0),
            tasks: Arc::default(),
        }
    }

    fn task_sender(&self, tenant: &str, agent: &str) -> watch::Receiver<u64> {
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tasks
            .entry(format!("{tenant}/{agent}"))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Fills in the trace context of each task's saga (one query).
    async fn with_traceparents(&self, tasks: &mut [TaskRow]) -> Result<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        let sagas = serde_json::to_string(&tasks.iter().map(|t| &t.saga_id).collect::<Vec<_>>())
            .map_err(json_err)?;
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT saga_id, json_extract(state, '$.traceparent') FROM saga_instances
              WHERE saga_id IN (SELECT value FROM json_each(?))",
        )
        .bind(sagas)
        .fetch_all(&self.writer)
        .await
        .map_err(map_err)?;
        let traces: HashMap<String, Option<String>> = rows.into_iter().collect();
        for task in tasks {
            task.traceparent = traces.get(task.saga_id.as_str()).cloned().flatten();
        }
        Ok(())
    }

    fn wake_agents(&self, tenant: &str, agents: impl Iterator<Item = String>) {
        let tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for agent in agents {
            if let Some(tx) = tasks.get(&format!("{tenant}/{agent}")) {
                tx.send_modify(|n| *n += 1);
            }
        }
    }
}

const TASK_COLUMNS: &str = "task_key, saga_id, tenant_id, step, visit, attempt, compensation, \
     agent, action, input, timeout_ms, status, claimed_by, dispatched_at, finished_at, output, error";

#[async_trait]
impl SagaStore for SqliteSagaStore {
    async fn save_definition(&self, definition: &Definition) -> Result<()> {
        let body = serde_json::to_string(definition).map_err(json_err)?;
        let version = i64::from(definition.version);
        sqlx::query(
            "INSERT INTO saga_definitions (name, version, body, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(&definition.name)
        .bind(version)
        .bind(&body)
        .bind(now_ms())
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        let existing: String =
            sqlx::query_scalar("SELECT body FROM saga_definitions WHERE name = ? AND version = ?")
                .bind(&definition.name)
                .bind(version)
                .fetch_one(&self.writer)
                .await
                .map_err(map_err)?;
        let same = serde_json::from_str::<Definition>(&existing).is_ok_and(|d| d == *definition);
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
        let bodies: Vec<String> =
            sqlx::query_scalar("SELECT body FROM saga_definitions ORDER BY name, version")
                .fetch_all(&self.reader)
                .await
                .map_err(map_err)?;
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).map_err(json_err))
            .collect()
    }

    async fn load(&self, saga_id: &SagaId) -> Result<Option<Stored>> {
        // From the writer: the engine reads its own last commit.
        let row = sqlx::query(
            "SELECT tenant_id, state, revision, started_at, updated_at, progressed_at, ended_at
               FROM saga_instances WHERE saga_id = ?",
        )
        .bind(saga_id.as_str())
        .fetch_optional(&self.writer)
        .await
        .map_err(map_err)?;
        row.as_ref().map(stored).transpose()
    }

    async fn commit(&self, _fence: Option<&Fence>, t: Transition) -> Result<Committed> {
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        let committed = write::transition(&mut tx, now_ms(), &t).await?;
        if committed == Committed::TriggerGone {
            // Nothing was written.
            return Ok(committed);
        }
        // `Exists` consumed its trigger: that much is kept.
        tx.commit().await.map_err(map_err)?;
        if let Committed::Written(_) = committed {
            self.wake_agents(
                t.tenant.as_str(),
                t.dispatch.iter().map(|d| d.agent.clone()),
            );
        }
        Ok(committed)
    }

    async fn commit_many(
        &self,
        _fence: Option<&Fence>,
        transitions: Vec<Transition>,
    ) -> Result<Vec<Committed>> {
        let now = now_ms();
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        let mut outcomes = Vec::with_capacity(transitions.len());
        for t in &transitions {
            // A savepoint each, so a conflict undoes only its own writes.
            let mut one = sqlx::Connection::begin(&mut *tx).await.map_err(map_err)?;
            match write::transition(&mut one, now, t).await {
                Ok(committed) => {
                    one.commit().await.map_err(map_err)?;
                    outcomes.push(committed);
                }
                Err(StoreError::Conflict(_)) => {
                    one.rollback().await.map_err(map_err)?;
                    outcomes.push(Committed::Conflict);
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().await.map_err(map_err)?;
        for (t, outcome) in transitions.iter().zip(&outcomes) {
            if matches!(outcome, Committed::Written(_)) {
                self.wake_agents(
                    t.tenant.as_str(),
                    t.dispatch.iter().map(|d| d.agent.clone()),
                );
            }
        }
        Ok(outcomes)
    }

    async fn inbox(&self, limit: u32) -> Result<Vec<InboxItem>> {
        let rows = sqlx::query(
            "SELECT inbox_id, tenant_id, saga_id, body, sender FROM saga_inbox
              ORDER BY inbox_id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.writer)
        .await
        .map_err(map_err)?;
        rows.iter().map(row::inbox_item).collect()
    }

    async fn accept_reply(&self, tenant: &TenantId, reply: Reply<'_>) -> Result<Replied> {
        TaskQueue::reply(self, tenant, reply).await
    }

    async fn discard(&self, _fence: Option<&Fence>, inbox_id: i64) -> Result<()> {
        sqlx::query("DELETE FROM saga_inbox WHERE inbox_id = ?")
            .bind(inbox_id)
            .execute(&self.writer)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn due_timers(&self, limit: u32) -> Result<Vec<DueTimer>> {
        let rows = sqlx::query(
            "SELECT saga_id, task_key, kind FROM saga_timers WHERE fire_at <= ?
              ORDER BY fire_at LIMIT ?",
        )
        .bind(now_ms())
        .bind(i64::from(limit))
        .fetch_all(&self.writer)
        .await
        .map_err(map_err)?;
        rows.iter().map(row::due_timer).collect()
    }

    async fn next_timer_in(&self) -> Result<Option<Duration>> {
        let row = sqlx::query("SELECT min(fire_at) AS fire_at FROM saga_timers")
            .fetch_one(&self.writer)
            .await
            .map_err(map_err)?;
        let fire_at: Option<i64> = row.try_get("fire_at").map_err(map_err)?;
        Ok(fire_at.map(|at| {
            Duration::from_millis(u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0))
        }))
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<Summary>> {
        let rows = sqlx::query(
            "SELECT saga_id, tenant_id, definition, version, status, paused, started_at,
                    progressed_at, ended_at
               FROM saga_instances
              WHERE (?1 IS NULL OR definition = ?1)
                AND (?2 IS NULL OR status = ?2)
                AND (?3 IS NULL OR tenant_id = ?3)
                AND (?4 IS NULL OR started_at < ?4)
                AND (?5 IS NULL OR (ended_at IS NULL AND (progressed_at < ?5 OR status = 'STUCK')))
              ORDER BY started_at DESC, saga_id LIMIT ?6",
        )
        .bind(filter.definition.as_deref())
        .bind(filter.status.map(status_str))
        .bind(filter.tenant.as_ref().map(TenantId::as_str))
        .bind(filter.started_before.map(|t| t.timestamp_millis()))
        .bind(filter.idle_since.map(|t| t.timestamp_millis()))
        .bind(i64::from(filter.limit.unwrap_or(100)))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(row::summary).collect()
    }

    async fn history(&self, saga_id: &SagaId) -> Result<Vec<HistoryEntry>> {
        let rows = sqlx::query(
            "SELECT revision, at, kind, actor, epoch, detail FROM saga_history
              WHERE saga_id = ? ORDER BY revision, idx",
        )
        .bind(saga_id.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(row::history_entry).collect()
    }

    async fn tasks(&self, saga_id: &SagaId) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TASK_COLUMNS} FROM saga_tasks WHERE saga_id = ? ORDER BY dispatched_at, task_key"
        )))
        .bind(saga_id.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(task_row).collect()
    }

    async fn count_stalled(&self, definition: &str, since: DateTime<Utc>) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM saga_instances
              WHERE definition = ? AND ended_at IS NULL AND (progressed_at < ? OR status = 'STUCK')",
        )
        .bind(definition)
        .bind(since.timestamp_millis())
        .fetch_one(&self.reader)
        .await
        .map_err(map_err)
    }

    async fn open_tasks(&self) -> Result<Vec<OpenTasks>> {
        sqlx::query_as(OpenTasks::QUERY)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)
    }

    fn inbox_signal(&self) -> watch::Receiver<u64> {
        self.inbox.subscribe()
    }

    /// Every inbox row is written by this process, through this store.
    fn inbox_signal_is_complete(&self) -> bool {
        true
    }

    async fn audit_operator(&self, entry: &super::OperatorAudit) -> Result<()> {
        // The event store's audit log, in the same file.
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, actor, action, target, details)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(entry.tenant.as_str())
        .bind(&entry.operator)
        .bind(entry.action_name())
        .bind(entry.saga_id.as_str())
        .bind(entry.details.to_string())
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(())
    }
}
