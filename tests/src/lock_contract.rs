//! The lock contract, run against every adapter of `LockService`
//! (`tests/tests/locks.rs`): in-process, standalone Redis, Redis Cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_lock::{LockError, LockService};

fn tenant() -> TenantId {
    TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("tenant")
}

fn name() -> String {
    format!("lock-{}", uuid::Uuid::new_v4().simple())
}

const TTL: Duration = Duration::from_secs(10);
const NOW: Duration = Duration::ZERO;

#[macro_export]
macro_rules! lock_contract_tests {
    ($locks:expr) => {
        $crate::lock_contract_tests!(@each $locks;
            a_lock_has_one_holder_and_tokens_increase,
            only_the_current_grant_may_renew_or_release,
            an_expired_lease_frees_the_lock_and_fences_the_old_holder,
            contenders_take_turns_exclusively,
            bad_input_is_refused,
            waiters_are_served_in_arrival_order,
        );
    };
    (@each $locks:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> anyhow::Result<()> {
                $crate::lock_contract::$name($locks.await).await
            }
        )*
    };
}

pub async fn a_lock_has_one_holder_and_tokens_increase(
    locks: Arc<dyn LockService>,
) -> anyhow::Result<()> {
    let (t, n) = (tenant(), name());
    let first = locks
        .acquire(&t, &n, "planner", TTL, NOW)
        .await?
        .expect("free lock");
    assert!(
        locks.acquire(&t, &n, "coder", TTL, NOW).await?.is_none(),
        "held by another"
    );
    let holder = locks.inspect(&t, &n).await?.expect("held");
    assert_eq!(
        (holder.owner.as_str(), holder.token),
        ("planner", first.token)
    );
    assert!(holder.expires_in <= TTL && holder.expires_in > Duration::from_secs(5));
    // Re-acquiring one's own lock extends it and keeps the token.
    let again = locks
        .acquire(&t, &n, "planner", TTL, NOW)
        .await?
        .expect("own lock");
    assert_eq!(again.token, first.token);
    locks.release(&first).await?;
    assert!(locks.inspect(&t, &n).await?.is_none());
    let second = locks
        .acquire(&t, &n, "coder", TTL, NOW)
        .await?
        .expect("released");
    assert!(second.token > first.token, "fencing tokens increase");
    // Same name, other tenant: a different lock.
    assert!(
        locks
            .acquire(&tenant(), &n, "critic", TTL, NOW)
            .await?
            .is_some()
    );
    Ok(())
}

pub async fn only_the_current_grant_may_renew_or_release(
    locks: Arc<dyn LockService>,
) -> anyhow::Result<()> {
    let (t, n) = (tenant(), name());
    let lease = locks
        .acquire(&t, &n, "planner", TTL, NOW)
        .await?
        .expect("free");
    let mut forged = lease.clone();
    forged.owner = "coder".into();
    assert!(matches!(
        locks.renew(&forged, TTL).await,
        Err(LockError::NotHolder { .. })
    ));
    assert!(matches!(
        locks.release(&forged).await,
        Err(LockError::NotHolder { .. })
    ));
    let mut stale = lease.clone();
    stale.token -= 1;
    assert!(matches!(
        locks.release(&stale).await,
        Err(LockError::NotHolder { .. })
    ));
    assert_eq!(
        locks.inspect(&t, &n).await?.map(|h| h.token),
        Some(lease.token),
        "unchanged"
    );
    let renewed = locks.renew(&lease, Duration::from_secs(30)).await?;
    assert!(locks.inspect(&t, &n).await?.expect("held").expires_in > Duration::from_secs(20));
    locks.release(&renewed).await?;
    assert!(
        matches!(
            locks.release(&renewed).await,
            Err(LockError::NotHolder { .. })
        ),
        "twice"
    );
    Ok(())
}

pub async fn an_expired_lease_frees_the_lock_and_fences_the_old_holder(
    locks: Arc<dyn LockService>,
) -> anyhow::Result<()> {
    let (t, n) = (tenant(), name());
    let old = locks
        .acquire(&t, &n, "paused", Duration::from_millis(200), NOW)
        .await?
        .expect("free");
    // A waiter gets it once the lease runs out, with a newer token.
    let new = locks
        .acquire(&t, &n, "fresh", TTL, Duration::from_secs(5))
        .await?
        .expect("freed by expiry");
    assert!(new.token > old.token);
    // The paused holder wakes up: everything it tries is refused.
    assert!(matches!(
        locks.renew(&old, TTL).await,
        Err(LockError::NotHolder { .. })
    ));
    assert!(matches!(
        locks.release(&old).await,
        Err(LockError::NotHolder { .. })
    ));
    assert_eq!(
        locks.inspect(&t, &n).await?.map(|h| h.owner),
        Some("fresh".to_owned())
    );
    Ok(())
}

pub async fn contenders_take_turns_exclusively(locks: Arc<dyn LockService>) -> anyhow::Result<()> {
    let (t, n) = (tenant(), name());
    let inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..12 {
        let (locks, t, n, inside) = (locks.clone(), t.clone(), n.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            for _ in 0..3 {
                let lease = locks
                    .acquire(&t, &n, &format!("c{c}"), TTL, Duration::from_secs(30))
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("c{c} starved"))?;
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                tokens.push(lease.token);
                locks.release(&lease).await?;
            }
            anyhow::Ok(tokens)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let count = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), count, "no token granted twice");
    assert_eq!(count, 36);
    Ok(())
}

pub async fn bad_input_is_refused(locks: Arc<dyn LockService>) -> anyhow::Result<()> {
    let t = tenant();
    for (name, owner, ttl) in [
        ("", "o", TTL),
        ("has space", "o", TTL),
        ("ok", "", TTL),
        ("ok", "bad|owner", TTL),
        ("ok", "o", Duration::ZERO),
    ] {
        let result = locks.acquire(&t, name, owner, ttl, NOW).await;
        assert!(
            matches!(result, Err(LockError::Invalid { .. })),
            "{name:?} {owner:?} {ttl:?}: {result:?}"
        );
    }
    assert!(
        locks.inspect(&t, "ok").await?.is_none(),
        "nothing was taken"
    );
    Ok(())
}

pub async fn waiters_are_served_in_arrival_order(
    locks: Arc<dyn LockService>,
) -> anyhow::Result<()> {
    let (t, n) = (tenant(), name());
    let first = locks
        .acquire(&t, &n, "first", TTL, NOW)
        .await?
        .expect("free");
    let wait = |owner: &'static str| {
        let (locks, t, n) = (locks.clone(), t.clone(), n.clone());
        tokio::spawn(async move {
            locks
                .acquire(&t, &n, owner, TTL, Duration::from_secs(20))
                .await
        })
    };
    let second = wait("second");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = wait("third");
    tokio::time::sleep(Duration::from_millis(200)).await;
    locks.release(&first).await?;
    let second = second.await??.expect("second is first in line");
    assert_eq!(second.owner, "second");
    // The lock is free for a moment after this release, but "third" is
    // waiting: a caller that just tries once may not jump the queue.
    locks.release(&second).await?;
    assert!(
        locks.acquire(&t, &n, "barger", TTL, NOW).await?.is_none(),
        "a try-once caller jumped the queue"
    );
    let third = third.await??.expect("third is next");
    assert_eq!(third.owner, "third");
    assert!(first.token < second.token && second.token < third.token);
    locks.release(&third).await?;
    assert!(
        locks.acquire(&t, &n, "later", TTL, NOW).await?.is_some(),
        "an empty queue lets a try-once caller in"
    );
    Ok(())
}
