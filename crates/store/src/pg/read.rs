//! Reads, each in a short transaction that sets the tenant first so Row-Level
//! Security applies.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use statefabric_domain::{Checkpoint, EventMetadata, RecordedEvent, Snapshot, StreamId, TenantId};
use uuid::Uuid;

use super::{PgEventStore, map_err};
use crate::error::{InvalidInput, Result};
use crate::event_row::{EventColumns, recorded_event};
use crate::port::StreamInfo;

const COLUMNS: &str = "event_id, tenant_id, stream_id, stream_type, event_type, \
    event_schema_version, data, metadata, stream_version, global_position, \
    transaction_id::text AS commit_id, created_at";

#[derive(sqlx::FromRow)]
struct EventRow {
    event_id: Uuid,
    tenant_id: String,
    stream_id: String,
    stream_type: String,
    event_type: String,
    event_schema_version: i32,
    data: serde_json::Value,
    metadata: Json<EventMetadata>,
    stream_version: i64,
    global_position: i64,
    /// xid8 as text (sqlx has no xid8 type). Aliased: an output column named
    /// `transaction_id` would make `ORDER BY transaction_id` sort the text.
    commit_id: String,
    created_at: DateTime<Utc>,
}

impl EventRow {
    fn into_event(self) -> Result<RecordedEvent> {
        let commit = self.commit_id.parse::<u64>().map_err(|e| {
            crate::context::corrupt("transaction_id", format!("{}: {e}", self.commit_id))
        })?;
        recorded_event(EventColumns {
            id: self.event_id,
            tenant: self.tenant_id,
            stream: self.stream_id,
            stream_type: self.stream_type,
            event_type: self.event_type,
            schema_version: i64::from(self.event_schema_version),
            data: self.data,
            metadata: self.metadata.0,
            stream_version: self.stream_version,
            global_position: self.global_position,
            commit,
            created_at: self.created_at,
        })
    }
}

pub(super) fn check_from(what: &'static str, value: u64) -> Result<()> {
    if value == 0 {
        return Err(InvalidInput::Zero { what }.into());
    }
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

async fn fetch_events(
    store: &PgEventStore,
    tenant: &TenantId,
    query: sqlx::query::QueryAs<'_, sqlx::Postgres, EventRow, sqlx::postgres::PgArguments>,
) -> Result<Vec<RecordedEvent>> {
    let mut tx = store.begin_for(tenant).await?;
    let rows = query.fetch_all(&mut *tx).await.map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    rows.into_iter().map(EventRow::into_event).collect()
}

static READ_STREAM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS} FROM event_store \
         WHERE tenant_id = $1 AND stream_id = $2 AND stream_version >= $3 \
         ORDER BY stream_version LIMIT $4"
    )
});

pub(super) async fn read_stream(
    store: &PgEventStore,
    tenant: &TenantId,
    stream: &StreamId,
    from_version: u64,
    limit: u32,
) -> Result<Vec<RecordedEvent>> {
    let query = sqlx::query_as(READ_STREAM.as_str())
        .bind(tenant.as_str())
        .bind(stream.as_str())
        .bind(to_i64(from_version))
        .bind(i64::from(limit));
    fetch_events(store, tenant, query).await
}

static READ_ALL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS} FROM event_store \
         WHERE tenant_id = $1 AND global_position >= $2 \
         ORDER BY global_position LIMIT $3"
    )
});

pub(super) async fn read_all(
    store: &PgEventStore,
    tenant: &TenantId,
    from_position: u64,
    limit: u32,
) -> Result<Vec<RecordedEvent>> {
    let query = sqlx::query_as(READ_ALL.as_str())
        .bind(tenant.as_str())
        .bind(to_i64(from_position))
        .bind(i64::from(limit));
    fetch_events(store, tenant, query).await
}

static READ_FEED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS} FROM event_store \
         WHERE tenant_id = $1 \
           AND (transaction_id, global_position) > ($2::text::xid8, $3) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY event_store.transaction_id, event_store.global_position LIMIT $4"
    )
});

/// The commit-ordered feed. Sequence values are taken at insert time, so a
/// transaction that commits late can hold a lower global position than one
/// already read. Ordering by (writing transaction id, position) and stopping
/// below the oldest transaction still running (`pg_snapshot_xmin`) means that
/// everything at or before the returned checkpoint is final: any transaction
/// that commits later has a larger transaction id, so it sorts after it.
pub(super) async fn read_feed(
    store: &PgEventStore,
    tenant: &TenantId,
    after: Checkpoint,
    limit: u32,
) -> Result<Vec<RecordedEvent>> {
    let query = sqlx::query_as(READ_FEED.as_str())
        .bind(tenant.as_str())
        .bind(after.commit.to_string())
        .bind(to_i64(after.position))
        .bind(i64::from(limit));
    fetch_events(store, tenant, query).await
}

pub(super) async fn stream_info(
    store: &PgEventStore,
    tenant: &TenantId,
    stream: &StreamId,
) -> Result<Option<StreamInfo>> {
    let mut tx = store.begin_for(tenant).await?;
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT version, stream_type FROM streams WHERE tenant_id = $1 AND stream_id = $2",
    )
    .bind(tenant.as_str())
    .bind(stream.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    Ok(row.map(|(version, stream_type)| StreamInfo {
        version: u64::try_from(version).unwrap_or_default(),
        stream_type,
    }))
}

pub(super) async fn load_snapshot(
    store: &PgEventStore,
    tenant: &TenantId,
    stream: &StreamId,
) -> Result<Option<Snapshot>> {
    let mut tx = store.begin_for(tenant).await?;
    let row: Option<(String, i64, serde_json::Value, i32)> = sqlx::query_as(
        "SELECT stream_type, stream_version, state, state_schema_version FROM snapshots \
         WHERE tenant_id = $1 AND stream_id = $2",
    )
    .bind(tenant.as_str())
    .bind(stream.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    Ok(row.map(|(stream_type, version, state, schema)| Snapshot {
        stream_id: stream.clone(),
        stream_type,
        version: u64::try_from(version).unwrap_or_default(),
        state,
        schema_version: u32::try_from(schema).unwrap_or_default(),
    }))
}
