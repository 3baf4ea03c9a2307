//! The saga store contract (`statefabric_tests::saga_contract`) on the
//! embedded SQLite file and on the real Postgres (engine login with
//! `statefabric_saga_engine_role`, agents' side as the application role
//! under Row-Level Security, writes fenced by a real leader lease).

use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_leader::Elector;
use statefabric_leader::pg::PgElector;
use statefabric_saga_store::pg::{PgSagaStore, PgTaskQueue};
use statefabric_saga_store::sqlite::SqliteSagaStore;
use statefabric_saga_store::{Claim, Fence, Reply};
use statefabric_store::sqlite::{SqliteConfig, SqliteEventStore};
use statefabric_tests as env;
use statefabric_tests::saga_contract::Fixture;

async fn sqlite() -> anyhow::Result<Fixture> {
    // The file outlives the test's handle on the directory.
    let dir = tempfile::tempdir()?.keep();
    // The event store too: the saga store writes operators' audit rows
    // into its audit log, which the contract reads back.
    let events = SqliteEventStore::open(SqliteConfig {
        path: dir.join("events.db"),
        ..SqliteConfig::default()
    })
    .await?;
    let store = SqliteSagaStore::new(events.writer_pool().clone(), events.reader().clone());
    Ok(Fixture {
        store: Arc::new(store.clone()),
        queue: Arc::new(store),
        tenant: "t-embedded".into(),
        fence: None,
        audit: Arc::new(events),
    })
}

async fn postgres() -> anyhow::Result<Fixture> {
    let admin = env::pg_admin_url();
    statefabric_db::pg::migrate(&admin).await?;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    statefabric_db::pg::create_tenant(&admin, &TenantId::new(tenant.clone())?, "").await?;
    let store = PgSagaStore::connect(&env::pg_control_url(), 4).await?;
    let queue = PgTaskQueue::connect(&env::pg_app_url(), &tenant, 2).await?;
    // Waiting workers are woken by NOTIFY, as in a sidecar (the listener
    // ends with the test's runtime).
    tokio::spawn(queue.listen(tokio_util::sync::CancellationToken::new()));
    let lease = format!("saga-contract-{}", uuid::Uuid::new_v4().simple());
    let elector = PgElector::new(store.pool().clone(), &lease, "contract");
    let epoch = elector
        .acquire(Duration::from_secs(120))
        .await?
        .ok_or_else(|| anyhow::anyhow!("a fresh lease is free"))?;
    let audit = statefabric_store::pg::PgEventStore::connect(statefabric_store::pg::PgConfig {
        url: env::pg_app_url(),
        ..statefabric_store::pg::PgConfig::default()
    })
    .await?;
    Ok(Fixture {
        store: Arc::new(store),
        queue: Arc::new(queue),
        tenant,
        fence: Some(Fence { lease, epoch }),
        audit: Arc::new(audit),
    })
}

mod embedded {
    statefabric_tests::saga_contract_tests!(super::sqlite());
}

mod on_postgres {
    statefabric_tests::saga_contract_tests!(super::postgres());
}

/// A stale epoch is refused by the database, and nothing is written.
#[tokio::test]
async fn a_stale_epoch_writes_nothing() -> anyhow::Result<()> {
    let mut f = postgres().await?;
    let fence = f.fence.clone().expect("fenced");
    f.fence = Some(Fence {
        epoch: fence.epoch + 1,
        ..fence
    });
    let def = statefabric_saga::builtin::plan_code_critique();
    f.store.save_definition(&def).await?;
    let id = statefabric_saga::SagaId::new(format!("saga-{}", uuid::Uuid::new_v4().simple()))?;
    let (instance, effects) =
        statefabric_saga::Instance::start(&def, id.clone(), serde_json::json!({}));
    let t = statefabric_tests::saga_contract::transition(
        &f.tenant_id(),
        instance,
        None,
        statefabric_saga_store::Trigger::Direct,
        &effects,
    );
    match f.store.commit(f.fence.as_ref(), t.clone()).await {
        Err(statefabric_saga_store::StoreError::Fenced(m)) => {
            assert!(m.contains("stale leader epoch"), "{m}")
        }
        other => anyhow::bail!("expected a fence error, got {other:?}"),
    }
    match f.store.commit_many(f.fence.as_ref(), vec![t]).await {
        Err(statefabric_saga_store::StoreError::Fenced(m)) => {
            assert!(m.contains("stale leader epoch"), "{m}")
        }
        other => anyhow::bail!("expected a fence error for the batch, got {other:?}"),
    }
    assert!(f.store.load(&id).await?.is_none());
    Ok(())
}

/// The agents' side sees only its tenant's tasks.
#[tokio::test]
async fn a_sidecar_sees_only_its_tenant() -> anyhow::Result<()> {
    let f = postgres().await?;
    let other = postgres().await?;
    let def = statefabric_saga::builtin::plan_code_critique();
    f.store.save_definition(&def).await?;
    let id = statefabric_saga::SagaId::new(format!("saga-{}", uuid::Uuid::new_v4().simple()))?;
    let (instance, effects) =
        statefabric_saga::Instance::start(&def, id.clone(), serde_json::json!({}));
    let t = statefabric_tests::saga_contract::transition(
        &f.tenant_id(),
        instance,
        None,
        statefabric_saga_store::Trigger::Direct,
        &effects,
    );
    f.store.commit(f.fence.as_ref(), t).await?;
    let key = format!("{id}/PLAN/1/1");
    assert!(
        other
            .queue
            .claim(
                &f.tenant_id(),
                Claim {
                    agent: "planner",
                    worker: "x",
                    max: 10
                }
            )
            .await
            .is_err(),
        "a queue refuses another tenant's name"
    );
    assert!(
        other
            .queue
            .heartbeat(&other.tenant_id(), &key)
            .await?
            .is_none(),
        "invisible"
    );
    let reply = statefabric_saga_store::InboxMessage::Completed {
        key: key.clone(),
        output: serde_json::json!(1),
    };
    assert_eq!(
        other
            .queue
            .reply(
                &other.tenant_id(),
                Reply {
                    sender: "x",
                    saga_id: &id,
                    message: reply
                }
            )
            .await?,
        statefabric_saga_store::Replied::Unknown
    );
    let claim = Claim {
        agent: "planner",
        worker: "x",
        max: 10,
    };
    assert_eq!(f.queue.claim(&f.tenant_id(), claim).await?.len(), 1);
    Ok(())
}

/// The engine's login writes operators' audit rows for any tenant, and
/// nothing else into the audit log: no other kind of row, no row to read
/// (row-level security), no row to remove.
#[tokio::test]
async fn the_engine_may_only_append_operator_rows_to_the_audit_log() -> anyhow::Result<()> {
    let f = postgres().await?;
    let engine = sqlx::PgPool::connect(&env::pg_control_url()).await?;
    let insert = |action: &'static str| {
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, actor, action, target) VALUES ($1, 'x', $2, 's')",
        )
        .bind(f.tenant.clone())
        .bind(action)
    };
    insert("saga.operator.pause").execute(&engine).await?;
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE tenant_id = $1")
        .bind(&f.tenant)
        .fetch_one(&engine)
        .await?;
    assert_eq!(seen, 0, "the row it wrote is not visible to it");
    for refused in [
        insert("lock.acquire").execute(&engine).await.err(),
        sqlx::query("DELETE FROM audit_log WHERE tenant_id = $1")
            .bind(&f.tenant)
            .execute(&engine)
            .await
            .err(),
    ] {
        let err = refused.ok_or_else(|| anyhow::anyhow!("allowed"))?;
        let text = err.to_string();
        assert!(
            text.contains("row-level security") || text.contains("permission denied"),
            "{text}"
        );
    }
    Ok(())
}
