//! A tenant's own Redis user on the real Redis: with it, the tenant's
//! sessions and locks work through the production adapters, and the keys
//! and channels of another tenant are refused (NOPERM), however they are
//! named.

use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_lock::LockService;
use statefabric_lock::redis::RedisLocks;
use statefabric_redis::acl::{TenantAccess, delete_tenant_user, set_tenant_user};
use statefabric_redis::{Redis, RedisConfig, RedisMode};
use statefabric_session::redis::RedisSessions;
use statefabric_session::{Expiry, SessionKey, SessionStore};
use statefabric_tests as env;

fn tenant() -> TenantId {
    TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("tenant id")
}

/// Redis's permission refusal (redis-rs spells it `NoPerm`).
fn noperm(message: &str) -> bool {
    message.to_ascii_lowercase().contains("noperm")
}

/// What onboarding grants (the sidecar's own list of its Redis adapters'
/// tenant patterns).
fn access(tenant: &TenantId) -> TenantAccess {
    statefabric_sidecar::tenancy::redis_access(tenant)
}

#[tokio::test]
async fn a_tenant_redis_user_reaches_its_own_keys_only() -> anyhow::Result<()> {
    let admin = env::redis_standalone().await;
    let mut admin_conn = admin.conn();
    let (ours, theirs) = (tenant(), tenant());
    let password = uuid::Uuid::new_v4().simple().to_string();
    let user = set_tenant_user(&mut admin_conn, &ours, &password, &access(&ours)).await?;
    let url = env::redis_url().replacen("redis://", &format!("redis://{user}:{password}@"), 1);
    let redis = Redis::connect(&RedisConfig {
        mode: RedisMode::Standalone,
        urls: url.clone(),
        ..RedisConfig::default()
    })
    .await?;

    // Its own sessions and locks, through the production adapters.
    let sessions = RedisSessions::new(redis.conn());
    let key = |tenant: &TenantId| SessionKey {
        tenant: tenant.clone(),
        namespace: "chat".into(),
        id: "s1".into(),
    };
    sessions
        .put(
            &key(&ours),
            b"mine",
            Duration::from_secs(60),
            Expiry::Absolute,
        )
        .await?;
    assert!(
        sessions
            .get(&key(&ours), Duration::from_secs(60), Expiry::Absolute)
            .await?
            .is_some()
    );
    let locks = RedisLocks::new(redis.conn());
    let lease = locks
        .acquire(&ours, "repo", "me", Duration::from_secs(5), Duration::ZERO)
        .await?
        .expect("free");
    locks.release(&lease).await?;

    // Another tenant's, through the same adapters and raw: refused.
    let refused = sessions
        .put(
            &key(&theirs),
            b"x",
            Duration::from_secs(60),
            Expiry::Absolute,
        )
        .await
        .expect_err("another tenant's session");
    assert!(noperm(&refused.to_string()), "{refused}");
    let refused = locks
        .acquire(
            &theirs,
            "repo",
            "me",
            Duration::from_secs(5),
            Duration::ZERO,
        )
        .await
        .expect_err("another tenant's lock");
    assert!(noperm(&refused.to_string()), "{refused}");
    let mut raw = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    for key in [
        format!("{{sf:sess:{theirs}:chat}}:s1"),
        format!("{{sf:lock:{theirs}:repo}}"),
        "anything-else".to_owned(),
    ] {
        let read: redis::RedisResult<Option<String>> =
            redis::cmd("GET").arg(&key).query_async(&mut raw).await;
        let err = read.expect_err("refused");
        assert!(noperm(&err.to_string()), "{key}: {err}");
    }
    let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(format!("sf:changes:{theirs}"))
        .arg("x")
        .query_async(&mut raw)
        .await;
    let published = published.expect_err("refused").to_string();
    assert!(noperm(&published), "another tenant's channel: {published}");
    let flushed: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut raw).await;
    assert!(flushed.is_err(), "no dangerous commands");

    sessions.delete(&key(&ours)).await?;
    delete_tenant_user(&mut admin_conn, &ours).await?;
    Ok(())
}

/// Onboarding onto the 6-node Redis Cluster sets the tenant's user on every
/// node (ACLs are per node): through the cluster, whichever node a key
/// hashes to, the tenant's locks and sessions work and another tenant's
/// are refused.
#[tokio::test]
async fn onboarding_sets_the_tenants_user_on_every_cluster_node() -> anyhow::Result<()> {
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    let (ours, theirs) = (tenant(), tenant());
    let nodes = env::redis_cluster_urls();
    let credentials = statefabric_sidecar::tenancy::onboard(
        &ours,
        "cluster test",
        &env::pg_admin_url(),
        &nodes,
        &env::pg_admin_url(),
        &nodes,
    )
    .await?;
    // Every node knows the user.
    for node in &nodes {
        let mut conn = redis::Client::open(node.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let users: Vec<String> = redis::cmd("ACL")
            .arg("USERS")
            .query_async(&mut conn)
            .await?;
        assert!(
            users.contains(&format!("sf-tenant-{ours}")),
            "{node}: {users:?}"
        );
    }
    let redis = Redis::connect(&RedisConfig {
        mode: RedisMode::Cluster,
        urls: credentials.redis_urls.clone(),
        ..RedisConfig::default()
    })
    .await?;
    let locks = RedisLocks::new(redis.conn());
    // Names that hash to different slots, so more than one node serves them.
    for name in ["repo", "build", "deploy", "docs", "tests", "release"] {
        let lease = locks
            .acquire(&ours, name, "me", Duration::from_secs(5), Duration::ZERO)
            .await?
            .expect("free");
        locks.release(&lease).await?;
        let refused = locks
            .acquire(&theirs, name, "me", Duration::from_secs(5), Duration::ZERO)
            .await
            .expect_err("another tenant's lock");
        assert!(noperm(&refused.to_string()), "{refused}");
    }
    for node in &nodes {
        let mut conn = redis::Client::open(node.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        delete_tenant_user(&mut conn, &ours).await?;
    }
    Ok(())
}
