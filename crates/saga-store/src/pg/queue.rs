//! [`PgTaskQueue`]: a sidecar's side of the Postgres saga store — claim
//! its agent types' tasks, push deadlines, answer into the inbox, ask for
//! starts — confined to its tenant by Row-Level Security.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::coalesce::Coalescer;
use super::{TASK_COLUMNS, TASKS_CHANNEL, batched, listen, map_err, pool};
use crate::row::task_row;
use crate::{Claim, Reply};
use crate::{Replied, Result, StartRequest, StartRequested, StoreError, TaskQueue, TaskRow};
use statefabric_domain::TenantId;

/// At most this many answers or start requests per statement.
const BATCH: usize = 256;

/// A sidecar's view: its tenant's tasks and inbox. Concurrent answers (and
/// start requests) are written together, one statement for all that
/// arrived while the previous one was being written.
#[derive(Debug, Clone)]
pub struct PgTaskQueue {
    pool: PgPool,
    tenant: String,
    signals: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
    replies: Arc<Coalescer<batched::Reply, Replied>>,
    starts: Arc<Coalescer<batched::Start, StartRequested>>,
}

impl PgTaskQueue {
    /// Connects as the application role, confined to `tenant`.
    pub async fn connect(url: &str, tenant: &str, connections: u32) -> Result<Self> {
        Ok(Self {
            pool: pool(url, connections, Some(tenant)).await?,
            tenant: tenant.to_owned(),
            signals: Arc::default(),
            replies: Arc::new(Coalescer::new(BATCH)),
            starts: Arc::new(Coalescer::new(BATCH)),
        })
    }

    /// Wakes [`TaskQueue::tasks_signal`] on new tasks until `stop`.
    pub fn listen(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let signals = self.signals.clone();
        listen(
            self.pool.clone(),
            TASKS_CHANNEL,
            move |payload| {
                let Ok(signals) = signals.lock() else { return };
                for (key, tx) in signals.iter() {
                    if payload.is_empty() || payload == key {
                        tx.send_modify(|n| *n += 1);
                    }
                }
            },
            stop,
        )
    }

    fn check_tenant(&self, tenant: &str) -> Result<()> {
        if tenant == self.tenant {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "this queue serves tenant {:?}, not {tenant:?}",
                self.tenant
            )))
        }
    }

    fn signal(&self, tenant: &str, agent: &str) -> watch::Receiver<u64> {
        // One sender per agent type this sidecar serves.
        let key = format!("{tenant}/{agent}");
        let mut signals = self
            .signals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        signals
            .entry(key)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
}

#[async_trait]
impl TaskQueue for PgTaskQueue {
    async fn claim(&self, tenant: &TenantId, claim: Claim<'_>) -> Result<Vec<TaskRow>> {
        let tenant = tenant.as_str();
        let Claim { agent, worker, max } = claim;
        self.check_tenant(tenant)?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH claimed AS (
               UPDATE saga_tasks SET claimed_by = $3, claimed_at = now()
                WHERE task_key IN (
                      SELECT task_key FROM saga_tasks
                       WHERE tenant_id = $1 AND agent = $2 AND status = 'dispatched'
                         AND claimed_by IS NULL
                       ORDER BY dispatched_at LIMIT $4
                         FOR UPDATE SKIP LOCKED)
                  AND status = 'dispatched'
               RETURNING {TASK_COLUMNS})
             SELECT c.*, i.state->>'traceparent' AS traceparent
               FROM claimed c LEFT JOIN saga_instances i USING (saga_id)"
        )))
        .bind(tenant)
        .bind(agent)
        .bind(worker)
        .bind(i64::from(max))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut tasks = rows
            .iter()
            .map(|row| {
                let mut task = task_row(row)?;
                task.traceparent = row.try_get("traceparent").map_err(map_err)?;
                Ok(task)
            })
            .collect::<Result<Vec<_>>>()?;
        tasks.sort_by_key(|t| t.dispatched_at);
        Ok(tasks)
    }

    async fn heartbeat(&self, tenant: &TenantId, key: &str) -> Result<Option<DateTime<Utc>>> {
        let tenant = tenant.as_str();
        self.check_tenant(tenant)?;
        sqlx::query_scalar(
            "UPDATE saga_timers tm SET fire_at = now() + t.timeout_ms * interval '1 millisecond'
               FROM saga_tasks t
              WHERE tm.task_key = $1 AND tm.kind = 'deadline'
                AND t.task_key = tm.task_key AND t.status = 'dispatched'
             RETURNING tm.fire_at",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn reply(&self, tenant: &TenantId, reply: Reply<'_>) -> Result<Replied> {
        let tenant = tenant.as_str();
        let Reply {
            sender,
            saga_id,
            message,
        } = reply;
        self.check_tenant(tenant)?;
        let reply = batched::Reply::new(saga_id, sender, message)?;
        self.replies
            .call(reply, |batch| {
                batched::replies(self.pool.clone(), self.tenant.clone(), batch)
            })
            .await
    }

    async fn request_start(
        &self,
        tenant: &TenantId,
        sender: &str,
        start: StartRequest,
    ) -> Result<StartRequested> {
        let tenant = tenant.as_str();
        self.check_tenant(tenant)?;
        let start = batched::Start {
            sender: sender.to_owned(),
            request: start,
        };
        self.starts
            .call(start, |batch| {
                batched::starts(self.pool.clone(), self.tenant.clone(), batch)
            })
            .await
    }

    async fn release(&self, tenant: &TenantId, keys: Option<&[String]>) -> Result<u64> {
        let tenant = tenant.as_str();
        self.check_tenant(tenant)?;
        release(&self.pool, tenant, keys).await
    }

    fn tasks_signal(&self, tenant: &TenantId, agent: &str) -> watch::Receiver<u64> {
        let tenant = tenant.as_str();
        self.signal(tenant, agent)
    }
}

/// Unclaims the tasks and wakes the agent types' waiting workers, in every
/// sidecar (the same `NOTIFY` new tasks send).
async fn release(pool: &PgPool, tenant: &str, keys: Option<&[String]>) -> Result<u64> {
    let row = sqlx::query(
        "WITH released AS (
           UPDATE saga_tasks SET claimed_by = NULL, claimed_at = NULL
            WHERE tenant_id = $1 AND status = 'dispatched' AND claimed_by IS NOT NULL
              AND ($2::text[] IS NULL OR task_key = ANY ($2))
           RETURNING agent),
         woken AS (
           SELECT pg_notify($3, $1 || '/' || agent) FROM (SELECT DISTINCT agent FROM released) a)
         SELECT (SELECT count(*) FROM released) AS released,
                (SELECT count(*) FROM woken) AS woken",
    )
    .bind(tenant)
    .bind(keys)
    .bind(TASKS_CHANNEL)
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    let released: i64 = row.try_get("released").map_err(map_err)?;
    Ok(u64::try_from(released).unwrap_or(0))
}
