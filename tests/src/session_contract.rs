//! The session contract, run against every adapter of `SessionStore`
//! (`tests/tests/sessions.rs`): in-process, standalone Redis, Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_session::{Expiry, SessionError, SessionKey, SessionStore};

fn key(namespace: &str) -> SessionKey {
    SessionKey {
        tenant: TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("tenant"),
        namespace: namespace.to_owned(),
        id: format!("conv-{}", uuid::Uuid::new_v4().simple()),
    }
}

const LONG: Duration = Duration::from_secs(60);

#[macro_export]
macro_rules! session_contract_tests {
    ($sessions:expr) => {
        $crate::session_contract_tests!(@each $sessions;
            sessions_are_written_read_and_deleted,
            absolute_sessions_expire_from_creation,
            sliding_sessions_live_while_used,
            live_counts_only_unexpired_sessions,
            bad_session_input_is_refused,
            many_sessions_are_read_in_one_call,
        );
    };
    (@each $sessions:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                $crate::session_contract::$name($sessions.await).await
            }
        )*
    };
}

pub async fn sessions_are_written_read_and_deleted(
    sessions: Arc<dyn SessionStore>,
) -> anyhow::Result<()> {
    let k = key("chat");
    assert!(sessions.get(&k, LONG, Expiry::Sliding).await?.is_none());
    let left = sessions.put(&k, b"draft 1", LONG, Expiry::Sliding).await?;
    assert!(left > Duration::from_secs(59) && left <= LONG, "{left:?}");
    sessions.put(&k, b"draft 2", LONG, Expiry::Sliding).await?;
    let read = sessions
        .get(&k, LONG, Expiry::Sliding)
        .await?
        .expect("written");
    assert_eq!(read.value, b"draft 2");
    // Same id, other namespace or tenant: other sessions.
    let mut other = k.clone();
    other.namespace = "planner".into();
    assert!(sessions.get(&other, LONG, Expiry::Sliding).await?.is_none());
    let mut foreign = key("chat");
    foreign.id = k.id.clone();
    assert!(
        sessions
            .get(&foreign, LONG, Expiry::Sliding)
            .await?
            .is_none()
    );
    assert!(sessions.delete(&k).await?);
    assert!(!sessions.delete(&k).await?, "already gone");
    assert!(sessions.get(&k, LONG, Expiry::Sliding).await?.is_none());
    Ok(())
}

pub async fn absolute_sessions_expire_from_creation(
    sessions: Arc<dyn SessionStore>,
) -> anyhow::Result<()> {
    let k = key("task");
    let ttl = Duration::from_millis(600);
    sessions.put(&k, b"v1", ttl, Expiry::Absolute).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Writing and reading do not extend an absolute session.
    let left = sessions.put(&k, b"v2", ttl, Expiry::Absolute).await?;
    assert!(
        left <= Duration::from_millis(310),
        "write extended it: {left:?}"
    );
    let read = sessions
        .get(&k, ttl, Expiry::Absolute)
        .await?
        .expect("alive");
    assert_eq!(read.value, b"v2");
    assert!(read.expires_in <= Duration::from_millis(310));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        sessions.get(&k, ttl, Expiry::Absolute).await?.is_none(),
        "expired 600 ms after creation"
    );
    Ok(())
}

pub async fn sliding_sessions_live_while_used(
    sessions: Arc<dyn SessionStore>,
) -> anyhow::Result<()> {
    let k = key("chat");
    let ttl = Duration::from_millis(500);
    sessions.put(&k, b"v", ttl, Expiry::Sliding).await?;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let read = sessions.get(&k, ttl, Expiry::Sliding).await?;
        assert!(read.is_some(), "in use, so alive past its first ttl");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        sessions.get(&k, ttl, Expiry::Sliding).await?.is_none(),
        "idle past its ttl"
    );
    Ok(())
}

pub async fn live_counts_only_unexpired_sessions(
    sessions: Arc<dyn SessionStore>,
) -> anyhow::Result<()> {
    let base = key("count");
    let at = |id: &str| SessionKey {
        id: id.to_owned(),
        ..base.clone()
    };
    sessions.put(&at("a"), b"1", LONG, Expiry::Sliding).await?;
    sessions.put(&at("b"), b"1", LONG, Expiry::Absolute).await?;
    sessions
        .put(
            &at("short"),
            b"1",
            Duration::from_millis(200),
            Expiry::Sliding,
        )
        .await?;
    assert_eq!(sessions.live(&base.tenant, "count").await?, 3);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sessions.live(&base.tenant, "count").await?, 2);
    sessions.delete(&at("a")).await?;
    assert_eq!(sessions.live(&base.tenant, "count").await?, 1);
    assert_eq!(sessions.live(&base.tenant, "other").await?, 0);
    Ok(())
}

pub async fn bad_session_input_is_refused(sessions: Arc<dyn SessionStore>) -> anyhow::Result<()> {
    let good = key("chat");
    let mut empty_id = good.clone();
    empty_id.id = String::new();
    let mut spaced = good.clone();
    spaced.namespace = "a b".into();
    let huge = vec![7u8; 2 * 1024 * 1024];
    let cases: Vec<(&SessionKey, &[u8], Duration)> = vec![
        (&empty_id, b"v", LONG),
        (&spaced, b"v", LONG),
        (&good, b"", LONG),
        (&good, &huge, LONG),
        (&good, b"v", Duration::ZERO),
    ];
    for (k, value, ttl) in cases {
        let result = sessions.put(k, value, ttl, Expiry::Sliding).await;
        assert!(
            matches!(result, Err(SessionError::Invalid { .. })),
            "{k:?} {} bytes {ttl:?}: {result:?}",
            value.len()
        );
    }
    assert!(
        sessions.get(&good, LONG, Expiry::Sliding).await?.is_none(),
        "nothing was written"
    );
    assert_eq!(sessions.live(&good.tenant, "chat").await?, 0);
    Ok(())
}

pub async fn many_sessions_are_read_in_one_call(
    sessions: Arc<dyn SessionStore>,
) -> anyhow::Result<()> {
    let base = key("bulk");
    let at = |id: &str| SessionKey {
        id: id.to_owned(),
        ..base.clone()
    };
    let ttl = Duration::from_millis(1000);
    sessions
        .put(&at("a"), b"alpha", ttl, Expiry::Sliding)
        .await?;
    sessions
        .put(&at("b"), b"beta", ttl, Expiry::Sliding)
        .await?;
    // Another tenant's session of the same id is not read.
    let mut foreign = key("bulk");
    foreign.id = "c".into();
    sessions
        .put(&foreign, b"theirs", LONG, Expiry::Sliding)
        .await?;
    let ids: Vec<String> = ["b", "missing", "a", "c", "a"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let read = sessions
        .get_many(&base.tenant, "bulk", &ids, ttl, Expiry::Sliding)
        .await?;
    let values: Vec<Option<&[u8]>> = read
        .iter()
        .map(|s| s.as_ref().map(|s| s.value.as_slice()))
        .collect();
    assert_eq!(
        values,
        [
            Some(&b"beta"[..]),
            None,
            Some(b"alpha"),
            None,
            Some(b"alpha")
        ]
    );
    // Reading extends sliding sessions, as a single read does.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let read = sessions
            .get_many(&base.tenant, "bulk", &ids[..1], ttl, Expiry::Sliding)
            .await?;
        assert!(read[0].is_some(), "kept alive by bulk reads");
    }
    assert!(
        sessions
            .get(&at("a"), ttl, Expiry::Sliding)
            .await?
            .is_none(),
        "not read for 1.2 s: expired"
    );
    assert_eq!(sessions.live(&base.tenant, "bulk").await?, 1, "only b");
    // Absolute sessions are not extended, and their time left is reported.
    sessions
        .put(&at("abs"), b"x", ttl, Expiry::Absolute)
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = sessions
        .get_many(
            &base.tenant,
            "bulk",
            &["abs".to_owned()],
            ttl,
            Expiry::Absolute,
        )
        .await?;
    let left = read[0].as_ref().expect("alive").expires_in;
    assert!(left <= Duration::from_millis(710), "{left:?}");
    // Nothing asked, nothing read; bad ids and too many ids are refused.
    assert!(
        sessions
            .get_many(&base.tenant, "bulk", &[], ttl, Expiry::Sliding)
            .await?
            .is_empty()
    );
    let bad = ["b".to_owned(), "a b".to_owned()];
    let refused = sessions
        .get_many(&base.tenant, "bulk", &bad, ttl, Expiry::Sliding)
        .await;
    assert!(
        matches!(&refused, Err(SessionError::Invalid { reason, .. }) if reason.contains("ids[1]")),
        "{refused:?}"
    );
    let many: Vec<String> = (0..1001).map(|i| format!("s{i}")).collect();
    let refused = sessions
        .get_many(&base.tenant, "bulk", &many, ttl, Expiry::Sliding)
        .await;
    assert!(
        matches!(&refused, Err(SessionError::Invalid { what: "ids", .. })),
        "{refused:?}"
    );
    let refused = sessions
        .get_many(&base.tenant, "a b", &ids, ttl, Expiry::Sliding)
        .await;
    assert!(
        matches!(
            &refused,
            Err(SessionError::Invalid {
                what: "namespace",
                ..
            })
        ),
        "{refused:?}"
    );
    Ok(())
}
