//! Recorded upstream responses for the egress path's replay: a port and
//! its two adapters (Postgres with row-level security per tenant, the
//! embedded SQLite). The sidecar's egress path decides what to record and
//! when to answer from a record; this module only keeps them, per tenant,
//! until they expire.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use statefabric_domain::TenantId;

use crate::Result;
use crate::pg::PgEventStore;
use crate::sqlite::SqliteEventStore;

/// One recorded response, with the fingerprint of the request it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The request's fingerprint (the same key with another request is
    /// refused).
    pub fingerprint: String,
    /// The HTTP status.
    pub status: u16,
    /// The response headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Where the egress path keeps recorded responses, per tenant, until they
/// expire.
#[async_trait]
pub trait ReplayStore: Send + Sync + std::fmt::Debug + 'static {
    /// The unexpired record under `key`.
    async fn get(&self, tenant: &TenantId, key: &str) -> Result<Option<Recorded>>;
    /// Keeps `record` under `key` for `ttl`, unless one is there already
    /// (the first answer stands).
    async fn put(
        &self,
        tenant: &TenantId,
        key: &str,
        record: &Recorded,
        ttl: Duration,
    ) -> Result<()>;
}

fn headers_json(record: &Recorded) -> String {
    serde_json::to_string(&record.headers).unwrap_or_else(|_| "[]".to_owned())
}

fn parse_headers(text: &str) -> Vec<(String, String)> {
    serde_json::from_str(text).unwrap_or_default()
}

/// A row as read by either adapter.
fn recorded(
    fingerprint: String,
    status: i64,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Recorded {
    Recorded {
        fingerprint,
        status: u16::try_from(status).unwrap_or(500),
        headers,
        body,
    }
}

fn expires(ttl: Duration) -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(1))
}

#[async_trait]
impl ReplayStore for PgEventStore {
    async fn get(&self, tenant: &TenantId, key: &str) -> Result<Option<Recorded>> {
        let mut tx = self.begin_for(tenant).await?;
        let row: Option<(String, i32, serde_json::Value, Vec<u8>)> = sqlx::query_as(
            "SELECT fingerprint, status, headers, body FROM egress_replays
              WHERE tenant_id = $1 AND replay_key = $2 AND expires_at > now()",
        )
        .bind(tenant.as_str())
        .bind(key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(crate::pg::map_err)?;
        tx.commit().await.map_err(crate::pg::map_err)?;
        Ok(row.map(|(fingerprint, status, headers, body)| {
            let headers = serde_json::from_value(headers).unwrap_or_default();
            recorded(fingerprint, i64::from(status), headers, body)
        }))
    }

    async fn put(
        &self,
        tenant: &TenantId,
        key: &str,
        record: &Recorded,
        ttl: Duration,
    ) -> Result<()> {
        let mut tx = self.begin_for(tenant).await?;
        // An expired record under the key makes way for the new one.
        sqlx::query(
            "DELETE FROM egress_replays WHERE tenant_id = $1 AND replay_key = $2 AND expires_at <= now()",
        )
        .bind(tenant.as_str())
        .bind(key)
        .execute(&mut *tx)
        .await
        .map_err(crate::pg::map_err)?;
        sqlx::query(
            "INSERT INTO egress_replays (tenant_id, replay_key, fingerprint, status, headers, body, expires_at)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)
             ON CONFLICT (tenant_id, replay_key) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(&record.fingerprint)
        .bind(i32::from(record.status))
        .bind(headers_json(record))
        .bind(&record.body)
        .bind(expires(ttl))
        .execute(&mut *tx)
        .await
        .map_err(crate::pg::map_err)?;
        tx.commit().await.map_err(crate::pg::map_err)
    }
}

#[async_trait]
impl ReplayStore for SqliteEventStore {
    async fn get(&self, tenant: &TenantId, key: &str) -> Result<Option<Recorded>> {
        let row: Option<(String, i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT fingerprint, status, headers, body FROM egress_replays
              WHERE tenant_id = ? AND replay_key = ? AND expires_at > ?",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(Utc::now().timestamp_millis())
        .fetch_optional(self.reader())
        .await
        .map_err(crate::sqlite::map_err)?;
        Ok(row.map(|(fingerprint, status, headers, body)| {
            recorded(fingerprint, status, parse_headers(&headers), body)
        }))
    }

    async fn put(
        &self,
        tenant: &TenantId,
        key: &str,
        record: &Recorded,
        ttl: Duration,
    ) -> Result<()> {
        let now = Utc::now().timestamp_millis();
        sqlx::query(
            "DELETE FROM egress_replays WHERE tenant_id = ? AND replay_key = ? AND expires_at <= ?",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(now)
        .execute(self.writer())
        .await
        .map_err(crate::sqlite::map_err)?;
        sqlx::query(
            "INSERT INTO egress_replays (tenant_id, replay_key, fingerprint, status, headers, body, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (tenant_id, replay_key) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(&record.fingerprint)
        .bind(i64::from(record.status))
        .bind(headers_json(record))
        .bind(&record.body)
        .bind(expires(ttl).timestamp_millis())
        .execute(self.writer())
        .await
        .map_err(crate::sqlite::map_err)?;
        Ok(())
    }
}
