//! The embedded SQLite event store under the same contract as Postgres, plus
//! what is specific to it: durability across reopening, immutability by
//! trigger, and the outbox trigger.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use statefabric_domain::{ExpectedVersion, NewEvent, StreamId, TenantId};
use statefabric_store::sqlite::{SqliteConfig, SqliteEventStore};
use statefabric_store::{AppendRequest, EventStore, Scope};
use statefabric_tests::store_contract::Fixture;

/// Each fixture owns a fresh database file, kept for the test's duration.
struct Sqlite {
    dir: tempfile::TempDir,
    store: tokio::sync::OnceCell<SqliteEventStore>,
}

fn fixture() -> Sqlite {
    Sqlite {
        dir: tempfile::tempdir().expect("temp dir"),
        store: tokio::sync::OnceCell::new(),
    }
}

impl Sqlite {
    fn config(&self) -> SqliteConfig {
        SqliteConfig {
            path: self.dir.path().join("events.db"),
            ..SqliteConfig::default()
        }
    }

    async fn shared(&self) -> &SqliteEventStore {
        self.store
            .get_or_init(|| async { SqliteEventStore::open(self.config()).await.expect("open") })
            .await
    }
}

#[async_trait::async_trait(?Send)]
impl Fixture for Sqlite {
    async fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.shared().await.clone())
    }

    async fn store_with_idempotency_ttl(&self, ttl: Duration) -> Arc<dyn EventStore> {
        let store = SqliteEventStore::open(SqliteConfig {
            idempotency_ttl: ttl,
            ..self.config()
        })
        .await
        .expect("open");
        let _ = self.store.set(store.clone());
        Arc::new(store)
    }

    async fn context_store(&self) -> Arc<dyn statefabric_store::context::ContextStore> {
        Arc::new(self.shared().await.clone())
    }

    async fn tenant(&self) -> TenantId {
        let tenant = TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("id");
        self.shared()
            .await
            .create_tenant(&tenant, "test")
            .await
            .expect("tenant");
        tenant
    }

    async fn idempotency_keys_stored(&self, tenant: &TenantId) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE tenant_id = ?")
            .bind(tenant.as_str())
            .fetch_one(self.shared().await.reader())
            .await
            .expect("count")
    }
}

statefabric_tests::store_contract_tests!(fixture());

#[tokio::test]
async fn events_survive_closing_and_reopening_the_file() -> anyhow::Result<()> {
    let f = fixture();
    let tenant = f.tenant().await;
    let id = StreamId::new("durable")?;
    let scope = Scope::new(tenant.clone(), "test");
    f.shared()
        .await
        .append(
            &scope,
            AppendRequest::new(
                id.clone(),
                "task",
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Created", json!({"n": 1}))],
            ),
        )
        .await?;
    let reopened = SqliteEventStore::open(f.config()).await?;
    let events = reopened.read_stream(&tenant, &id, 1, 10).await?;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data, json!({"n": 1}));
    // Migrations are idempotent: reopening applied nothing twice.
    let again = reopened
        .append(
            &scope,
            AppendRequest::new(
                id.clone(),
                "task",
                ExpectedVersion::Exact(1),
                vec![NewEvent::new("Updated", json!({}))],
            ),
        )
        .await?;
    assert_eq!(again.result.last_version, 2);
    Ok(())
}

#[tokio::test]
async fn events_and_audit_are_immutable_and_every_event_has_its_outbox_row() -> anyhow::Result<()> {
    let f = fixture();
    let tenant = f.tenant().await;
    let store = f.shared().await;
    let scope = Scope::new(tenant.clone(), "test");
    store
        .append(
            &scope,
            AppendRequest::new(
                StreamId::new("s")?,
                "task",
                ExpectedVersion::Any,
                vec![
                    NewEvent::new("A", json!({"x": 1})),
                    NewEvent::new("B", json!({"x": 2})),
                ],
            ),
        )
        .await?;
    let writer =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", f.config().path.display())).await?;
    for sql in [
        "UPDATE event_store SET data = '{}'",
        "DELETE FROM event_store",
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM audit_log",
    ] {
        let err = sqlx::query(sql).execute(&writer).await.expect_err(sql);
        assert!(
            err.to_string().contains("immutable") || err.to_string().contains("append-only"),
            "{err}"
        );
    }
    let outbox: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT aggregatetype, type, payload FROM event_outbox ORDER BY global_position",
    )
    .fetch_all(&writer)
    .await?;
    assert_eq!(outbox.len(), 2);
    assert_eq!((outbox[0].0.as_str(), outbox[0].1.as_str()), ("task", "A"));
    let payload: serde_json::Value = serde_json::from_str(&outbox[1].2)?;
    assert_eq!(payload["data"], json!({"x": 2}));
    assert_eq!(payload["stream_version"], json!(2));
    let audits: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'append'")
        .fetch_one(&writer)
        .await?;
    assert_eq!(audits, 1);
    Ok(())
}

/// Migration 0006 rebuilds `context_revisions` (WITHOUT ROWID) and
/// `audit_log` (no AUTOINCREMENT) of a file written before it: rows and
/// audit ids are kept, new ids still grow past the largest, and the log
/// still refuses updates and deletes.
#[tokio::test]
async fn the_rebuild_of_revisions_and_audit_log_keeps_their_rows() -> anyhow::Result<()> {
    use sqlx::Row;
    let dir = tempfile::tempdir()?;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("old.db"))
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await?;
    let all = &statefabric_db::sqlite::MIGRATOR;
    let before = sqlx::migrate::Migrator {
        migrations: all
            .migrations
            .iter()
            .filter(|m| m.version < 6)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&pool).await?;
    for (tenant, document, revision) in [("t1", "d1", 1), ("t1", "d1", 2), ("t2", "d9", 7)] {
        sqlx::query(
            "INSERT INTO context_revisions (tenant_id, document_id, revision, content)
             VALUES (?, ?, ?, ?)",
        )
        .bind(tenant)
        .bind(document)
        .bind(revision)
        .bind(format!("{{\"r\":{revision}}}"))
        .execute(&pool)
        .await?;
    }
    for id in [3_i64, 41] {
        sqlx::query(
            "INSERT INTO audit_log (audit_id, tenant_id, actor, action, target, details)
             VALUES (?, 't1', 'planner', 'context.put', 'context:d1', '{}')",
        )
        .bind(id)
        .execute(&pool)
        .await?;
    }

    all.run(&pool).await?;
    let revisions: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT tenant_id, document_id, revision, content FROM context_revisions ORDER BY 1, 2, 3",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        revisions,
        [
            ("t1".into(), "d1".into(), 1, "{\"r\":1}".into()),
            ("t1".into(), "d1".into(), 2, "{\"r\":2}".into()),
            ("t2".into(), "d9".into(), 7, "{\"r\":7}".into()),
        ]
    );
    let without_rowid: i64 =
        sqlx::query_scalar("SELECT wr FROM pragma_table_list WHERE name = 'context_revisions'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(without_rowid, 1);
    let next = sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, target) VALUES ('t1', 'coder', 'context.put', 'context:d1')
         RETURNING audit_id",
    )
    .fetch_one(&pool)
    .await?
    .try_get::<i64, _>("audit_id")?;
    assert_eq!(next, 42);
    let ids: Vec<i64> = sqlx::query_scalar("SELECT audit_id FROM audit_log ORDER BY audit_id")
        .fetch_all(&pool)
        .await?;
    assert_eq!(ids, [3, 41, 42]);
    for refused in [
        "UPDATE audit_log SET actor = 'x' WHERE audit_id = 3",
        "DELETE FROM audit_log WHERE audit_id = 42",
    ] {
        let err = sqlx::query(refused)
            .execute(&pool)
            .await
            .expect_err(refused);
        assert!(err.to_string().contains("append-only"), "{refused}: {err}");
    }
    let autoincrement: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_sequence WHERE name = 'audit_log'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(autoincrement, 0);
    Ok(())
}
