//! The saga rows, decoded once for both adapters. Their columns differ only
//! in representation — Postgres has `timestamptz`, `jsonb` and `int4`
//! columns, SQLite epoch milliseconds, JSON text and 64-bit integers — so
//! each adapter says how it reads a column of each kind ([`Columns`], next
//! to its row type) and every row type is built here, field by field.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::{
    DueTimer, HistoryEntry, InboxItem, Result, StoreError, Stored, Summary, TaskRow, TaskStatus,
    parse_status, parse_timer_kind,
};

/// How one backend reads a column of each kind from its row type.
pub(crate) trait Columns {
    fn text(&self, column: &str) -> Result<String>;
    fn opt_text(&self, column: &str) -> Result<Option<String>>;
    /// Any integer column (Postgres' `int4` or `int8`).
    fn int(&self, column: &str) -> Result<i64>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>>;
    fn flag(&self, column: &str) -> Result<bool>;
    /// A JSON column, straight into `T` (no intermediate `Value` where the
    /// backend hands over text).
    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T>;
    fn opt_json<T: DeserializeOwned>(&self, column: &str) -> Result<Option<T>>;
    fn time(&self, column: &str) -> Result<DateTime<Utc>>;
    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>>;
}

/// A JSON column that does not parse as what it holds.
pub(crate) fn bad_json(column: &str, e: serde_json::Error) -> StoreError {
    StoreError::Backend(format!("stored {column}: {e}"))
}

/// An id column, parsed: the store only ever wrote valid ones.
fn id<T: std::str::FromStr>(row: &impl Columns, column: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let text = row.text(column)?;
    text.parse()
        .map_err(|e| StoreError::Backend(format!("stored {column} {text:?}: {e}")))
}

/// A stored count that cannot be negative or past `u32` reads as 0: the
/// schema's checks keep it in range.
fn count(value: i64) -> u32 {
    u32::try_from(value).unwrap_or_default()
}

pub(crate) fn stored(row: &impl Columns) -> Result<Stored> {
    Ok(Stored {
        tenant: id(row, "tenant_id")?,
        instance: row.json("state")?,
        revision: row.int("revision")?,
        started_at: row.time("started_at")?,
        updated_at: row.time("updated_at")?,
        progressed_at: row.time("progressed_at")?,
        ended_at: row.opt_time("ended_at")?,
    })
}

pub(crate) fn task_row(row: &impl Columns) -> Result<TaskRow> {
    Ok(TaskRow {
        key: row.text("task_key")?,
        saga_id: id(row, "saga_id")?,
        tenant: id(row, "tenant_id")?,
        step: row.text("step")?,
        visit: count(row.int("visit")?),
        attempt: count(row.int("attempt")?),
        compensation: row.flag("compensation")?,
        agent: row.text("agent")?,
        action: row.text("action")?,
        input: row.json("input")?,
        timeout_ms: row.int("timeout_ms")?,
        status: TaskStatus::parse(&row.text("status")?),
        claimed_by: row.opt_text("claimed_by")?,
        dispatched_at: row.time("dispatched_at")?,
        finished_at: row.opt_time("finished_at")?,
        output: row.opt_json("output")?,
        error: row.opt_text("error")?,
        // The saga's; only a claim hands it on, and sets it (each adapter
        // reads it its own way).
        traceparent: None,
    })
}

pub(crate) fn summary(row: &impl Columns) -> Result<Summary> {
    Ok(Summary {
        saga_id: id(row, "saga_id")?,
        tenant: id(row, "tenant_id")?,
        definition: row.text("definition")?,
        version: count(row.int("version")?),
        status: parse_status(&row.text("status")?)?,
        paused: row.flag("paused")?,
        started_at: row.time("started_at")?,
        progressed_at: row.time("progressed_at")?,
        ended_at: row.opt_time("ended_at")?,
    })
}

pub(crate) fn history_entry(row: &impl Columns) -> Result<HistoryEntry> {
    Ok(HistoryEntry {
        revision: row.int("revision")?,
        at: row.time("at")?,
        kind: row.text("kind")?,
        actor: row.opt_text("actor")?,
        epoch: row.opt_int("epoch")?,
        detail: row.json("detail")?,
    })
}

pub(crate) fn inbox_item(row: &impl Columns) -> Result<InboxItem> {
    Ok(InboxItem {
        id: row.int("inbox_id")?,
        tenant: id(row, "tenant_id")?,
        saga_id: id(row, "saga_id")?,
        message: row.json("body")?,
        sender: row.text("sender")?,
    })
}

pub(crate) fn due_timer(row: &impl Columns) -> Result<DueTimer> {
    Ok(DueTimer {
        saga_id: id(row, "saga_id")?,
        key: row.text("task_key")?,
        kind: parse_timer_kind(&row.text("kind")?),
    })
}
