//! Idempotency keys in Postgres, shared by every keyed write (appends,
//! context writes): claim in the write's transaction, store the response
//! with it.

use std::time::Duration;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use statefabric_domain::TenantId;

use super::{PgConfig, map_err};
use crate::error::{Result, StoreError};
use crate::port::Idempotency;

/// Claims `idempotency.key` for this transaction, or returns the stored result
/// of its earlier execution. A concurrent holder of the key makes this wait
/// (up to `idempotency_wait`) for it to commit or roll back.
pub(crate) async fn claim_key(
    tx: &mut Transaction<'static, Postgres>,
    config: &PgConfig,
    tenant: &TenantId,
    idempotency: &Idempotency,
) -> Result<Option<Value>> {
    set_lock_timeout(tx, config.idempotency_wait).await?;
    let claimed = sqlx::query_scalar::<_, i32>(
        "INSERT INTO idempotency_keys (tenant_id, idempotency_key, request_hash, status, expires_at) \
         VALUES ($1, $2, $3, 'in_progress', now() + make_interval(secs => $4)) \
         ON CONFLICT (tenant_id, idempotency_key) DO UPDATE \
           SET request_hash = EXCLUDED.request_hash, status = 'in_progress', response = NULL, \
               created_at = now(), expires_at = EXCLUDED.expires_at \
           WHERE idempotency_keys.expires_at < now() \
         RETURNING 1",
    )
    .bind(tenant.as_str())
    .bind(&idempotency.key)
    .bind(&idempotency.request_hash)
    .bind(config.idempotency_ttl.as_secs_f64())
    .fetch_optional(&mut **tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03") => {
            StoreError::IdempotencyInProgress {
                key: idempotency.key.clone(),
            }
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23503") => {
            StoreError::UnknownTenant(tenant.clone())
        }
        _ => map_err(e),
    })?;
    set_lock_timeout(tx, Duration::ZERO).await?;
    if claimed.is_some() {
        return Ok(None);
    }
    let (hash, status, response): (String, String, Option<Value>) = sqlx::query_as(
        "SELECT request_hash, status, response FROM idempotency_keys \
         WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(tenant.as_str())
    .bind(&idempotency.key)
    .fetch_one(&mut **tx)
    .await
    .map_err(map_err)?;
    if hash != idempotency.request_hash {
        return Err(StoreError::IdempotencyKeyReused {
            key: idempotency.key.clone(),
        });
    }
    match (status.as_str(), response) {
        ("completed", Some(result)) => Ok(Some(result)),
        _ => Err(StoreError::IdempotencyInProgress {
            key: idempotency.key.clone(),
        }),
    }
}

async fn set_lock_timeout(
    tx: &mut Transaction<'static, Postgres>,
    timeout: Duration,
) -> Result<()> {
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", timeout.as_millis()))
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

pub(crate) async fn complete_key(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantId,
    idempotency: &Idempotency,
    result: &Value,
) -> Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys SET status = 'completed', response = $3 \
         WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(tenant.as_str())
    .bind(&idempotency.key)
    .bind(Json(result))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}
