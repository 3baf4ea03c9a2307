//! The sidecar's Redis-backed building blocks through real sidecars sharing
//! the real Redis Cluster and Postgres: sessions, cache invalidation and
//! watches across sidecars, fenced context writes, a paused lock holder, and
//! what happens when Redis dies and comes back.

use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::Signal;
use serde_json::json;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::sessions_client::SessionsClient;
use statefabric_sdk::{MergeType, StateClient, VectorClock};
use statefabric_tests as env;
use statefabric_tests::process::{self, Service, Storage};
use tonic::Code;

fn tenant() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

async fn sidecar(tenant: &str, identity: &str, extra: &[(&str, &str)]) -> anyhow::Result<Service> {
    let owned = process::redis_vars(true);
    let mut vars = process::borrowed(&owned);
    vars.extend_from_slice(extra);
    process::sidecar(Storage::Postgres, tenant, identity, &vars).await
}

async fn metric(service: &Service, line_start: &str) -> anyhow::Result<Option<f64>> {
    let body = env::http("GET", &format!("{}/metrics", service.admin), None, None)
        .await?
        .body;
    Ok(body
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok()))
}

#[tokio::test]
async fn sessions_are_shared_by_sidecars_and_expire_by_their_namespace() -> anyhow::Result<()> {
    let t = tenant();
    let fast = [
        ("STATEFABRIC_SESSIONS__METRICS_INTERVAL", "100ms"),
        ("STATEFABRIC_SESSIONS__NAMESPACES__QUICK__TTL", "400ms"),
        (
            "STATEFABRIC_SESSIONS__NAMESPACES__QUICK__EXPIRY",
            "absolute",
        ),
        ("STATEFABRIC_SESSIONS__NAMESPACES__SLIDE__TTL", "400ms"),
    ];
    let a = sidecar(&t, "planner", &fast).await?;
    let b = sidecar(&t, "coder", &fast).await?;
    let mut sa = StateClient::connect(a.grpc.clone()).await?.sessions();
    let mut sb = StateClient::connect(b.grpc.clone()).await?.sessions();
    sa.put("conversation", "c1", "hello", None).await?;
    let read = sb.get("conversation", "c1").await?.expect("shared");
    assert_eq!(read.value, b"hello");
    assert!(
        read.expires_in > Duration::from_secs(29 * 60),
        "the namespace's 30 min"
    );
    // Many in one call (one script on the cluster), in the order asked.
    sa.put("conversation", "c2", "again", None).await?;
    let many = sb.get_many("conversation", &["c2", "c0", "c1"]).await?;
    let got: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(id, s)| (id.as_str(), s.value.as_slice()))
        .collect();
    assert_eq!(got, [("c2", &b"again"[..]), ("c1", b"hello")]);
    assert!(sb.delete("conversation", "c2").await?);
    // Absolute: gone 400 ms after creation however it is used.
    sa.put("quick", "q", "v", None).await?;
    // Sliding: alive while used.
    sa.put("slide", "s", "v", None).await?;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sb.get("quick", "q").await?;
        assert!(sb.get("slide", "s").await?.is_some(), "kept alive by use");
    }
    assert!(
        sb.get("quick", "q").await?.is_none(),
        "absolute ttl ran out"
    );
    // The live-session gauge counts what has not expired.
    env::eventually("sessions_live gauge", Duration::from_secs(5), || async {
        let v = metric(&a, "statefabric_sessions_live{namespace=\"conversation\"}").await?;
        Ok((v == Some(1.0)).then_some(()))
    })
    .await?;
    // Redis itself is measured: command latency, in-flight use, and each
    // node's memory against its cap (the testenv sets 256 MiB).
    let node = &env::redis_cluster_urls()[0];
    let cap = metric(
        &a,
        &format!("statefabric_redis_maxmemory_bytes{{node=\"{node}\"}}"),
    )
    .await?;
    assert_eq!(cap, Some(268_435_456.0));
    let used = metric(
        &a,
        &format!("statefabric_redis_used_memory_bytes{{node=\"{node}\"}}"),
    )
    .await?;
    assert!(used.is_some_and(|u| u > 0.0));
    let scripts = metric(
        &a,
        "statefabric_redis_command_duration_seconds_count{command=\"evalsha\"}",
    )
    .await?;
    assert!(scripts.is_some_and(|n| n >= 5.0), "{scripts:?}");
    assert!(
        metric(&a, "statefabric_redis_commands_in_flight")
            .await?
            .is_some()
    );
    assert!(sb.delete("conversation", "c1").await?);
    assert!(!sa.delete("conversation", "c1").await?);
    assert!(sa.get("conversation", "c1").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn bad_session_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let t = tenant();
    let a = sidecar(
        &t,
        "planner",
        &[("STATEFABRIC_SESSIONS__MAX_VALUE_BYTES", "1024")],
    )
    .await?;
    let mut raw = SessionsClient::connect(a.grpc.clone()).await?;
    let put =
        |namespace: &str, id: &str, value: Vec<u8>, ttl_ms: Option<i64>| pb::PutSessionRequest {
            namespace: namespace.to_owned(),
            id: id.to_owned(),
            value,
            ttl_ms,
        };
    for (request, expect) in [
        (put("nope", "c1", b"v".to_vec(), None), "not configured"),
        (put("conversation", "", b"v".to_vec(), None), "session id"),
        (
            put("conversation", "a b", b"v".to_vec(), None),
            "session id",
        ),
        (
            put("conversation", "c1", Vec::new(), None),
            "must not be empty",
        ),
        (
            put("conversation", "c1", vec![1; 2048], None),
            "over the limit of 1024",
        ),
        (
            put("conversation", "c1", b"v".to_vec(), Some(0)),
            "must be positive",
        ),
        (
            put("conversation", "c1", b"v".to_vec(), Some(-5)),
            "must be positive",
        ),
        (
            put("conversation", "c1", b"v".to_vec(), Some(i64::MAX)),
            "max",
        ),
    ] {
        let status = raw.put_session(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(expect),
            "{expect}: {}",
            status.message()
        );
    }
    let status = raw
        .get_session(pb::GetSessionRequest {
            namespace: "conversation".into(),
            id: "c1".into(),
        })
        .await
        .expect_err("nothing written");
    assert_eq!(status.code(), Code::NotFound, "{}", status.message());
    let many = |namespace: &str, ids: Vec<String>| pb::GetSessionsRequest {
        namespace: namespace.to_owned(),
        ids,
    };
    for (request, expect) in [
        (many("nope", vec!["c1".into()]), "not configured"),
        (
            many("conversation", vec!["c1".into(), "a b".into()]),
            "ids[1]",
        ),
        (
            many("conversation", (0..1001).map(|i| format!("s{i}")).collect()),
            "at most 1000",
        ),
    ] {
        let status = raw.get_sessions(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(expect),
            "{expect}: {}",
            status.message()
        );
    }
    let none = raw
        .get_sessions(many("conversation", vec!["c1".into()]))
        .await?
        .into_inner();
    assert!(none.sessions.is_empty());
    assert_eq!(none.missing, ["c1"]);
    Ok(())
}

#[tokio::test]
async fn a_write_on_one_sidecar_reaches_the_others_cache_and_watchers() -> anyhow::Result<()> {
    let t = tenant();
    let a = sidecar(&t, "planner", &[]).await?;
    let b = sidecar(&t, "coder", &[]).await?;
    let mut ca = StateClient::connect(a.grpc.clone()).await?.context();
    let mut cb = StateClient::connect(b.grpc.clone()).await?.context();
    let created = ca
        .put(
            "plan",
            MergeType::None,
            &VectorClock::new(),
            &json!({"step": 1}),
            None,
        )
        .await?;
    // b reads (and caches) the document, then watches it.
    assert_eq!(
        cb.get("plan").await?.expect("doc").revision,
        created.revision
    );
    assert_eq!(
        cb.get("plan").await?.expect("doc").revision,
        created.revision
    );
    let mut watch = Box::pin(cb.watch("plan", created.revision).await?);
    let updated = ca
        .put(
            "plan",
            MergeType::None,
            &created.vector,
            &json!({"step": 2}),
            None,
        )
        .await?;
    // The watcher on b hears a's write (through the update stream) ...
    let change = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await?
        .expect("watch open")?;
    assert_eq!(change.0, updated.revision);
    // ... and a read after the wake-up never gets the old revision from b's
    // cache (it was dropped before the watcher was woken).
    let doc = cb.get("plan").await?.expect("doc");
    assert_eq!(
        (doc.revision, &doc.content),
        (updated.revision, &json!({"step": 2}))
    );
    let hits = metric(&b, "statefabric_context_cache_hits_total").await?;
    assert!(hits.unwrap_or(0.0) >= 1.0, "b did serve from its cache");
    Ok(())
}

#[tokio::test]
async fn a_paused_lock_holder_loses_the_lock_and_its_writes_are_fenced() -> anyhow::Result<()> {
    let t = tenant();
    let a = sidecar(&t, "coder-a", &[]).await?;
    let b = sidecar(&t, "coder-b", &[]).await?;
    let client_a = StateClient::connect(a.grpc.clone()).await?;
    let client_b = StateClient::connect(b.grpc.clone()).await?;
    let lock = format!("repo-{}", uuid::Uuid::new_v4().simple());
    let ttl = Duration::from_millis(800);
    let held = client_a
        .locks()
        .acquire(&lock, ttl, Duration::ZERO)
        .await?
        .expect("free");
    let mut ctx_a = client_a.context().fenced(&lock, held.token());
    let first = ctx_a
        .put(
            "main.rs",
            MergeType::None,
            &VectorClock::new(),
            &json!("v1"),
            None,
        )
        .await?;
    // The holder's sidecar stops (a GC pause, a frozen VM) past the lease.
    a.signal(Signal::SIGSTOP)?;
    tokio::time::sleep(ttl * 2).await;
    let newer = client_b
        .locks()
        .acquire(&lock, Duration::from_secs(10), Duration::from_secs(5))
        .await?
        .expect("freed by the lapsed lease");
    assert!(newer.token() > held.token());
    let second = client_b
        .context()
        .fenced(&lock, newer.token())
        .put(
            "main.rs",
            MergeType::None,
            &first.vector,
            &json!("v2"),
            None,
        )
        .await?;
    a.signal(Signal::SIGCONT)?;
    // The old holder wakes: its late write (with a base that is current!)
    // is refused by the fence, and nothing changed.
    let err = ctx_a
        .put(
            "main.rs",
            MergeType::None,
            &second.vector,
            &json!("stale"),
            None,
        )
        .await
        .expect_err("fenced");
    assert!(err.to_string().contains("token"), "{err}");
    let doc = client_b.context().get("main.rs").await?.expect("doc");
    assert_eq!(doc.content, json!("v2"));
    Ok(())
}

/// A private Redis this test may kill.
struct PrivateRedis {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> anyhow::Result<Self> {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            port,
            child: Some(child),
        })
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn when_redis_dies_calls_fail_fast_and_recover_when_it_returns() -> anyhow::Result<()> {
    let port = env::free_port();
    let mut redis = PrivateRedis::start(port)?;
    let url = format!("redis://127.0.0.1:{port}");
    env::eventually("private redis", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let client = redis::Client::open(url.as_str())?;
            Ok(client
                .get_multiplexed_async_connection()
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await?;
    let vars = process::redis_vars_at("standalone", &url);
    let mut vars = process::borrowed(&vars);
    vars.push(("STATEFABRIC_REDIS__COMMAND_TIMEOUT", "300ms"));
    vars.push(("STATEFABRIC_REDIS__BREAKER_FAILURES", "2"));
    vars.push(("STATEFABRIC_REDIS__BREAKER_OPEN_FOR", "500ms"));
    let a = process::sidecar(Storage::Sqlite, &tenant(), "planner", &vars).await?;
    let client = StateClient::connect(a.grpc.clone()).await?;
    let mut sessions = client.sessions();
    sessions.put("conversation", "c1", "v", None).await?;

    redis.kill().await?;
    let mut codes = Vec::new();
    for _ in 0..4 {
        let err = sessions
            .get("conversation", "c1")
            .await
            .expect_err("redis is down");
        codes.push(err.to_string());
    }
    assert!(
        codes.iter().all(|e| e.contains("unavailable")),
        "every call fails as unavailable: {codes:?}"
    );
    assert!(
        codes.last().is_some_and(|e| e.contains("circuit open")),
        "after repeated failures the breaker answers at once: {codes:?}"
    );
    let breaker = metric(&a, "statefabric_circuit_state{dependency=\"redis\"}").await?;
    assert_eq!(breaker, Some(2.0), "open");
    env::eventually(
        "not ready without Redis",
        Duration::from_secs(15),
        || async {
            let r = env::http("GET", &format!("{}/healthz/ready", a.admin), None, None).await?;
            Ok((r.status == 503).then_some(()))
        },
    )
    .await?;

    // Redis comes back (empty): the breaker's probe succeeds, calls work.
    let _back = PrivateRedis::start(port)?;
    env::eventually("calls work again", Duration::from_secs(15), || {
        let mut sessions = sessions.clone();
        async move { Ok(sessions.put("conversation", "c2", "v", None).await.ok()) }
    })
    .await?;
    assert_eq!(
        sessions.get("conversation", "c2").await?.map(|s| s.value),
        Some(b"v".to_vec())
    );
    env::eventually("ready again", Duration::from_secs(15), || async {
        let r = env::http("GET", &format!("{}/healthz/ready", a.admin), None, None).await?;
        Ok((r.status == 200).then_some(()))
    })
    .await?;
    let _ = redis.port;
    Ok(())
}
