//! The contracts of the `Notifier` and `UpdateLog` ports, run against every
//! adapter (`tests/tests/updates.rs`): in-process, standalone Redis, Redis
//! Cluster.

use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_updates::{
    Change, ChangeKind, Notifier, Retention, Signal, Start, UpdateLog, UpdatesError,
};
use tokio::sync::mpsc::Receiver;

fn tenant() -> TenantId {
    TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("tenant")
}

fn stream() -> String {
    format!("context:{}", uuid::Uuid::new_v4().simple())
}

pub fn change(key: &str, revision: u64) -> Change {
    Change {
        kind: ChangeKind::Context,
        key: key.to_owned(),
        revision,
        origin: "sidecar-a".to_owned(),
    }
}

const KEEP: Retention = Retention {
    max_len: 10_000,
    max_age: Duration::from_secs(3600),
};

#[macro_export]
macro_rules! notifier_contract_tests {
    ($notifier:expr) => {
        $crate::notifier_contract_tests!(@each $notifier;
            announcements_reach_every_follower_of_the_tenant_only,
        );
    };
    (@each $notifier:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                $crate::updates_contract::$name($notifier.await).await
            }
        )*
    };
}

#[macro_export]
macro_rules! update_log_contract_tests {
    ($log:expr) => {
        $crate::update_log_contract_tests!(@each $log;
            a_group_reads_new_entries_once_until_acknowledged,
            consumers_in_a_group_share_the_work,
            entries_left_pending_by_a_dead_consumer_are_claimed,
            streams_are_trimmed_by_length_and_age,
            bad_update_input_is_refused,
        );
    };
    (@each $log:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                $crate::updates_contract::$name($log.await).await
            }
        )*
    };
}

/// The next signal, or an error after two seconds.
pub async fn next(rx: &mut Receiver<Signal>) -> anyhow::Result<Signal> {
    tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no signal within 2 s"))?
        .ok_or_else(|| anyhow::anyhow!("follower ended"))
}

pub async fn announcements_reach_every_follower_of_the_tenant_only(
    notifier: Arc<dyn Notifier>,
) -> anyhow::Result<()> {
    let (t, other) = (tenant(), tenant());
    let mut a = notifier.follow(&t).await?;
    let mut b = notifier.follow(&t).await?;
    let mut stranger = notifier.follow(&other).await?;
    for rx in [&mut a, &mut b, &mut stranger] {
        assert_eq!(next(rx).await?, Signal::Live);
    }
    notifier.announce(&t, &change("plan", 3)).await?;
    notifier.announce(&t, &change("plan", 4)).await?;
    for rx in [&mut a, &mut b] {
        assert_eq!(next(rx).await?, Signal::Change(change("plan", 3)));
        assert_eq!(next(rx).await?, Signal::Change(change("plan", 4)));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stranger.recv())
            .await
            .is_err(),
        "another tenant heard it"
    );
    Ok(())
}

pub async fn a_group_reads_new_entries_once_until_acknowledged(
    log: Arc<dyn UpdateLog>,
) -> anyhow::Result<()> {
    let s = stream();
    log.append(&s, &change("old", 1), KEEP).await?;
    log.create_group(&s, "late", Start::Latest).await?;
    log.create_group(&s, "all", Start::Beginning).await?;
    log.create_group(&s, "all", Start::Latest).await?; // idempotent, no reset
    let id = log.append(&s, &change("new", 2), KEEP).await?;
    let late = log.read(&s, "late", "c1", 10, Duration::ZERO).await?;
    assert_eq!(late.len(), 1);
    assert_eq!(
        (late[0].id.as_str(), &late[0].change),
        (id.as_str(), &change("new", 2))
    );
    let all = log.read(&s, "all", "c1", 10, Duration::ZERO).await?;
    assert_eq!(
        all.iter()
            .map(|d| d.change.key.as_str())
            .collect::<Vec<_>>(),
        ["old", "new"]
    );
    // Delivered once: a second read sees nothing new.
    assert!(
        log.read(&s, "late", "c1", 10, Duration::ZERO)
            .await?
            .is_empty()
    );
    // A blocked read wakes for an append.
    let waiting = {
        let (log, s) = (log.clone(), s.clone());
        tokio::spawn(async move { log.read(&s, "late", "c1", 10, Duration::from_secs(3)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    log.append(&s, &change("live", 3), KEEP).await?;
    let woke = waiting.await??;
    assert_eq!(woke.len(), 1, "woken by the append");
    assert_eq!(
        log.ack(&s, "late", &[late[0].id.clone(), woke[0].id.clone()])
            .await?,
        2
    );
    assert_eq!(
        log.ack(&s, "late", &[late[0].id.clone()]).await?,
        0,
        "acked already"
    );
    assert_eq!(log.len(&s).await?, 3);
    Ok(())
}

pub async fn consumers_in_a_group_share_the_work(log: Arc<dyn UpdateLog>) -> anyhow::Result<()> {
    let s = stream();
    log.create_group(&s, "workers", Start::Latest).await?;
    for r in 0..10 {
        log.append(&s, &change("doc", r), KEEP).await?;
    }
    let first = log.read(&s, "workers", "w1", 4, Duration::ZERO).await?;
    let second = log.read(&s, "workers", "w2", 100, Duration::ZERO).await?;
    assert_eq!((first.len(), second.len()), (4, 6));
    let mut revisions: Vec<u64> = first
        .iter()
        .chain(&second)
        .map(|d| d.change.revision)
        .collect();
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (0..10).collect::<Vec<_>>(),
        "each entry to one consumer"
    );
    Ok(())
}

pub async fn entries_left_pending_by_a_dead_consumer_are_claimed(
    log: Arc<dyn UpdateLog>,
) -> anyhow::Result<()> {
    let s = stream();
    log.create_group(&s, "workers", Start::Latest).await?;
    for r in 0..3 {
        log.append(&s, &change("doc", r), KEEP).await?;
    }
    let taken = log.read(&s, "workers", "dies", 3, Duration::ZERO).await?;
    assert_eq!(taken.len(), 3);
    // "dies" acknowledges one, then is never heard from again.
    log.ack(&s, "workers", &[taken[0].id.clone()]).await?;
    let idle = Duration::from_millis(300);
    assert!(
        log.claim(&s, "workers", "heir", idle, 10).await?.is_empty(),
        "not idle long enough yet"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let claimed = log.claim(&s, "workers", "heir", idle, 10).await?;
    assert_eq!(
        claimed
            .iter()
            .map(|d| d.change.revision)
            .collect::<Vec<_>>(),
        [1, 2],
        "the unacknowledged ones, in order"
    );
    let ids: Vec<String> = claimed.iter().map(|d| d.id.clone()).collect();
    assert_eq!(log.ack(&s, "workers", &ids).await?, 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(log.claim(&s, "workers", "heir", idle, 10).await?.is_empty());
    Ok(())
}

pub async fn streams_are_trimmed_by_length_and_age(log: Arc<dyn UpdateLog>) -> anyhow::Result<()> {
    let s = stream();
    let short = Retention {
        max_len: 100,
        max_age: Duration::from_secs(3600),
    };
    for r in 0..1000 {
        log.append(&s, &change("doc", r), short).await?;
    }
    let len = log.len(&s).await?;
    // Redis trims whole blocks with `~`: about max_len, never unbounded.
    assert!((100..=300).contains(&len), "length kept near 100: {len}");
    let aged = stream();
    log.append(&aged, &change("old", 1), KEEP).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    log.append(&aged, &change("new", 2), KEEP).await?;
    let removed = log
        .trim(
            &aged,
            Retention {
                max_len: 100,
                max_age: Duration::from_millis(150),
            },
        )
        .await?;
    assert_eq!(removed, 1, "only the entry older than max_age");
    assert_eq!(log.len(&aged).await?, 1);
    Ok(())
}

pub async fn bad_update_input_is_refused(log: Arc<dyn UpdateLog>) -> anyhow::Result<()> {
    let s = stream();
    for bad in ["", "has space", "a{b}"] {
        let result = log.append(bad, &change("doc", 1), KEEP).await;
        assert!(
            matches!(result, Err(UpdatesError::Invalid { .. })),
            "{bad:?}: {result:?}"
        );
    }
    log.append(&s, &change("doc", 1), KEEP).await?;
    let result = log.read(&s, "no-such-group", "c", 1, Duration::ZERO).await;
    assert!(
        matches!(result, Err(UpdatesError::Invalid { what: "group", .. })),
        "{result:?}"
    );
    assert_eq!(log.len(&s).await?, 1, "nothing changed");
    Ok(())
}
