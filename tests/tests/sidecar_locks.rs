//! Locks through real sidecars sharing the real Redis Cluster: exclusivity
//! across sidecars, background renewal, loss notification, release at clean
//! shutdown, expiry after a crash, and bad input; every lock and session
//! mutation in the tenant's audit log, with its outcome.

use std::time::Duration;

use nix::sys::signal::Signal;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::locks_client::LocksClient;
use statefabric_sdk::{LockClient, StateClient};
use statefabric_tests::process::{self, Service, Storage};
use tonic::Code;

/// Sidecars of one tenant share the Redis Cluster for locks and Postgres
/// for state, as in production.
async fn sidecar(tenant: &str, identity: &str) -> anyhow::Result<Service> {
    let vars = process::redis_vars(true);
    process::sidecar(
        Storage::Postgres,
        tenant,
        identity,
        &process::borrowed(&vars),
    )
    .await
}

async fn locks(service: &Service) -> anyhow::Result<LockClient> {
    Ok(StateClient::connect(service.grpc.clone()).await?.locks())
}

fn tenant() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

fn name() -> String {
    format!("repo-{}", uuid::Uuid::new_v4().simple())
}

const NOW: Duration = Duration::ZERO;

#[tokio::test]
async fn locks_are_exclusive_across_sidecars_and_renew_themselves() -> anyhow::Result<()> {
    let t = tenant();
    let (a, b) = (sidecar(&t, "coder-a").await?, sidecar(&t, "coder-b").await?);
    let (mut la, mut lb) = (locks(&a).await?, locks(&b).await?);
    let n = name();
    let ttl = Duration::from_millis(600);
    let held = la.acquire(&n, ttl, NOW).await?.expect("free");
    // Held well past its lease length: renewal keeps it.
    tokio::time::sleep(ttl * 3).await;
    assert!(!held.is_lost());
    assert!(lb.acquire(&n, ttl, NOW).await?.is_none(), "still held by a");
    let holder = lb.inspect(&n).await?.expect("held");
    assert_eq!(
        (holder.owner.as_str(), holder.token),
        ("coder-a", held.token())
    );
    let token = held.token();
    held.release().await?;
    let next = lb.acquire(&n, ttl, NOW).await?.expect("released");
    assert!(next.token() > token, "fencing token increased");
    Ok(())
}

#[tokio::test]
async fn a_holder_is_told_at_once_when_its_lock_is_lost() -> anyhow::Result<()> {
    let t = tenant();
    let service = sidecar(&t, "coder").await?;
    let mut client = locks(&service).await?;
    let n = name();
    let mut held = client
        .acquire(&n, Duration::from_millis(900), NOW)
        .await?
        .expect("free");
    // Someone releases it behind the holder's back (e.g. an operator): the
    // next renewal is refused and the holder learns it.
    let mut raw = LocksClient::connect(service.grpc.clone()).await?;
    raw.release(pb::ReleaseRequest {
        name: n.clone(),
        token: held.token(),
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(5), held.lost()).await?;
    assert!(held.is_lost());
    Ok(())
}

#[tokio::test]
async fn clean_shutdown_releases_and_a_crash_expires() -> anyhow::Result<()> {
    let t = tenant();
    let waiter = sidecar(&t, "waiter").await?;
    let mut lw = locks(&waiter).await?;

    // Clean shutdown: released at once, long before the 30 s lease ends.
    let holder = sidecar(&t, "holder").await?;
    let n = name();
    let held = locks(&holder)
        .await?
        .acquire(&n, Duration::from_secs(30), NOW)
        .await?
        .expect("free");
    // Stop the client's renewal: only the sidecar's shutdown can free the
    // lock before its 30 s lease ends.
    drop(held);
    let (code, stderr) = holder.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        lw.acquire(&n, Duration::from_secs(5), Duration::from_secs(2))
            .await?
            .is_some(),
        "released at shutdown"
    );

    // A crash: nobody releases; the lease runs out and the lock frees itself.
    let crasher = sidecar(&t, "crasher").await?;
    let n = name();
    let held = locks(&crasher)
        .await?
        .acquire(&n, Duration::from_millis(700), NOW)
        .await?
        .expect("free");
    let token = held.token();
    drop(held);
    let (_code, _) = crasher.stop_with(Signal::SIGKILL).await?;
    let next = lw
        .acquire(&n, Duration::from_secs(5), Duration::from_secs(5))
        .await?
        .expect("freed by expiry");
    assert!(next.token() > token);
    Ok(())
}

#[tokio::test]
async fn bad_lock_requests_are_refused() -> anyhow::Result<()> {
    let service = sidecar(&tenant(), "coder").await?;
    let mut raw = LocksClient::connect(service.grpc.clone()).await?;
    let cases = [
        pb::AcquireRequest {
            name: String::new(),
            ttl_ms: 1000,
            wait_ms: 0,
        },
        pb::AcquireRequest {
            name: "bad name".into(),
            ttl_ms: 1000,
            wait_ms: 0,
        },
        pb::AcquireRequest {
            name: "ok".into(),
            ttl_ms: 0,
            wait_ms: 0,
        },
        pb::AcquireRequest {
            name: "ok".into(),
            ttl_ms: 1000,
            wait_ms: 999_999_999,
        },
    ];
    for request in cases {
        let status = raw.acquire(request.clone()).await.expect_err("invalid");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {}",
            status.message()
        );
    }
    let status = raw
        .renew(pb::RenewRequest {
            name: "never-taken".into(),
            token: 7,
            ttl_ms: 1000,
        })
        .await
        .expect_err("not held");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = raw
        .release(pb::ReleaseRequest {
            name: "never-taken".into(),
            token: 7,
        })
        .await
        .expect_err("not held");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        !raw.inspect(pb::InspectRequest { name: "ok".into() })
            .await?
            .into_inner()
            .held
    );
    Ok(())
}

/// The point of fencing tokens: a holder whose lease lapsed (here: its
/// renewal stopped, as if the process were paused) cannot write after the
/// lock's next holder has, even though it still believes it holds the lock.
#[tokio::test]
async fn a_lapsed_holder_is_fenced_out_of_the_event_store() -> anyhow::Result<()> {
    use serde_json::json;
    use statefabric_sdk::{Expected, NewEvent};

    let t = tenant();
    let (a, b) = (sidecar(&t, "coder-a").await?, sidecar(&t, "coder-b").await?);
    let (ca, cb) = (
        StateClient::connect(a.grpc.clone()).await?,
        StateClient::connect(b.grpc.clone()).await?,
    );
    let n = name();
    let stream = format!("repo-{}", uuid::Uuid::new_v4().simple());
    let ev = |s: &str| NewEvent::json("Committed", &json!({"by": s})).expect("json");

    let old = ca
        .locks()
        .acquire(&n, Duration::from_millis(300), NOW)
        .await?
        .expect("free");
    ca.clone()
        .append_fenced(&old, &stream, "repo", Expected::Any, vec![ev("a")])
        .await?;
    // a "pauses": its lease lapses, b takes the lock and writes.
    let old_token = old.token();
    let stale = {
        // Keep the lease's identity but stop its renewal.
        let name = old.name().to_owned();
        drop(old);
        (name, old_token)
    };
    let new = cb
        .locks()
        .acquire(&n, Duration::from_secs(10), Duration::from_secs(5))
        .await?
        .expect("lapsed");
    assert!(new.token() > stale.1);
    cb.clone()
        .append_fenced(&new, &stream, "repo", Expected::Any, vec![ev("b")])
        .await?;
    // a wakes up and writes with its old token: refused, nothing written.
    let mut raw =
        statefabric_proto::state::v1::events_client::EventsClient::connect(a.grpc.clone()).await?;
    let late = pb::AppendEventsRequest {
        stream_id: stream.clone(),
        stream_type: "repo".into(),
        expected: Some(Expected::Any.into()),
        events: vec![pb::NewEvent {
            event_type: "Committed".into(),
            data_json: br#"{"by":"a-late"}"#.to_vec(),
            ..Default::default()
        }],
        fence: Some(pb::Fence {
            lock: stale.0,
            token: stale.1,
        }),
    };
    let status = raw.append_events(late).await.expect_err("fenced out");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(status.message().contains("stale"), "{}", status.message());
    let events = ca.clone().read_stream(&stream, 1, 10).await?;
    let writers: Vec<_> = events
        .iter()
        .map(|e| e.data["by"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(writers, ["a", "b"]);
    Ok(())
}

/// Lock and session mutations land in the tenant's `audit_log` under the
/// sidecar's identity, with their outcome — a refused acquire too — and
/// what is still queued at a clean shutdown is written before the process
/// exits.
#[tokio::test]
async fn lock_and_session_mutations_are_audited() -> anyhow::Result<()> {
    let t = tenant();
    let (a, b) = (sidecar(&t, "coder-a").await?, sidecar(&t, "coder-b").await?);
    let (mut la, mut lb) = (locks(&a).await?, locks(&b).await?);
    let n = name();
    let ttl = Duration::from_millis(600);
    let held = la.acquire(&n, ttl, NOW).await?.expect("free");
    // Long enough for a renewal in the background.
    tokio::time::sleep(ttl).await;
    assert!(lb.acquire(&n, ttl, NOW).await?.is_none(), "held by a");
    let token = held.token();
    held.release().await?;
    let mut sessions = StateClient::connect(a.grpc.clone()).await?.sessions();
    sessions.put("conversation", "c1", "hello", None).await?;
    assert!(sessions.delete("conversation", "c1").await?);
    for sidecar in [a, b] {
        let (code, stderr) = sidecar.stop_with(Signal::SIGTERM).await?;
        assert_eq!(code, 0, "{stderr}");
    }
    let admin = sqlx::PgPool::connect(&statefabric_tests::pg_admin_url()).await?;
    let rows: Vec<(String, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT actor, action, target, details FROM audit_log
          WHERE tenant_id = $1 AND (action LIKE 'lock.%' OR action LIKE 'session.%')
          ORDER BY audit_id",
    )
    .bind(&t)
    .fetch_all(&admin)
    .await?;
    let find = |actor: &str, action: &str, outcome: &str| {
        rows.iter()
            .find(|(who, what, _, details)| {
                who == actor && what == action && details["outcome"] == outcome
            })
            .cloned()
    };
    let acquired = find("coder-a", "lock.acquire", "acquired").expect("acquire audited");
    assert_eq!(
        (acquired.2.as_str(), &acquired.3["token"]),
        (n.as_str(), &serde_json::json!(token))
    );
    assert!(find("coder-a", "lock.renew", "done").is_some(), "{rows:?}");
    let refused = find("coder-b", "lock.acquire", "held_by_another").expect("refusal audited");
    assert_eq!(refused.2, n);
    let released = find("coder-a", "lock.release", "done").expect("release audited");
    assert_eq!(released.3["token"], serde_json::json!(token));
    let put = find("coder-a", "session.put", "done").expect("session write audited");
    assert_eq!(put.2, "conversation/c1");
    let deleted = find("coder-a", "session.delete", "done").expect("session delete audited");
    assert_eq!(deleted.3["existed"], true);
    Ok(())
}
