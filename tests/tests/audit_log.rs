//! The audit log of mutations outside the event store
//! (`statefabric_store::audit::AuditLog`), one contract on both adapters:
//! the embedded SQLite file and the real Postgres as the application role
//! under row-level security.

use std::sync::Arc;

use serde_json::json;
use statefabric_domain::TenantId;
use statefabric_store::audit::{AuditEntry, AuditLog};
use statefabric_tests as env;

fn tenant() -> TenantId {
    TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("tenant id")
}

fn entry(tenant: &TenantId, action: &str, target: &str) -> AuditEntry {
    AuditEntry {
        tenant: tenant.clone(),
        actor: "coder-1".into(),
        action: action.into(),
        target: target.into(),
        details: json!({"outcome": "done", "token": 7}),
        trace_id: None,
    }
}

/// Entries of several tenants in one batch each land under their tenant;
/// a tenant reads only its own, by action prefix, oldest first; a prefix
/// is matched literally (`_` is no wildcard).
async fn contract(log: Arc<dyn AuditLog>, ours: TenantId, theirs: TenantId) -> anyhow::Result<()> {
    log.record(&[
        entry(&ours, "lock.acquire", "repo"),
        entry(&theirs, "lock.acquire", "theirs"),
        entry(&ours, "lock.release", "repo"),
        entry(&ours, "session.put", "conversation/c1"),
        entry(&ours, "lockXacquire", "not a lock action"),
    ])
    .await?;
    let locks = log.read(&ours, "lock.", 10).await?;
    assert_eq!(
        locks,
        [
            entry(&ours, "lock.acquire", "repo"),
            entry(&ours, "lock.release", "repo")
        ]
    );
    let theirs_seen = log.read(&theirs, "", 10).await?;
    assert_eq!(theirs_seen, [entry(&theirs, "lock.acquire", "theirs")]);
    let newest = log.read(&ours, "", 2).await?;
    assert_eq!(
        newest.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["session.put", "lockXacquire"],
        "the newest two, oldest first"
    );
    assert!(log.read(&ours, "lock_", 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn embedded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = env::sqlite_store(dir.path()).await?;
    contract(Arc::new(store), tenant(), tenant()).await
}

#[tokio::test]
async fn on_postgres() -> anyhow::Result<()> {
    let (store, ours, theirs) = env::pg_app_store_with_two_tenants().await?;
    contract(Arc::new(store), ours, theirs).await
}
