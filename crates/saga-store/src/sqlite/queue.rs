//! The agents' side of the embedded saga store: claims, deadlines, answers
//! and start requests, each naming its tenant.

use chrono::{DateTime, Utc};
use sqlx::Row;
use tokio::sync::watch;

use super::{SqliteSagaStore, TASK_COLUMNS, json_err, map_err, now_ms, time};
use crate::row::task_row;
use crate::{Claim, Reply};
use crate::{
    InboxMessage, Replied, Result, StartRequest, StartRequested, StoreError, TaskQueue, TaskRow,
    TaskStatus, not_queued,
};
use statefabric_domain::TenantId;

#[async_trait::async_trait]
impl TaskQueue for SqliteSagaStore {
    async fn claim(&self, tenant: &TenantId, claim: Claim<'_>) -> Result<Vec<TaskRow>> {
        let tenant = tenant.as_str();
        let Claim { agent, worker, max } = claim;
        // The single writer serializes claims: a task goes to one worker.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE saga_tasks SET claimed_by = ?3, claimed_at = ?5
              WHERE task_key IN (
                    SELECT task_key FROM saga_tasks
                     WHERE tenant_id = ?1 AND agent = ?2 AND status = 'dispatched'
                       AND claimed_by IS NULL
                     ORDER BY dispatched_at LIMIT ?4)
             RETURNING {TASK_COLUMNS}"
        )))
        .bind(tenant)
        .bind(agent)
        .bind(worker)
        .bind(i64::from(max))
        .bind(now_ms())
        .fetch_all(&self.writer)
        .await
        .map_err(map_err)?;
        let mut tasks = rows.iter().map(task_row).collect::<Result<Vec<_>>>()?;
        tasks.sort_by_key(|t| t.dispatched_at);
        self.with_traceparents(&mut tasks).await?;
        Ok(tasks)
    }

    async fn heartbeat(&self, tenant: &TenantId, key: &str) -> Result<Option<DateTime<Utc>>> {
        let tenant = tenant.as_str();
        let fire_at: Option<i64> = sqlx::query_scalar(
            "UPDATE saga_timers SET fire_at = ?3 + (
                    SELECT timeout_ms FROM saga_tasks t WHERE t.task_key = saga_timers.task_key)
              WHERE task_key = ?1 AND kind = 'deadline' AND tenant_id = ?2
                AND EXISTS (SELECT 1 FROM saga_tasks t
                             WHERE t.task_key = saga_timers.task_key AND t.status = 'dispatched')
             RETURNING fire_at",
        )
        .bind(key)
        .bind(tenant)
        .bind(now_ms())
        .fetch_optional(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(fire_at.map(time))
    }

    async fn reply(&self, tenant: &TenantId, reply: Reply<'_>) -> Result<Replied> {
        let tenant = tenant.as_str();
        let Reply {
            sender,
            saga_id,
            message,
        } = reply;
        let Some(key) = message.task_key().map(str::to_owned) else {
            return Err(StoreError::Invalid("a reply names its task".into()));
        };
        let body = serde_json::to_string(&message).map_err(json_err)?;
        let inserted = sqlx::query(
            "INSERT INTO saga_inbox (tenant_id, saga_id, kind, task_key, body, sender, at)
             SELECT ?1, t.saga_id, ?3, ?4, ?5, ?6, ?7 FROM saga_tasks t
              WHERE t.task_key = ?4 AND t.saga_id = ?2 AND t.tenant_id = ?1
                AND t.status = 'dispatched'
             ON CONFLICT (task_key) WHERE task_key IS NOT NULL DO NOTHING",
        )
        .bind(tenant)
        .bind(saga_id.as_str())
        .bind(message.kind())
        .bind(&key)
        .bind(&body)
        .bind(sender)
        .bind(now_ms())
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        if inserted.rows_affected() > 0 {
            self.inbox.send_modify(|n| *n += 1);
            return Ok(Replied::Accepted);
        }
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM saga_tasks WHERE task_key = ? AND saga_id = ? AND tenant_id = ?",
        )
        .bind(&key)
        .bind(saga_id.as_str())
        .bind(tenant)
        .fetch_optional(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(not_queued(
            message.kind(),
            status.as_deref().map(TaskStatus::parse),
        ))
    }

    async fn request_start(
        &self,
        tenant: &TenantId,
        sender: &str,
        start: StartRequest,
    ) -> Result<StartRequested> {
        let tenant = tenant.as_str();
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM saga_definitions WHERE name = ?)")
                .bind(&start.definition)
                .fetch_one(&self.writer)
                .await
                .map_err(map_err)?;
        if !known {
            return Ok(StartRequested::UnknownDefinition);
        }
        let saga_id = start.saga_id.clone();
        let body = serde_json::to_string(&InboxMessage::Start {
            definition: start.definition,
            data: start.data,
            traceparent: start.traceparent,
        })
        .map_err(json_err)?;
        let inserted = sqlx::query(
            "INSERT INTO saga_inbox (tenant_id, saga_id, kind, body, sender, at)
             SELECT ?1, ?2, 'start', ?3, ?4, ?5
              WHERE NOT EXISTS (SELECT 1 FROM saga_instances WHERE saga_id = ?2)
             ON CONFLICT (saga_id) WHERE kind = 'start' DO NOTHING",
        )
        .bind(tenant)
        .bind(saga_id.as_str())
        .bind(&body)
        .bind(sender)
        .bind(now_ms())
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        if inserted.rows_affected() > 0 {
            self.inbox.send_modify(|n| *n += 1);
            Ok(StartRequested::Accepted)
        } else {
            Ok(StartRequested::Exists)
        }
    }

    async fn release(&self, tenant: &TenantId, keys: Option<&[String]>) -> Result<u64> {
        let tenant = tenant.as_str();
        let keys = keys
            .map(|k| serde_json::to_string(k).map_err(json_err))
            .transpose()?;
        let released = sqlx::query(
            "UPDATE saga_tasks SET claimed_by = NULL, claimed_at = NULL
              WHERE tenant_id = ?1 AND status = 'dispatched' AND claimed_by IS NOT NULL
                AND (?2 IS NULL OR task_key IN (SELECT value FROM json_each(?2)))
             RETURNING agent",
        )
        .bind(tenant)
        .bind(keys)
        .fetch_all(&self.writer)
        .await
        .map_err(map_err)?;
        let agents: std::collections::BTreeSet<String> = released
            .iter()
            .filter_map(|r| r.try_get::<String, _>("agent").ok())
            .collect();
        self.wake_agents(tenant, agents.into_iter());
        Ok(released.len() as u64)
    }

    fn tasks_signal(&self, tenant: &TenantId, agent: &str) -> watch::Receiver<u64> {
        let tenant = tenant.as_str();
        self.task_sender(tenant, agent)
    }
}
