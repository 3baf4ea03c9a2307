//! Writes: append (with idempotency) and snapshots.
//!
//! An append is one statement after the tenant is set and the stream's lock
//! taken (one statement too, see `STREAM_LOCK_CALL`): a data-modifying CTE
//! that advances the stream row under the writer's expectation, inserts the
//! events numbered from it, and writes the audit row. If the expectation
//! fails, the stream CTE yields no row, so nothing else is inserted either;
//! the outbox trigger fires with an empty transition table. One round trip
//! for the common case keeps batched throughput close to raw INSERT speed.

use serde_json::{Value, json};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use statefabric_domain::{ExpectedVersion, Snapshot, StreamId, TenantId};
use std::sync::LazyLock;

use super::idempotency::{claim_key, complete_key};
use super::{PgConfig, map_err};
use crate::error::{Result, StoreError};
use crate::port::{AppendOutcome, AppendRequest, AppendResult, Scope};

// Every stream statement also refuses a stream whose last writer has a
// larger transaction id than this one (migration 0022): appending would put
// the stream's events out of order for the readers in transaction-id order.
// Under the stream's lock (`STREAM_LOCK_CALL`) that happens only to a
// transaction that took its id before the lock.
const STREAM_ANY: &str = "INSERT INTO streams (tenant_id, stream_id, stream_type, version, \
                                               last_transaction_id) \
     VALUES ($1, $2, $3, $4, pg_current_xact_id()) \
     ON CONFLICT (tenant_id, stream_id) DO UPDATE \
       SET version = streams.version + EXCLUDED.version, updated_at = now(), \
           last_transaction_id = EXCLUDED.last_transaction_id \
       WHERE streams.stream_type = EXCLUDED.stream_type \
         AND (streams.last_transaction_id IS NULL \
              OR streams.last_transaction_id <= EXCLUDED.last_transaction_id) \
     RETURNING version";
const STREAM_NEW: &str = "INSERT INTO streams (tenant_id, stream_id, stream_type, version, \
                                               last_transaction_id) \
     VALUES ($1, $2, $3, $4, pg_current_xact_id()) \
     ON CONFLICT (tenant_id, stream_id) DO NOTHING \
     RETURNING version";
const STREAM_EXISTS: &str = "UPDATE streams SET version = version + $4, updated_at = now(), \
       last_transaction_id = pg_current_xact_id() \
     WHERE tenant_id = $1 AND stream_id = $2 AND stream_type = $3 \
       AND (last_transaction_id IS NULL OR last_transaction_id <= pg_current_xact_id()) \
     RETURNING version";
const STREAM_EXACT: &str = "UPDATE streams SET version = version + $4, updated_at = now(), \
       last_transaction_id = pg_current_xact_id() \
     WHERE tenant_id = $1 AND stream_id = $2 AND stream_type = $3 AND version = $9 \
       AND (last_transaction_id IS NULL OR last_transaction_id <= pg_current_xact_id()) \
     RETURNING version";

fn append_sql(stream_statement: &str) -> String {
    format!(
        "WITH s AS ({stream_statement}), \
         ins AS ( \
           INSERT INTO event_store (event_id, tenant_id, stream_id, stream_type, event_type, \
                                    event_schema_version, data, metadata, stream_version) \
           SELECT e.id, $1, $2, $3, e.event_type, e.schema_version, \
                  COALESCE(e.data, 'null'::jsonb), e.metadata, \
                  s.version - $4 + e.ord \
             FROM s, ROWS FROM (jsonb_to_recordset($5) AS (id uuid, event_type text, \
                  schema_version integer, data jsonb, metadata jsonb)) \
                  WITH ORDINALITY AS e(id, event_type, schema_version, data, metadata, ord) \
           RETURNING global_position), \
         audit AS ( \
           INSERT INTO audit_log (tenant_id, actor, action, target, version_before, \
                                  version_after, trace_id, details) \
           SELECT $1, $6, 'append', 'stream:' || $2, NULLIF(s.version - $4, 0), s.version, $7, $8 \
             FROM s) \
         SELECT s.version, (SELECT min(global_position) FROM ins), \
                (SELECT max(global_position) FROM ins) \
           FROM s"
    )
}

/// Serializes an append with every other append to its stream, until
/// commit. An advisory lock, because it is taken without giving the
/// transaction an id: a transaction then takes its id (at its first write)
/// only after the stream's last writer committed, so a stream's writers
/// have increasing transaction ids — the order the commit-ordered feed and
/// the outbox relay read in. A transaction that wrote before (`append_in`
/// after other writes) already has its id; the stream statement's check
/// catches it if it was overtaken (migration 0022).
const STREAM_LOCK_CALL: &str =
    "pg_advisory_xact_lock(hashtextextended('stream ' || $1 || ' ' || $2, 0))";

/// The first statement of an append's own transaction: its tenant and its
/// stream's lock, in one round trip.
pub(super) static BEGIN_FOR_STREAM: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT set_config('statefabric.tenant', $1, true), {STREAM_LOCK_CALL}")
});
static LOCK_STREAM_SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {STREAM_LOCK_CALL}"));

/// Takes `stream`'s lock in a transaction that is already under way.
pub(super) async fn lock_stream(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantId,
    stream: &StreamId,
) -> Result<()> {
    sqlx::query(LOCK_STREAM_SQL.as_str())
        .bind(tenant.as_str())
        .bind(stream.as_str())
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

static SQL_ANY: LazyLock<String> = LazyLock::new(|| append_sql(STREAM_ANY));
static SQL_NEW: LazyLock<String> = LazyLock::new(|| append_sql(STREAM_NEW));
static SQL_EXISTS: LazyLock<String> = LazyLock::new(|| append_sql(STREAM_EXISTS));
static SQL_EXACT: LazyLock<String> = LazyLock::new(|| append_sql(STREAM_EXACT));

pub(super) async fn append(
    tx: &mut Transaction<'static, Postgres>,
    config: &PgConfig,
    scope: &Scope,
    request: &AppendRequest,
) -> Result<AppendOutcome> {
    if let Some(idempotency) = &request.idempotency
        && let Some(stored) = claim_key(tx, config, &scope.tenant, idempotency).await?
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
        check_fence(tx, &scope.tenant, fence).await?;
    }
    let count = i64::try_from(request.events.len()).unwrap_or(i64::MAX);
    let batch: Vec<Value> = request
        .events
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "event_type": e.event_type,
                "schema_version": e.schema_version,
                "data": e.data,
                "metadata": e.metadata,
            })
        })
        .collect();
    let details = json!({
        "events": count,
        "first_event_id": request.events.first().map(|e| e.id),
        "idempotency_key": request.idempotency.as_ref().map(|i| &i.key),
    });
    let sql: &str = match request.expected {
        ExpectedVersion::Any => &SQL_ANY,
        ExpectedVersion::NoStream => &SQL_NEW,
        ExpectedVersion::StreamExists => &SQL_EXISTS,
        ExpectedVersion::Exact(_) => &SQL_EXACT,
    };
    let mut query = sqlx::query_as::<_, (i64, Option<i64>, Option<i64>)>(sql)
        .bind(scope.tenant.as_str())
        .bind(request.stream_id.as_str())
        .bind(&request.stream_type)
        .bind(count)
        .bind(Json(batch))
        .bind(&scope.actor)
        .bind(scope.trace_id.as_deref())
        .bind(Json(details));
    if let ExpectedVersion::Exact(v) = request.expected {
        query = query.bind(i64::try_from(v).unwrap_or(i64::MAX));
    }
    let row = query
        .fetch_optional(&mut **tx)
        .await
        .map_err(|e| classify_append_error(e, &scope.tenant))?;

    let Some((version, Some(first_position), Some(last_position))) = row else {
        return Err(diagnose(tx, scope, request).await);
    };
    let last_version = to_u64(version);
    let result = AppendResult {
        first_version: last_version + 1 - request.events.len() as u64,
        last_version,
        first_position: to_u64(first_position),
        last_position: to_u64(last_position),
    };
    if let Some(idempotency) = &request.idempotency {
        let stored = serde_json::to_value(&result).unwrap_or_default();
        complete_key(tx, &scope.tenant, idempotency, &stored).await?;
    }
    Ok(AppendOutcome {
        result,
        replayed: false,
    })
}

/// Advances the lock's fence to `fence.token`, or refuses a stale token. The
/// fence row's lock serializes concurrent fenced writers of one lock.
pub(crate) async fn check_fence(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantId,
    fence: &crate::port::Fence,
) -> Result<()> {
    let token = i64::try_from(fence.token).unwrap_or(i64::MAX);
    let advanced: Option<i64> = sqlx::query_scalar(
        "INSERT INTO fences (tenant_id, lock_name, token) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant_id, lock_name) DO UPDATE SET token = EXCLUDED.token \
           WHERE fences.token <= EXCLUDED.token \
         RETURNING token",
    )
    .bind(tenant.as_str())
    .bind(&fence.lock)
    .bind(token)
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    if advanced.is_some() {
        return Ok(());
    }
    let current: i64 =
        sqlx::query_scalar("SELECT token FROM fences WHERE tenant_id = $1 AND lock_name = $2")
            .bind(tenant.as_str())
            .bind(&fence.lock)
            .fetch_one(&mut **tx)
            .await
            .map_err(map_err)?;
    Err(StoreError::StaleFence {
        lock: fence.lock.clone(),
        token: fence.token,
        current: to_u64(current),
    })
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

fn classify_append_error(err: sqlx::Error, tenant: &TenantId) -> StoreError {
    if let sqlx::Error::Database(db) = &err {
        match (db.code().as_deref(), db.constraint()) {
            (Some("23503"), _) => return StoreError::UnknownTenant(tenant.clone()),
            (Some("23505"), Some("event_store_event_id_key")) => {
                return StoreError::DuplicateEventId;
            }
            _ => {}
        }
    }
    map_err(err)
}

/// The stream statement matched nothing: say why.
async fn diagnose(
    tx: &mut Transaction<'static, Postgres>,
    scope: &Scope,
    request: &AppendRequest,
) -> StoreError {
    // `overtaken`: the stream's last writer has a larger transaction id
    // than this transaction (one without an id has written nothing, so it
    // cannot have been overtaken).
    let current: std::result::Result<Option<(i64, String, bool)>, _> = sqlx::query_as(
        "SELECT version, stream_type, \
                coalesce(last_transaction_id > pg_current_xact_id_if_assigned(), false) \
           FROM streams WHERE tenant_id = $1 AND stream_id = $2",
    )
    .bind(scope.tenant.as_str())
    .bind(request.stream_id.as_str())
    .fetch_optional(&mut **tx)
    .await;
    match current {
        Ok(Some((_, actual, _))) if actual != request.stream_type => {
            StoreError::StreamTypeMismatch {
                stream: request.stream_id.clone(),
                actual,
                requested: request.stream_type.clone(),
            }
        }
        // A stale expectation would fail again in a new transaction: that
        // is the answer then.
        Ok(Some((version, _, true)))
            if match request.expected {
                ExpectedVersion::Exact(expected) => to_u64(version) == expected,
                ExpectedVersion::NoStream => false,
                ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
            } =>
        {
            StoreError::WriteOrder {
                stream: request.stream_id.clone(),
            }
        }
        Ok(current) => StoreError::Concurrency {
            stream: request.stream_id.clone(),
            expected: request.expected,
            actual: current.map(|(v, _, _)| to_u64(v)),
        },
        Err(err) => map_err(err),
    }
}

pub(super) async fn save_snapshot(
    tx: &mut Transaction<'static, Postgres>,
    scope: &Scope,
    snapshot: &Snapshot,
) -> Result<()> {
    let version = i64::try_from(snapshot.version).unwrap_or(i64::MAX);
    let row: Option<(i64, String)> = sqlx::query_as(
        "WITH s AS (SELECT version, stream_type FROM streams WHERE tenant_id = $1 AND stream_id = $2), \
         up AS ( \
           INSERT INTO snapshots (tenant_id, stream_id, stream_type, stream_version, state, state_schema_version) \
           SELECT $1, $2, $3, $4, $5, $6 FROM s WHERE s.version >= $4 AND s.stream_type = $3 \
           ON CONFLICT (tenant_id, stream_id) DO UPDATE \
             SET stream_version = EXCLUDED.stream_version, state = EXCLUDED.state, \
                 state_schema_version = EXCLUDED.state_schema_version, created_at = now() \
             WHERE snapshots.stream_version < EXCLUDED.stream_version \
           RETURNING stream_version), \
         audit AS ( \
           INSERT INTO audit_log (tenant_id, actor, action, target, version_after, trace_id) \
           SELECT $1, $7, 'snapshot', 'stream:' || $2, up.stream_version, $8 FROM up) \
         SELECT version, stream_type FROM s",
    )
    .bind(scope.tenant.as_str())
    .bind(snapshot.stream_id.as_str())
    .bind(&snapshot.stream_type)
    .bind(version)
    .bind(Json(&snapshot.state))
    .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
    .bind(&scope.actor)
    .bind(scope.trace_id.as_deref())
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    match row {
        None => Err(StoreError::StreamNotFound(snapshot.stream_id.clone())),
        Some((_, actual)) if actual != snapshot.stream_type => {
            Err(StoreError::StreamTypeMismatch {
                stream: snapshot.stream_id.clone(),
                actual,
                requested: snapshot.stream_type.clone(),
            })
        }
        Some((stream_version, _)) if stream_version < version => Err(StoreError::SnapshotAhead {
            stream: snapshot.stream_id.clone(),
            snapshot: snapshot.version,
            stream_version: to_u64(stream_version),
        }),
        Some(_) => Ok(()),
    }
}
