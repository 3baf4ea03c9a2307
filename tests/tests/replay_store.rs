//! The egress replay records (`statefabric_store::replay::ReplayStore`),
//! one contract on both adapters: the embedded SQLite file and the real
//! Postgres as the application role under row-level security.

use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_store::replay::{Recorded, ReplayStore};
use statefabric_tests as env;

fn tenant() -> TenantId {
    TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("tenant id")
}

fn record(fingerprint: &str, body: &str) -> Recorded {
    Recorded {
        fingerprint: fingerprint.to_owned(),
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        body: body.as_bytes().to_vec(),
    }
}

/// The first record under a key stands, a tenant sees only its own, and an
/// expired record makes way for a new one.
async fn contract(
    store: Arc<dyn ReplayStore>,
    ours: TenantId,
    theirs: TenantId,
) -> anyhow::Result<()> {
    let day = Duration::from_secs(86_400);
    assert_eq!(store.get(&ours, "k1").await?, None);
    store
        .put(&ours, "k1", &record("f1", "data: 1\n\n"), day)
        .await?;
    store.put(&ours, "k1", &record("f2", "other"), day).await?;
    assert_eq!(
        store.get(&ours, "k1").await?,
        Some(record("f1", "data: 1\n\n"))
    );
    assert_eq!(
        store.get(&theirs, "k1").await?,
        None,
        "another tenant's record"
    );
    store
        .put(&ours, "short", &record("f1", "x"), Duration::from_millis(1))
        .await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.get(&ours, "short").await?, None, "expired");
    store.put(&ours, "short", &record("f3", "y"), day).await?;
    assert_eq!(
        store.get(&ours, "short").await?.map(|r| r.fingerprint),
        Some("f3".to_owned())
    );
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
