//! Context documents on Postgres, under the same Row-Level Security as
//! events. A write reads the document, decides with the shared rules, and
//! writes the document, its revision and the audit row in one statement
//! that only writes if the revision read is still the stored one (else it
//! decides again). Without key or fence, in a store acting for one tenant
//! (a sidecar's), that takes two round trips and no transaction; otherwise
//! a transaction holds the document's lock and the idempotency record is
//! written with it. The change is announced after its commit
//! ([`crate::pg::announce`]).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::types::Json;
use statefabric_domain::TenantId;

use super::{
    ContextDocument, ContextOutcome, ContextStore, ContextWrite, REVISIONS_KEPT, Stored,
    TRIM_EVERY, action, decide, decide_on_known, decode_stored, now_micros, to_document,
};
use crate::error::{Result, StoreError};
use crate::pg::idempotency::{claim_key, complete_key};
use crate::pg::{LockFor, PgEventStore, map_err};
use crate::port::Scope;

type Row = (
    String,
    Value,
    Option<Value>,
    Value,
    i64,
    bool,
    DateTime<Utc>,
);

macro_rules! select_document {
    () => {
        "SELECT merge_type, content, crdt_state, version_vector, revision, deleted, updated_at \
         FROM context_documents WHERE tenant_id = $1 AND document_id = $2"
    };
}
const SELECT: &str = select_document!();
const SELECT_FOR_UPDATE: &str = concat!(select_document!(), " FOR UPDATE");

fn decode(row: Row) -> Result<(Stored, DateTime<Utc>)> {
    let (merge, content, crdt, vector, revision, deleted, updated_at) = row;
    let stored = decode_stored(&merge, content, crdt, vector, revision, deleted)?;
    Ok((stored, updated_at))
}

/// Acting for the tenant ($1) and queueing behind the document's ($2) other
/// writers, in the statement that starts the transaction.
pub(crate) const BEGIN_FOR_DOCUMENT: &str = "SELECT set_config('statefabric.tenant', $1, true), \
     pg_advisory_xact_lock(hashtextextended($1 || ' ' || $2, 0))";

/// The document row, its revision (older ones than the last $9 trimmed,
/// on every [`TRIM_EVERY`]th revision only: $15) and the audit row in one
/// statement, one round trip instead of three — if the
/// stored revision is still the one the write was decided on ($7 - 1; none
/// stored yet for revision 1). Otherwise it writes nothing and returns no
/// row: another writer came first, and the write is decided again. The trim
/// sees the table as it was before the statement, so the new revision is
/// never among what it deletes.
const APPLY: &str = "WITH doc AS ( \
       INSERT INTO context_documents (tenant_id, document_id, merge_type, content, crdt_state, version_vector, revision, deleted) \
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
       ON CONFLICT (tenant_id, document_id) DO UPDATE SET \
         content = EXCLUDED.content, crdt_state = EXCLUDED.crdt_state, version_vector = EXCLUDED.version_vector, \
         revision = EXCLUDED.revision, deleted = EXCLUDED.deleted, updated_at = now() \
       WHERE context_documents.revision = $7 - 1 \
       RETURNING updated_at), \
     revision AS ( \
       INSERT INTO context_revisions (tenant_id, document_id, revision, content) SELECT $1, $2, $7, $4 FROM doc), \
     trimmed AS ( \
       DELETE FROM context_revisions WHERE $15 AND tenant_id = $1 AND document_id = $2 \
         AND revision <= $7 - $9 AND EXISTS (SELECT 1 FROM doc)), \
     audited AS ( \
       INSERT INTO audit_log (tenant_id, actor, action, target, version_before, version_after, trace_id, details) \
       SELECT $1, $10, $11, $12, NULLIF($7 - 1, 0), $7, $13, $14 FROM doc) \
     SELECT updated_at FROM doc";

/// Tries a write may take before it is reported as unable to get through
/// (every failed try means another write to the document succeeded).
const MAX_TRIES: usize = 64;

/// Tries without a transaction before falling back to the locked path.
const LOCK_FREE_TRIES: usize = 8;

#[async_trait]
impl ContextStore for PgEventStore {
    async fn get(&self, tenant: &TenantId, id: &str) -> Result<Option<ContextDocument>> {
        super::check_id(id)?;
        self.timed(async {
            let query = sqlx::query_as::<_, Row>(SELECT)
                .bind(tenant.as_str())
                .bind(id);
            let row = if self.acts_for(tenant) {
                // One round trip: the connection already acts for the tenant.
                query.fetch_optional(self.pool()).await.map_err(map_err)?
            } else {
                let mut tx = self.begin_for(tenant).await?;
                let row = query.fetch_optional(&mut *tx).await.map_err(map_err)?;
                tx.commit().await.map_err(map_err)?;
                row
            };
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
            let query = sqlx::query_scalar::<_, Value>(
                "SELECT content FROM context_revisions WHERE tenant_id = $1 AND document_id = $2 AND revision = $3",
            )
            .bind(tenant.as_str())
            .bind(id)
            .bind(i64::try_from(revision).unwrap_or(i64::MAX));
            if self.acts_for(tenant) {
                return query.fetch_optional(self.pool()).await.map_err(map_err);
            }
            let mut tx = self.begin_for(tenant).await?;
            let content = query.fetch_optional(&mut *tx).await.map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            Ok(content)
        })
        .await
    }

    /// A write with neither idempotency key nor fence, by a store acting
    /// for one tenant, takes two round trips and no transaction: read,
    /// decide, and write if the revision is still the one read — one when
    /// the caller knows the document (`known`) and is right. Others (and
    /// a write that keeps losing that race) lock the document in a
    /// transaction; their write is conditional too, so both kinds can run
    /// side by side.
    async fn write(&self, scope: &Scope, write: ContextWrite) -> Result<ContextOutcome> {
        super::check_write(&write)?;
        self.timed(async {
            let lock_free = write.idempotency.is_none()
                && write.fence.is_none()
                && self.acts_for(&scope.tenant);
            for tried in 0..MAX_TRIES {
                let outcome = if lock_free && tried < LOCK_FREE_TRIES {
                    self.write_lock_free(scope, &write, tried == 0).await?
                } else {
                    self.write_locked(scope, &write).await?
                };
                if let Some(outcome) = outcome {
                    return Ok(outcome);
                }
            }
            Err(StoreError::Backend(sqlx::Error::Protocol(format!(
                "context document {} changed under each of {MAX_TRIES} tries to write it",
                write.id
            ))))
        })
        .await
    }
}

impl PgEventStore {
    /// `None` when another write got in between the read and the write.
    /// On its first try it decides on the caller's `known` document, when
    /// given, instead of reading: one round trip.
    async fn write_lock_free(
        &self,
        scope: &Scope,
        write: &ContextWrite,
        first_try: bool,
    ) -> Result<Option<ContextOutcome>> {
        let decided = first_try
            .then(|| decide_on_known(write, &scope.actor))
            .flatten();
        let next = match decided {
            Some(next) => next,
            None => {
                let row: Option<Row> = sqlx::query_as(SELECT)
                    .bind(scope.tenant.as_str())
                    .bind(&write.id)
                    .fetch_optional(self.pool())
                    .await
                    .map_err(map_err)?;
                let current = row.map(decode).transpose()?.map(|(stored, _)| stored);
                decide(current.as_ref(), write, &scope.actor, now_micros())?
            }
        };
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        let Some(updated_at) = apply(&mut conn, scope, write, &next).await? else {
            return Ok(None);
        };
        drop(conn);
        self.announcer()
            .context_changed(scope.tenant.as_str(), &write.id, next.revision)
            .await;
        Ok(Some(ContextOutcome {
            document: to_document(&write.id, next, updated_at),
            replayed: false,
        }))
    }

    /// In a transaction holding the document's lock: the idempotency key,
    /// the fence, the read, the write. `None` when a lock-free writer got in
    /// between (nothing of this try is kept).
    async fn write_locked(
        &self,
        scope: &Scope,
        write: &ContextWrite,
    ) -> Result<Option<ContextOutcome>> {
        let mut tx = self
            .begin_with(&scope.tenant, LockFor::Document(&write.id))
            .await?;
        if let Some(idempotency) = &write.idempotency
            && let Some(stored) =
                claim_key(&mut tx, self.config(), &scope.tenant, idempotency).await?
        {
            tx.rollback().await.map_err(map_err)?;
            let document = serde_json::from_value(stored)
                .map_err(|e| super::corrupt("context result", e.to_string()))?;
            return Ok(Some(ContextOutcome {
                document,
                replayed: true,
            }));
        }
        if let Some(fence) = &write.fence {
            crate::pg::append::check_fence(&mut tx, &scope.tenant, fence).await?;
        }
        let row: Option<Row> = sqlx::query_as(SELECT_FOR_UPDATE)
            .bind(scope.tenant.as_str())
            .bind(&write.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let current = row.map(decode).transpose()?.map(|(stored, _)| stored);
        let next = decide(current.as_ref(), write, &scope.actor, now_micros())?;
        let Some(updated_at) = apply(&mut tx, scope, write, &next).await? else {
            tx.rollback().await.map_err(map_err)?;
            return Ok(None);
        };
        let document = to_document(&write.id, next, updated_at);
        if let Some(idempotency) = &write.idempotency {
            let stored = serde_json::to_value(&document).unwrap_or_default();
            complete_key(&mut tx, &scope.tenant, idempotency, &stored).await?;
        }
        tx.commit().await.map_err(map_err)?;
        self.announcer()
            .context_changed(scope.tenant.as_str(), &write.id, document.revision)
            .await;
        Ok(Some(ContextOutcome {
            document,
            replayed: false,
        }))
    }
}

/// Runs [`APPLY`] for `next`: when it was written, `Some(updated_at)`.
async fn apply(
    conn: &mut sqlx::PgConnection,
    scope: &Scope,
    write: &ContextWrite,
    next: &Stored,
) -> Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(APPLY)
        .bind(scope.tenant.as_str())
        .bind(&write.id)
        .bind(next.merge.as_str())
        .bind(Json(&next.content))
        .bind(next.crdt.as_ref().map(Json))
        .bind(Json(&next.vector))
        .bind(i64::try_from(next.revision).unwrap_or(i64::MAX))
        .bind(next.deleted)
        .bind(i64::try_from(REVISIONS_KEPT).unwrap_or(i64::MAX))
        .bind(&scope.actor)
        .bind(action(&write.change))
        .bind(format!("context:{}", write.id))
        .bind(scope.trace_id.as_deref())
        .bind(Json(json!({
            "merge_type": next.merge.as_str(),
            "version_vector": next.vector,
            "idempotency_key": write.idempotency.as_ref().map(|i| &i.key),
        })))
        .bind(next.revision.is_multiple_of(TRIM_EVERY))
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23503") => {
                StoreError::UnknownTenant(scope.tenant.clone())
            }
            _ => map_err(e),
        })
}
