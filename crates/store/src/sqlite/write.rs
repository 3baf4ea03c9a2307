//! Writes for the embedded store. They run on the single write connection, so
//! the checks (expected version, idempotency key) and the writes they guard
//! cannot interleave with another writer's.

use chrono::Utc;
use serde_json::json;
use sqlx::{Sqlite, SqlitePool, Transaction};
use statefabric_domain::{ExpectedVersion, Snapshot, TenantId};

use super::{SqliteConfig, map_err};
use crate::error::{Result, StoreError};
use crate::port::{AppendOutcome, AppendRequest, AppendResult, Idempotency, Scope};

pub(super) async fn append(
    writer: &SqlitePool,
    config: &SqliteConfig,
    scope: &Scope,
    request: &AppendRequest,
) -> Result<AppendOutcome> {
    let mut tx = writer.begin().await.map_err(map_err)?;
    let outcome = append_in(&mut tx, config, scope, request).await;
    match &outcome {
        Ok(o) if !o.replayed => tx.commit().await.map_err(map_err)?,
        _ => tx.rollback().await.map_err(map_err)?,
    }
    outcome
}

async fn append_in(
    tx: &mut Transaction<'static, Sqlite>,
    config: &SqliteConfig,
    scope: &Scope,
    request: &AppendRequest,
) -> Result<AppendOutcome> {
    let tenant = &scope.tenant;
    if let Some(idempotency) = &request.idempotency
        && let Some(stored) = claim_key(tx, config, tenant, idempotency).await?
    {
        let result = serde_json::from_value(stored).map_err(|e| {
            StoreError::Backend(sqlx::Error::Decode(
                format!("stored append result: {e}").into(),
            ))
        })?;
        return Ok(AppendOutcome {
            result,
            replayed: true,
        });
    }

    if let Some(fence) = &request.fence {
        check_fence(tx, tenant, fence).await?;
    }
    let current: Option<(i64, String)> = sqlx::query_as(
        "SELECT version, stream_type FROM streams WHERE tenant_id = ? AND stream_id = ?",
    )
    .bind(tenant.as_str())
    .bind(request.stream_id.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    let actual = current
        .as_ref()
        .map(|(v, _)| u64::try_from(*v).unwrap_or_default());
    if let Some((_, stream_type)) = &current
        && *stream_type != request.stream_type
    {
        return Err(StoreError::StreamTypeMismatch {
            stream: request.stream_id.clone(),
            actual: stream_type.clone(),
            requested: request.stream_type.clone(),
        });
    }
    let satisfied = match request.expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => actual.is_none(),
        ExpectedVersion::StreamExists => actual.is_some(),
        ExpectedVersion::Exact(v) => actual == Some(v),
    };
    if !satisfied {
        return Err(StoreError::Concurrency {
            stream: request.stream_id.clone(),
            expected: request.expected,
            actual,
        });
    }

    let before = actual.unwrap_or(0);
    let count = request.events.len() as u64;
    let after = before + count;
    sqlx::query(
        "INSERT INTO streams (tenant_id, stream_id, stream_type, version) VALUES (?, ?, ?, ?) \
         ON CONFLICT (tenant_id, stream_id) DO UPDATE \
           SET version = excluded.version, \
               updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
    )
    .bind(tenant.as_str())
    .bind(request.stream_id.as_str())
    .bind(&request.stream_type)
    .bind(to_i64(after))
    .execute(&mut **tx)
    .await
    .map_err(|e| classify(e, tenant))?;

    let mut positions = Vec::with_capacity(request.events.len());
    for (i, event) in request.events.iter().enumerate() {
        let position: i64 = sqlx::query_scalar(
            "INSERT INTO event_store (event_id, tenant_id, stream_id, stream_type, event_type, \
             event_schema_version, data, metadata, stream_version) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING global_position",
        )
        .bind(event.id.to_string())
        .bind(tenant.as_str())
        .bind(request.stream_id.as_str())
        .bind(&request.stream_type)
        .bind(&event.event_type)
        .bind(i64::from(event.schema_version))
        .bind(event.data.to_string())
        .bind(serde_json::to_string(&event.metadata).unwrap_or_else(|_| "{}".to_owned()))
        .bind(to_i64(before + i as u64 + 1))
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| classify(e, tenant))?;
        positions.push(u64::try_from(position).unwrap_or_default());
    }

    let details = json!({
        "events": count,
        "first_event_id": request.events.first().map(|e| e.id),
        "idempotency_key": request.idempotency.as_ref().map(|i| &i.key),
    });
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, target, version_before, version_after, trace_id, details) \
         VALUES (?, ?, 'append', ?, ?, ?, ?, ?)",
    )
    .bind(tenant.as_str())
    .bind(&scope.actor)
    .bind(format!("stream:{}", request.stream_id))
    .bind(actual.map(to_i64))
    .bind(to_i64(after))
    .bind(scope.trace_id.as_deref())
    .bind(details.to_string())
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;

    let result = AppendResult {
        first_version: before + 1,
        last_version: after,
        first_position: positions.iter().copied().min().unwrap_or_default(),
        last_position: positions.iter().copied().max().unwrap_or_default(),
    };
    if let Some(idempotency) = &request.idempotency {
        complete_key(
            tx,
            tenant,
            idempotency,
            &serde_json::to_value(&result).unwrap_or_default(),
        )
        .await?;
    }
    Ok(AppendOutcome {
        result,
        replayed: false,
    })
}

/// Claims the key, or returns the stored result of its earlier execution.
/// With one writer there is never a concurrent holder; an `in_progress` row
/// can only be left by a crash mid-transaction, which SQLite rolls back, so
/// it is reported rather than waited for.
pub(crate) async fn claim_key(
    tx: &mut Transaction<'static, Sqlite>,
    config: &SqliteConfig,
    tenant: &TenantId,
    idempotency: &Idempotency,
) -> Result<Option<serde_json::Value>> {
    let now = Utc::now().timestamp_millis();
    let existing: Option<(String, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT request_hash, status, response, expires_at_ms FROM idempotency_keys \
         WHERE tenant_id = ? AND idempotency_key = ?",
    )
    .bind(tenant.as_str())
    .bind(&idempotency.key)
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    if let Some((hash, status, response, expires)) = existing {
        if expires >= now {
            if hash != idempotency.request_hash {
                return Err(StoreError::IdempotencyKeyReused {
                    key: idempotency.key.clone(),
                });
            }
            return match (
                status.as_str(),
                response.and_then(|r| serde_json::from_str(&r).ok()),
            ) {
                ("completed", Some(result)) => Ok(Some(result)),
                _ => Err(StoreError::IdempotencyInProgress {
                    key: idempotency.key.clone(),
                }),
            };
        }
        sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = ? AND idempotency_key = ?")
            .bind(tenant.as_str())
            .bind(&idempotency.key)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
    }
    let ttl_ms = i64::try_from(config.idempotency_ttl.as_millis()).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO idempotency_keys (tenant_id, idempotency_key, request_hash, status, expires_at_ms) \
         VALUES (?, ?, ?, 'in_progress', ?)",
    )
    .bind(tenant.as_str())
    .bind(&idempotency.key)
    .bind(&idempotency.request_hash)
    .bind(now.saturating_add(ttl_ms))
    .execute(&mut **tx)
    .await
    .map_err(|e| classify(e, tenant))?;
    Ok(None)
}

/// Advances the lock's fence to `fence.token`, or refuses a stale token.
pub(crate) async fn check_fence(
    tx: &mut Transaction<'static, Sqlite>,
    tenant: &TenantId,
    fence: &crate::port::Fence,
) -> Result<()> {
    let seen: Option<i64> =
        sqlx::query_scalar("SELECT token FROM fences WHERE tenant_id = ? AND lock_name = ?")
            .bind(tenant.as_str())
            .bind(&fence.lock)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err)?;
    let token = to_i64(fence.token);
    if let Some(current) = seen.filter(|c| *c > token) {
        return Err(StoreError::StaleFence {
            lock: fence.lock.clone(),
            token: fence.token,
            current: u64::try_from(current).unwrap_or_default(),
        });
    }
    sqlx::query(
        "INSERT INTO fences (tenant_id, lock_name, token) VALUES (?, ?, ?) \
         ON CONFLICT (tenant_id, lock_name) DO UPDATE SET token = excluded.token",
    )
    .bind(tenant.as_str())
    .bind(&fence.lock)
    .bind(token)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

pub(crate) async fn complete_key(
    conn: &mut sqlx::SqliteConnection,
    tenant: &TenantId,
    idempotency: &Idempotency,
    response: &serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys SET status = 'completed', response = ? \
         WHERE tenant_id = ? AND idempotency_key = ?",
    )
    .bind(response.to_string())
    .bind(tenant.as_str())
    .bind(&idempotency.key)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

pub(super) async fn save_snapshot(
    writer: &SqlitePool,
    scope: &Scope,
    snapshot: &Snapshot,
) -> Result<()> {
    let mut tx = writer.begin().await.map_err(map_err)?;
    let current: Option<(i64, String)> = sqlx::query_as(
        "SELECT version, stream_type FROM streams WHERE tenant_id = ? AND stream_id = ?",
    )
    .bind(scope.tenant.as_str())
    .bind(snapshot.stream_id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    let Some((stream_version, stream_type)) = current else {
        return Err(StoreError::StreamNotFound(snapshot.stream_id.clone()));
    };
    if stream_type != snapshot.stream_type {
        return Err(StoreError::StreamTypeMismatch {
            stream: snapshot.stream_id.clone(),
            actual: stream_type,
            requested: snapshot.stream_type.clone(),
        });
    }
    let version = to_i64(snapshot.version);
    if stream_version < version {
        return Err(StoreError::SnapshotAhead {
            stream: snapshot.stream_id.clone(),
            snapshot: snapshot.version,
            stream_version: u64::try_from(stream_version).unwrap_or_default(),
        });
    }
    let written = sqlx::query(
        "INSERT INTO snapshots (tenant_id, stream_id, stream_type, stream_version, state, state_schema_version) \
         VALUES (?, ?, ?, ?, ?, ?) \
         ON CONFLICT (tenant_id, stream_id) DO UPDATE \
           SET stream_version = excluded.stream_version, state = excluded.state, \
               state_schema_version = excluded.state_schema_version, \
               created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
           WHERE snapshots.stream_version < excluded.stream_version",
    )
    .bind(scope.tenant.as_str())
    .bind(snapshot.stream_id.as_str())
    .bind(&snapshot.stream_type)
    .bind(version)
    .bind(snapshot.state.to_string())
    .bind(i64::from(snapshot.schema_version))
    .execute(&mut *tx)
    .await
    .map_err(map_err)?
    .rows_affected();
    if written > 0 {
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, actor, action, target, version_after, trace_id) \
             VALUES (?, ?, 'snapshot', ?, ?, ?)",
        )
        .bind(scope.tenant.as_str())
        .bind(&scope.actor)
        .bind(format!("stream:{}", snapshot.stream_id))
        .bind(version)
        .bind(scope.trace_id.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    }
    tx.commit().await.map_err(map_err)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn classify(err: sqlx::Error, tenant: &TenantId) -> StoreError {
    if let sqlx::Error::Database(db) = &err {
        let message = db.message();
        if message.contains("FOREIGN KEY constraint failed") {
            return StoreError::UnknownTenant(tenant.clone());
        }
        if message.contains("UNIQUE constraint failed: event_store.event_id") {
            return StoreError::DuplicateEventId;
        }
    }
    map_err(err)
}
