//! The audit trail of mutations that do not go through the event store —
//! lock acquire/renew/release, session writes and deletes, operators'
//! actions — into the same append-only `audit_log` the store's own writes
//! use (who, tenant, what, target, outcome in `details`, when): a port and
//! its two adapters (Postgres under the tenant's row-level security, the
//! embedded SQLite). Event appends and context writes are audited inside
//! their own transactions and do not come through here.

use async_trait::async_trait;
use statefabric_domain::TenantId;

use crate::Result;
use crate::pg::PgEventStore;
use crate::sqlite::SqliteEventStore;

/// One audited mutation.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Whose log it goes to.
    pub tenant: TenantId,
    /// Who: the sidecar's identity, or the operator's name.
    pub actor: String,
    /// What: `lock.acquire`, `session.put`, `saga.operator.retry`, ...
    pub action: String,
    /// On what: the lock's, session's or saga's name.
    pub target: String,
    /// The outcome and the particulars (a fence token, a TTL, an error).
    pub details: serde_json::Value,
    /// The trace of the call, to find it in the traces.
    pub trace_id: Option<String>,
}

/// The append-only audit log of mutations that are not events or context
/// writes (locks, sessions, operator actions).
#[async_trait]
pub trait AuditLog: Send + Sync + std::fmt::Debug + 'static {
    /// Appends the entries (one transaction per tenant); rows are never
    /// changed or removed after.
    async fn record(&self, entries: &[AuditEntry]) -> Result<()>;

    /// The tenant's newest entries whose action starts with `prefix`,
    /// oldest first.
    async fn read(&self, tenant: &TenantId, prefix: &str, limit: u32) -> Result<Vec<AuditEntry>>;
}

/// A row as either adapter reads it.
type Row = (String, String, String, Option<String>, String);

fn entries(tenant: &TenantId, mut rows: Vec<Row>) -> Vec<AuditEntry> {
    rows.reverse();
    rows.into_iter()
        .map(|(actor, action, target, trace_id, details)| AuditEntry {
            tenant: tenant.clone(),
            actor,
            action,
            target,
            details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
            trace_id,
        })
        .collect()
}

/// `prefix` as a LIKE pattern matching itself literally.
fn like_prefix(prefix: &str) -> String {
    let escaped = prefix
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("{escaped}%")
}

#[async_trait]
impl AuditLog for PgEventStore {
    async fn record(&self, entries: &[AuditEntry]) -> Result<()> {
        let mut by_tenant: std::collections::BTreeMap<&str, (&TenantId, Vec<&AuditEntry>)> =
            std::collections::BTreeMap::new();
        for entry in entries {
            by_tenant
                .entry(entry.tenant.as_str())
                .or_insert_with(|| (&entry.tenant, Vec::new()))
                .1
                .push(entry);
        }
        for (tenant, rows) in by_tenant.into_values() {
            let mut tx = self.begin_for(tenant).await?;
            let column =
                |f: fn(&AuditEntry) -> String| rows.iter().map(|e| f(e)).collect::<Vec<_>>();
            sqlx::query(
                "INSERT INTO audit_log (tenant_id, actor, action, target, trace_id, details)
                 SELECT $1, actor, action, target, trace_id, details::jsonb
                   FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                        AS r(actor, action, target, trace_id, details)",
            )
            .bind(tenant.as_str())
            .bind(column(|e| e.actor.clone()))
            .bind(column(|e| e.action.clone()))
            .bind(column(|e| e.target.clone()))
            .bind(
                rows.iter()
                    .map(|e| e.trace_id.clone())
                    .collect::<Vec<Option<String>>>(),
            )
            .bind(column(|e| e.details.to_string()))
            .execute(&mut *tx)
            .await
            .map_err(crate::pg::map_err)?;
            tx.commit().await.map_err(crate::pg::map_err)?;
        }
        Ok(())
    }

    async fn read(&self, tenant: &TenantId, prefix: &str, limit: u32) -> Result<Vec<AuditEntry>> {
        let mut tx = self.begin_for(tenant).await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT actor, action, target, trace_id, details::text FROM audit_log
              WHERE tenant_id = $1 AND action LIKE $2 ESCAPE '\\'
              ORDER BY audit_id DESC LIMIT $3",
        )
        .bind(tenant.as_str())
        .bind(like_prefix(prefix))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(crate::pg::map_err)?;
        tx.commit().await.map_err(crate::pg::map_err)?;
        Ok(entries(tenant, rows))
    }
}

#[async_trait]
impl AuditLog for SqliteEventStore {
    async fn record(&self, entries: &[AuditEntry]) -> Result<()> {
        let mut tx = self
            .writer()
            .begin()
            .await
            .map_err(crate::sqlite::map_err)?;
        // One multi-row statement per chunk (a trip to SQLite's connection
        // thread per row kept a busy sidecar's audit queue from draining);
        // six parameters a row stay far below SQLite's limit of 32,766.
        for chunk in entries.chunks(1_000) {
            let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO audit_log (tenant_id, actor, action, target, trace_id, details) ",
            );
            insert.push_values(chunk, |mut row, entry| {
                row.push_bind(entry.tenant.as_str())
                    .push_bind(&entry.actor)
                    .push_bind(&entry.action)
                    .push_bind(&entry.target)
                    .push_bind(&entry.trace_id)
                    .push_bind(entry.details.to_string());
            });
            insert
                .build()
                .execute(&mut *tx)
                .await
                .map_err(crate::sqlite::map_err)?;
        }
        tx.commit().await.map_err(crate::sqlite::map_err)
    }

    async fn read(&self, tenant: &TenantId, prefix: &str, limit: u32) -> Result<Vec<AuditEntry>> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT actor, action, target, trace_id, details FROM audit_log
              WHERE tenant_id = ? AND action LIKE ? ESCAPE '\\'
              ORDER BY audit_id DESC LIMIT ?",
        )
        .bind(tenant.as_str())
        .bind(like_prefix(prefix))
        .bind(i64::from(limit))
        .fetch_all(self.reader())
        .await
        .map_err(crate::sqlite::map_err)?;
        Ok(entries(tenant, rows))
    }
}
