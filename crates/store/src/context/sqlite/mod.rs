//! Context documents in the embedded SQLite file. Writes run on the single
//! write connection, which serializes them as Postgres's row lock does, and
//! concurrent writes share one transaction ([`group`]: group commit).

pub(crate) mod group;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use statefabric_domain::TenantId;

use super::{
    ContextDocument, ContextOutcome, ContextStore, ContextWrite, REVISIONS_KEPT, Stored,
    TRIM_EVERY, action, corrupt, decide, decode_stored, now_micros, to_document,
};
use crate::error::{Result, StoreError};
use crate::port::Scope;
use crate::sqlite::write::{claim_key, classify, complete_key};
use crate::sqlite::{SqliteConfig, SqliteEventStore, map_err};

type Row = (
    String,
    String,
    Option<String>,
    String,
    i64,
    bool,
    DateTime<Utc>,
);

macro_rules! select_sql {
    () => {
        "SELECT merge_type, content, crdt_state, version_vector, revision, deleted, updated_at \
         FROM context_documents WHERE tenant_id = ? AND document_id = ?"
    };
}

const SELECT: &str = select_sql!();

fn decode(row: Row) -> Result<(Stored, DateTime<Utc>)> {
    let (merge, content, crdt, vector, revision, deleted, updated_at) = row;
    let json = |what: &str, text: &str| -> Result<Value> {
        serde_json::from_str(text).map_err(|e| corrupt(what, e.to_string()))
    };
    let crdt = crdt.map(|c| json("crdt state", &c)).transpose()?;
    let stored = decode_stored(
        &merge,
        json("content", &content)?,
        crdt,
        json("version vector", &vector)?,
        revision,
        deleted,
    )?;
    Ok((stored, updated_at))
}

#[async_trait]
impl ContextStore for SqliteEventStore {
    async fn get(&self, tenant: &TenantId, id: &str) -> Result<Option<ContextDocument>> {
        super::check_id(id)?;
        self.timed(async {
            let row: Option<Row> = sqlx::query_as(SELECT)
                .bind(tenant.as_str())
                .bind(id)
                .fetch_optional(self.reader())
                .await
                .map_err(map_err)?;
            row.map(decode)
                .transpose()
                .map(|d| d.map(|(stored, at)| to_document(id, stored, at)))
        })
        .await
    }

    async fn content_at(
        &self,
        tenant: &TenantId,
        id: &str,
        revision: u64,
    ) -> Result<Option<Value>> {
        super::check_id(id)?;
        self.timed(async {
            let content: Option<String> = sqlx::query_scalar(
                "SELECT content FROM context_revisions WHERE tenant_id = ? AND document_id = ? AND revision = ?",
            )
            .bind(tenant.as_str())
            .bind(id)
            .bind(i64::try_from(revision).unwrap_or(i64::MAX))
            .fetch_optional(self.reader())
            .await
            .map_err(map_err)?;
            content
                .map(|c| serde_json::from_str(&c))
                .transpose()
                .map_err(|e| StoreError::Backend(sqlx::Error::Decode(format!("stored revision: {e}").into())))
        })
        .await
    }

    async fn write(&self, scope: &Scope, write: ContextWrite) -> Result<ContextOutcome> {
        super::check_write(&write)?;
        self.timed(self.context_writes().submit(scope.clone(), write))
            .await
    }
}

/// What a write turns into once checked, before anything of it is written.
pub(crate) enum Prepared {
    /// An idempotency key matched a completed write: its outcome.
    Replayed(ContextOutcome),
    /// The document as the write leaves it.
    Next(Stored),
}

/// Checks `write` against the stored document inside `tx`: the idempotency
/// key (claimed), the fence (recorded), the version vector and the change
/// ([`decide`]). Only the key and fence steps write, so a write without
/// either that is refused here has written nothing.
pub(crate) async fn prepare(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    config: &SqliteConfig,
    scope: &Scope,
    write: &ContextWrite,
) -> Result<Prepared> {
    if let Some(idempotency) = &write.idempotency
        && let Some(stored) = claim_key(tx, config, &scope.tenant, idempotency).await?
    {
        let document = serde_json::from_value(stored).map_err(|e| {
            StoreError::Backend(sqlx::Error::Decode(
                format!("stored context result: {e}").into(),
            ))
        })?;
        return Ok(Prepared::Replayed(ContextOutcome {
            document,
            replayed: true,
        }));
    }
    if let Some(fence) = &write.fence {
        crate::sqlite::write::check_fence(tx, &scope.tenant, fence).await?;
    }
    Ok(Prepared::Next(
        read_and_decide(tx, SELECT, scope, write).await?,
    ))
}

/// `BEGIN IMMEDIATE` and the document's row in one trip, for a write with
/// neither key nor fence ([`prepare_plain`]).
const BEGIN_AND_SELECT: &str = concat!("BEGIN IMMEDIATE; ", select_sql!());

/// [`prepare`] for a write with neither idempotency key nor fence, on a
/// bare connection: begins the transaction itself, in the same trip as
/// its read. On `Err` the transaction may be open: roll it back.
pub(crate) async fn prepare_plain(
    conn: &mut sqlx::SqliteConnection,
    scope: &Scope,
    write: &ContextWrite,
) -> Result<Stored> {
    debug_assert!(write.idempotency.is_none() && write.fence.is_none());
    read_and_decide(conn, BEGIN_AND_SELECT, scope, write).await
}

async fn read_and_decide(
    conn: &mut sqlx::SqliteConnection,
    select: &'static str,
    scope: &Scope,
    write: &ContextWrite,
) -> Result<Stored> {
    let row: Option<Row> = sqlx::query_as(select)
        .bind(scope.tenant.as_str())
        .bind(&write.id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_err)?;
    let current = row.map(decode).transpose()?.map(|(stored, _)| stored);
    decide(current.as_ref(), write, &scope.actor, now_micros())
}

/// The document row, its revision, the audit row and, on every
/// [`TRIM_EVERY`]th revision (the first parameter of the trim), the trim of
/// old revisions, as one batch of statements: one trip to SQLite's
/// connection thread instead of four. The document is written only if its
/// stored revision is still the one the write was decided on (none for a
/// new one), and each later statement only if the one before it wrote
/// (`changes()`), so a write decided on an out-of-date document writes
/// nothing and returns no row.
macro_rules! apply_sql {
    () => {
        "INSERT INTO context_documents (tenant_id, document_id, merge_type, content, crdt_state, version_vector, revision, deleted, updated_at) \
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
           ON CONFLICT (tenant_id, document_id) DO UPDATE SET \
             content = excluded.content, crdt_state = excluded.crdt_state, version_vector = excluded.version_vector, \
             revision = excluded.revision, deleted = excluded.deleted, updated_at = excluded.updated_at \
           WHERE context_documents.revision = ? \
           RETURNING revision; \
         INSERT INTO context_revisions (tenant_id, document_id, revision, content) \
           SELECT ?, ?, ?, ? WHERE changes() = 1; \
         INSERT INTO audit_log (tenant_id, actor, action, target, version_before, version_after, trace_id, details) \
           SELECT ?, ?, ?, ?, NULLIF(?, 0), ?, ?, ? WHERE changes() = 1; \
         DELETE FROM context_revisions \
           WHERE ? AND changes() = 1 AND tenant_id = ? AND document_id = ? AND revision <= ?"
    };
}

/// How [`apply`] runs in its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Inside the caller's transaction, left open for the caller to commit
    /// (or to add more writes to).
    Open,
    /// Ends the transaction the caller began ([`prepare_plain`]), in the
    /// same trip as the writes.
    Commit,
    /// Begins and ends a transaction of its own in the one trip: a write
    /// decided on the caller's known document, unread.
    Whole,
}

/// Writes the document `prepare` decided on, with its revision, audit row
/// and idempotency record. `None` when the stored document is no longer
/// the one the write was decided on: nothing was written (with
/// [`Finish::Whole`], nothing is open either). An error here may leave
/// part of it written in the transaction, which must then be rolled back.
pub(crate) async fn apply(
    conn: &mut sqlx::SqliteConnection,
    scope: &Scope,
    write: &ContextWrite,
    next: Stored,
    finish: Finish,
) -> Result<Option<ContextOutcome>> {
    debug_assert!(finish == Finish::Open || write.idempotency.is_none());
    let revision = i64::try_from(next.revision).unwrap_or(i64::MAX);
    let content = next.content.to_string();
    // Written as SQLite's strftime('%Y-%m-%dT%H:%M:%fZ') would, and read
    // back as the same instant (milliseconds).
    let now = Utc::now();
    let updated_at = DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
    let updated_text = updated_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let sql = match finish {
        Finish::Open => apply_sql!(),
        Finish::Commit => concat!(apply_sql!(), "; COMMIT"),
        Finish::Whole => concat!("BEGIN IMMEDIATE; ", apply_sql!(), "; COMMIT"),
    };
    let written = sqlx::query(sql)
        .bind(scope.tenant.as_str())
        .bind(&write.id)
        .bind(next.merge.as_str())
        .bind(&content)
        .bind(
            next.crdt
                .as_ref()
                .map(|c| serde_json::to_string(c).unwrap_or_default()),
        )
        .bind(serde_json::to_string(&next.vector).unwrap_or_default())
        .bind(revision)
        .bind(next.deleted)
        .bind(&updated_text)
        .bind(revision - 1)
        .bind(scope.tenant.as_str())
        .bind(&write.id)
        .bind(revision)
        .bind(&content)
        .bind(scope.tenant.as_str())
        .bind(&scope.actor)
        .bind(action(&write.change))
        .bind(format!("context:{}", write.id))
        .bind(revision - 1)
        .bind(revision)
        .bind(scope.trace_id.as_deref())
        .bind(
            json!({
                "merge_type": next.merge.as_str(),
                "version_vector": next.vector,
                "idempotency_key": write.idempotency.as_ref().map(|i| &i.key),
            })
            .to_string(),
        )
        .bind(next.revision.is_multiple_of(TRIM_EVERY))
        .bind(scope.tenant.as_str())
        .bind(&write.id)
        .bind(revision - i64::try_from(REVISIONS_KEPT).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| classify(e, &scope.tenant))?;
    if written.is_empty() {
        return Ok(None);
    }
    let document = to_document(&write.id, next, updated_at);
    if let Some(idempotency) = &write.idempotency {
        complete_key(
            conn,
            &scope.tenant,
            idempotency,
            &serde_json::to_value(&document).unwrap_or_default(),
        )
        .await?;
    }
    Ok(Some(ContextOutcome {
        document,
        replayed: false,
    }))
}
