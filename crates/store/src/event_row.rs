//! A stored event's columns, decoded once for both adapters. The adapters
//! read their own representations (Postgres: UUID, `jsonb`, `int4`, the
//! commit's `xid8` as text; SQLite: text and 64-bit integers, no commit id)
//! into [`EventColumns`]; the event is built and its ids checked here.

use chrono::{DateTime, Utc};
use serde_json::Value;
use statefabric_domain::{Checkpoint, EventMetadata, RecordedEvent, StreamId, TenantId};
use uuid::Uuid;

use crate::{InvalidInput, Result};

/// One `event_store` row, each column as the adapter read it.
pub(crate) struct EventColumns {
    pub(crate) id: Uuid,
    pub(crate) tenant: String,
    pub(crate) stream: String,
    pub(crate) stream_type: String,
    pub(crate) event_type: String,
    pub(crate) schema_version: i64,
    pub(crate) data: Value,
    pub(crate) metadata: EventMetadata,
    pub(crate) stream_version: i64,
    pub(crate) global_position: i64,
    /// The committing transaction (Postgres); 0 where the backend orders
    /// by position alone (SQLite).
    pub(crate) commit: u64,
    pub(crate) created_at: DateTime<Utc>,
}

/// The event; ids that do not parse are reported as invalid, not
/// trusted. Stored counts cannot be negative (the schema checks them), so
/// one that is reads as 0.
pub(crate) fn recorded_event(row: EventColumns) -> Result<RecordedEvent> {
    let position = u64::try_from(row.global_position).unwrap_or_default();
    Ok(RecordedEvent {
        id: row.id,
        tenant: TenantId::new(row.tenant).map_err(InvalidInput::from)?,
        stream_id: StreamId::new(row.stream).map_err(InvalidInput::from)?,
        stream_type: row.stream_type,
        event_type: row.event_type,
        schema_version: u32::try_from(row.schema_version).unwrap_or_default(),
        data: row.data,
        metadata: row.metadata,
        stream_version: u64::try_from(row.stream_version).unwrap_or_default(),
        global_position: position,
        checkpoint: Checkpoint {
            commit: row.commit,
            position,
        },
        created_at: row.created_at,
    })
}
