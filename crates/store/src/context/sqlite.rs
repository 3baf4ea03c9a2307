//! Context documents in the embedded SQLite file. Writes run on the single
//! write connection, which serializes them as Postgres's row lock does.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use statefabric_domain::{CrdtState, MergeType, TenantId, VectorClock};

use super::{
    ContextDocument, ContextOutcome, ContextStore, ContextWrite, REVISIONS_KEPT, Stored, action,
    decide, to_document,
};
use crate::error::{Result, StoreError};
use crate::port::Scope;
use crate::sqlite::write::{claim_key, classify, complete_key};
use crate::sqlite::{SqliteEventStore, map_err};

type Row = (
    String,
    String,
    Option<String>,
    String,
    i64,
    bool,
    DateTime<Utc>,
);

const SELECT: &str = "SELECT merge_type, content, crdt_state, version_vector, revision, deleted, updated_at \
     FROM context_documents WHERE tenant_id = ? AND document_id = ?";

fn decode(row: Row) -> Result<(Stored, DateTime<Utc>)> {
    let (merge, content, crdt, vector, revision, deleted, updated_at) = row;
    let corrupt = |what: &str, e: String| {
        StoreError::Backend(sqlx::Error::Decode(format!("stored {what}: {e}").into()))
    };
    let merge = MergeType::parse(&merge).ok_or_else(|| corrupt("merge type", merge.clone()))?;
    let crdt: Option<CrdtState> = crdt
        .map(|c| serde_json::from_str(&c))
        .transpose()
        .map_err(|e| corrupt("crdt state", e.to_string()))?;
    let vector: VectorClock =
        serde_json::from_str(&vector).map_err(|e| corrupt("version vector", e.to_string()))?;
    let content: Value =
        serde_json::from_str(&content).map_err(|e| corrupt("content", e.to_string()))?;
    Ok((
        Stored {
            merge,
            content,
            crdt,
            vector,
            revision: u64::try_from(revision).unwrap_or_default(),
            deleted,
        },
        updated_at,
    ))
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
        super::check_id(&write.id)?;
        self.timed(async {
            let mut tx = self.writer().begin().await.map_err(map_err)?;
            let result = write_in(self, &mut tx, scope, &write).await;
            match &result {
                Ok(outcome) if !outcome.replayed => tx.commit().await.map_err(map_err)?,
                _ => tx.rollback().await.map_err(map_err)?,
            }
            result
        })
        .await
    }
}

async fn write_in(
    store: &SqliteEventStore,
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    scope: &Scope,
    write: &ContextWrite,
) -> Result<ContextOutcome> {
    if let Some(idempotency) = &write.idempotency
        && let Some(stored) = claim_key(tx, store.config(), &scope.tenant, idempotency).await?
    {
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
        crate::sqlite::write::check_fence(tx, &scope.tenant, fence).await?;
    }
    let row: Option<Row> = sqlx::query_as(SELECT)
        .bind(scope.tenant.as_str())
        .bind(&write.id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    let current = row.map(decode).transpose()?.map(|(stored, _)| stored);
    let now = u64::try_from(Utc::now().timestamp_micros()).unwrap_or_default();
    let next = decide(current.as_ref(), write, &scope.actor, now)?;
    let revision = i64::try_from(next.revision).unwrap_or(i64::MAX);
    let content = next.content.to_string();
    let updated_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO context_documents (tenant_id, document_id, merge_type, content, crdt_state, version_vector, revision, deleted) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (tenant_id, document_id) DO UPDATE SET \
           content = excluded.content, crdt_state = excluded.crdt_state, version_vector = excluded.version_vector, \
           revision = excluded.revision, deleted = excluded.deleted, \
           updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         RETURNING updated_at",
    )
    .bind(scope.tenant.as_str())
    .bind(&write.id)
    .bind(next.merge.as_str())
    .bind(&content)
    .bind(next.crdt.as_ref().map(|c| serde_json::to_string(c).unwrap_or_default()))
    .bind(serde_json::to_string(&next.vector).unwrap_or_default())
    .bind(revision)
    .bind(next.deleted)
    .fetch_one(&mut **tx)
    .await
    .map_err(|e| classify(e, &scope.tenant))?;
    sqlx::query("INSERT INTO context_revisions (tenant_id, document_id, revision, content) VALUES (?, ?, ?, ?)")
        .bind(scope.tenant.as_str())
        .bind(&write.id)
        .bind(revision)
        .bind(&content)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    sqlx::query(
        "DELETE FROM context_revisions WHERE tenant_id = ? AND document_id = ? AND revision <= ?",
    )
    .bind(scope.tenant.as_str())
    .bind(&write.id)
    .bind(revision - i64::try_from(REVISIONS_KEPT).unwrap_or(i64::MAX))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, target, version_before, version_after, trace_id, details) \
         VALUES (?, ?, ?, ?, NULLIF(?, 0), ?, ?, ?)",
    )
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
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    let document = to_document(&write.id, next, updated_at);
    if let Some(idempotency) = &write.idempotency {
        complete_key(
            tx,
            &scope.tenant,
            idempotency,
            &serde_json::to_value(&document).unwrap_or_default(),
        )
        .await?;
    }
    Ok(ContextOutcome {
        document,
        replayed: false,
    })
}
