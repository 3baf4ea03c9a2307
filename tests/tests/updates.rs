//! The notifier and update-log contracts on every adapter (in-process, the
//! real standalone Redis, the real 6-node cluster), and what only a real
//! connection can show: a follower whose connection is killed is told it
//! lost the feed, then that it is live again, and hears new changes.

use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_tests as env;
use statefabric_tests::updates_contract::{change, next};
use statefabric_updates::memory::{MemoryNotifier, MemoryUpdateLog};
use statefabric_updates::redis::{RedisNotifier, RedisUpdateLog};
use statefabric_updates::{Notifier, Signal, UpdateLog};

async fn notifier_standalone() -> Arc<dyn Notifier> {
    Arc::new(RedisNotifier::new(env::redis_standalone().await))
}

async fn notifier_cluster() -> Arc<dyn Notifier> {
    Arc::new(RedisNotifier::new(env::redis_cluster().await))
}

async fn notifier_memory() -> Arc<dyn Notifier> {
    Arc::new(MemoryNotifier::default())
}

async fn log_standalone() -> Arc<dyn UpdateLog> {
    Arc::new(
        RedisUpdateLog::connect(&env::redis_standalone().await)
            .await
            .expect("connect"),
    )
}

async fn log_cluster() -> Arc<dyn UpdateLog> {
    Arc::new(
        RedisUpdateLog::connect(&env::redis_cluster().await)
            .await
            .expect("connect"),
    )
}

async fn log_memory() -> Arc<dyn UpdateLog> {
    Arc::new(MemoryUpdateLog::default())
}

mod in_process {
    statefabric_tests::notifier_contract_tests!(super::notifier_memory());
    statefabric_tests::update_log_contract_tests!(super::log_memory());
}

mod redis_standalone {
    statefabric_tests::notifier_contract_tests!(super::notifier_standalone());
    statefabric_tests::update_log_contract_tests!(super::log_standalone());
}

mod redis_cluster {
    statefabric_tests::notifier_contract_tests!(super::notifier_cluster());
    statefabric_tests::update_log_contract_tests!(super::log_cluster());
}

#[tokio::test]
async fn a_killed_subscription_is_reported_as_a_gap_and_resumes() -> anyhow::Result<()> {
    let redis = env::redis_standalone().await;
    let notifier = RedisNotifier::new(redis.clone());
    let tenant = TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple()))?;
    let mut rx = notifier.follow(&tenant).await?;
    assert_eq!(next(&mut rx).await?, Signal::Live);
    notifier.announce(&tenant, &change("doc", 1)).await?;
    assert_eq!(next(&mut rx).await?, Signal::Change(change("doc", 1)));
    // Kill every pub/sub connection on the server.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis.conn())
        .await?;
    assert!(killed >= 1);
    assert_eq!(next(&mut rx).await?, Signal::Lost);
    assert_eq!(next(&mut rx).await?, Signal::Live, "re-subscribed");
    notifier.announce(&tenant, &change("doc", 2)).await?;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), rx.recv()).await?,
        Some(Signal::Change(change("doc", 2)))
    );
    Ok(())
}
