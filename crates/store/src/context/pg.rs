//! Context documents on Postgres, under the same Row-Level Security as
//! events: a write locks the document row, decides with the shared rules,
//! and writes the document, its revision, the audit row and the idempotency
//! record in one transaction. The trigger announces the change.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::types::Json;
use statefabric_domain::TenantId;

use super::{
    ContextDocument, ContextOutcome, ContextStore, ContextWrite, REVISIONS_KEPT, Stored, action,
    decide, decode_stored, to_document,
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

fn now_micros() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or_default()
}

/// Acting for the tenant ($1) and queueing behind the document's ($2) other
/// writers, in the statement that starts the transaction.
pub(crate) const BEGIN_FOR_DOCUMENT: &str = "SELECT set_config('statefabric.tenant', $1, true), \
     pg_advisory_xact_lock(hashtextextended($1 || ' ' || $2, 0))";

/// The document row, its revision (older ones than the last $9 trimmed) and
/// the audit row in one statement, one round trip instead of three. The
/// trim sees the table as it was before the statement, so the new revision
/// is never among what it deletes.
const APPLY: &str = "WITH doc AS ( \
       INSERT INTO context_documents (tenant_id, document_id, merge_type, content, crdt_state, version_vector, revision, deleted) \
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
       ON CONFLICT (tenant_id, document_id) DO UPDATE SET \
         content = EXCLUDED.content, crdt_state = EXCLUDED.crdt_state, version_vector = EXCLUDED.version_vector, \
         revision = EXCLUDED.revision, deleted = EXCLUDED.deleted, updated_at = now() \
       RETURNING updated_at), \
     revision AS ( \
       INSERT INTO context_revisions (tenant_id, document_id, revision, content) VALUES ($1, $2, $7, $4)), \
     trimmed AS ( \
       DELETE FROM context_revisions WHERE tenant_id = $1 AND document_id = $2 AND revision <= $7 - $9), \
     audited AS ( \
       INSERT INTO audit_log (tenant_id, actor, action, target, version_before, version_after, trace_id, details) \
       VALUES ($1, $10, $11, $12, NULLIF($7 - 1, 0), $7, $13, $14)) \
     SELECT updated_at FROM doc";

#[async_trait]
impl ContextStore for PgEventStore {
    async fn get(&self, tenant: &TenantId, id: &str) -> Result<Option<ContextDocument>> {
        super::check_id(id)?;
        self.timed(async {
            let mut tx = self.begin_for(tenant).await?;
            let row: Option<Row> = sqlx::query_as(SELECT)
                .bind(tenant.as_str())
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
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
            let mut tx = self.begin_for(tenant).await?;
            let content: Option<Value> = sqlx::query_scalar(
                "SELECT content FROM context_revisions WHERE tenant_id = $1 AND document_id = $2 AND revision = $3",
            )
            .bind(tenant.as_str())
            .bind(id)
            .bind(i64::try_from(revision).unwrap_or(i64::MAX))
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            Ok(content)
        })
        .await
    }

    async fn write(&self, scope: &Scope, write: ContextWrite) -> Result<ContextOutcome> {
        super::check_id(&write.id)?;
        self.timed(async {
            let mut tx = self
                .begin_with(&scope.tenant, LockFor::Document(&write.id))
                .await?;
            if let Some(idempotency) = &write.idempotency
                && let Some(stored) =
                    claim_key(&mut tx, self.config(), &scope.tenant, idempotency).await?
            {
                tx.rollback().await.map_err(map_err)?;
                let document = serde_json::from_value(stored).map_err(|e| {
                    StoreError::Backend(sqlx::Error::Decode(
                        format!("stored context result: {e}").into(),
                    ))
                })?;
                return Ok(ContextOutcome {
                    document,
                    replayed: true,
                });
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
            let next = decide(current.as_ref(), &write, &scope.actor, now_micros())?;
            let revision = i64::try_from(next.revision).unwrap_or(i64::MAX);
            let updated_at: DateTime<Utc> = sqlx::query_scalar(APPLY)
                .bind(scope.tenant.as_str())
                .bind(&write.id)
                .bind(next.merge.as_str())
                .bind(Json(&next.content))
                .bind(next.crdt.as_ref().map(Json))
                .bind(Json(&next.vector))
                .bind(revision)
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
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(db) if db.code().as_deref() == Some("23503") => {
                        StoreError::UnknownTenant(scope.tenant.clone())
                    }
                    _ => map_err(e),
                })?;
            let document = to_document(&write.id, next, updated_at);
            if let Some(idempotency) = &write.idempotency {
                let stored = serde_json::to_value(&document).unwrap_or_default();
                complete_key(&mut tx, &scope.tenant, idempotency, &stored).await?;
            }
            tx.commit().await.map_err(map_err)?;
            Ok(ContextOutcome {
                document,
                replayed: false,
            })
        })
        .await
    }
}
