//! The saga engine across control-plane failures, on the real Postgres with
//! real processes: agents (SDK) answer through a real sidecar while
//! - the leading control plane is killed with SIGKILL in the middle of many
//!   sagas: the next leader finishes every one, and no step's effect is
//!   applied twice;
//! - the leader is paused (SIGSTOP) past its lease: the other replica takes
//!   over; resumed (SIGCONT), the old leader steps down and writes nothing
//!   (its epoch is refused), and every saga still ends exactly once.
//!
//! One saga engine per database at a time: the tests take turns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use sqlx::Row;
use statefabric_domain::TenantId;
use statefabric_sdk::StateClient;
use statefabric_tests as env;
use statefabric_tests::process::{self, Service, Storage};
use tokio_util::sync::CancellationToken;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn control_plane(lease: &str, identity: &str) -> anyhow::Result<Service> {
    let (control, admin) = (env::pg_control_url(), env::pg_admin_url());
    let mut service = process::spawn(
        "statefabric-control-plane",
        &[],
        &[
            ("STATEFABRIC_LEADER__BACKEND", "postgres"),
            ("STATEFABRIC_LEADER__POSTGRES_URL", control.as_str()),
            ("STATEFABRIC_LEADER__POSTGRES_MIGRATE_URL", admin.as_str()),
            ("STATEFABRIC_LEADER__NAME", lease),
            ("STATEFABRIC_LEADER__IDENTITY", identity),
            ("STATEFABRIC_LEADER__TTL", "1500ms"),
            ("STATEFABRIC_LEADER__RENEW_EVERY", "200ms"),
            ("STATEFABRIC_API__ALLOW_ANONYMOUS", "true"),
        ],
    )?;
    service.ready().await?;
    Ok(service)
}

async fn leads(service: &Service) -> anyhow::Result<bool> {
    let body = env::http("GET", &format!("{}/metrics", service.admin), None, None)
        .await?
        .body;
    Ok(body.lines().any(|l| l == "statefabric_leader 1"))
}

/// Effects applied by the test agents, per task key.
type Effects = Arc<Mutex<HashMap<String, u32>>>;

/// Slow enough (8 at a time per agent type, 50 ms each) that a kill lands
/// with most sagas still in flight.
fn agents(client: &StateClient, effects: &Effects, stop: &CancellationToken) {
    let effects = effects.clone();
    env::agents::approving(client, 8, Duration::from_millis(50), stop, move |task| {
        *effects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(task.key.clone())
            .or_default() += 1;
    });
}

struct Run {
    tenant: String,
    sidecar: Service,
    client: StateClient,
    effects: Effects,
    stop: CancellationToken,
}

async fn start_run(sagas: usize) -> anyhow::Result<Run> {
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    statefabric_db::pg::create_tenant(&env::pg_admin_url(), &TenantId::new(tenant.clone())?, "")
        .await?;
    let sidecar = process::sidecar(Storage::Postgres, &tenant, "agents", &[]).await?;
    let client = StateClient::connect(sidecar.grpc.clone()).await?;
    let effects: Effects = Arc::default();
    let stop = CancellationToken::new();
    let mut tasks = client.tasks();
    for i in 0..sagas {
        tasks
            .start_saga(
                "plan-code-critique",
                Some(&format!("{tenant}-{i}")),
                &json!({"task": format!("task {i}")}),
            )
            .await?;
    }
    // The agents start once every saga is started: starting them first let
    // all 200 finish while the last ones were still being started on a
    // slow run (seen in CI), leaving nothing in flight to kill. They take
    // at least 1.3 s for 200 sagas (8 at a time per agent type, 50 ms
    // each), so a test waiting for the first 10 meets the rest in flight.
    agents(&client, &effects, &stop);
    Ok(Run {
        tenant,
        sidecar,
        client,
        effects,
        stop,
    })
}

async fn count(pool: &sqlx::PgPool, tenant: &str, status: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM saga_instances WHERE tenant_id = $1 AND status = $2",
    )
    .bind(tenant)
    .bind(status)
    .fetch_one(pool)
    .await?)
}

/// Every saga DONE, each step's effect applied once, history epochs never
/// going back.
async fn check_exactly_once(run: &Run, sagas: usize) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&env::pg_admin_url()).await?;
    env::eventually("every saga is DONE", Duration::from_secs(90), || async {
        Ok((count(&pool, &run.tenant, "DONE").await? == i64::try_from(sagas)?).then_some(()))
    })
    .await?;
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga_tasks WHERE tenant_id = $1 AND status = 'completed'",
    )
    .bind(&run.tenant)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        completed,
        3 * i64::try_from(sagas)?,
        "PLAN, CODE, CRITIQUE once each"
    );
    let repeated = sqlx::query(
        "SELECT saga_id, step, visit FROM saga_tasks WHERE tenant_id = $1
          GROUP BY saga_id, step, visit HAVING count(*) FILTER (WHERE status = 'completed') <> 1",
    )
    .bind(&run.tenant)
    .fetch_all(&pool)
    .await?;
    assert!(
        repeated.is_empty(),
        "{} steps completed other than once",
        repeated.len()
    );
    let effects = run
        .effects
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks handed out twice: {twice:?}");
    let mine = effects
        .keys()
        .filter(|k| k.starts_with(&run.tenant))
        .count();
    assert!(mine >= 3 * sagas, "{mine} effects for {sagas} sagas");
    let backwards: i64 = sqlx::query(
        "SELECT count(*) AS n FROM saga_history h JOIN saga_instances i USING (saga_id)
          WHERE i.tenant_id = $1 AND h.epoch < (SELECT max(epoch) FROM saga_history p
                 WHERE p.saga_id = h.saga_id AND p.revision < h.revision)",
    )
    .bind(&run.tenant)
    .fetch_one(&pool)
    .await?
    .try_get("n")?;
    assert_eq!(
        backwards, 0,
        "a write under an older epoch after a newer one"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_flight_loses_nothing_and_repeats_nothing() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let lease = format!("sagas-{}", uuid::Uuid::new_v4().simple());
    let first = control_plane(&lease, "first").await?;
    env::eventually("first leads", Duration::from_secs(10), || async {
        Ok(leads(&first).await?.then_some(()))
    })
    .await?;
    const SAGAS: usize = 200;
    let run = start_run(SAGAS).await?;
    let pool = sqlx::PgPool::connect(&env::pg_admin_url()).await?;
    let started = env::eventually("some sagas done", Duration::from_secs(60), || async {
        Ok((count(&pool, &run.tenant, "DONE").await? >= 10).then_some(()))
    })
    .await;
    if let Err(err) = started {
        let statuses: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM saga_instances WHERE tenant_id = $1 GROUP BY 1",
        )
        .bind(&run.tenant)
        .fetch_all(&pool)
        .await?;
        let (_, stderr) = first.stop_with(Signal::SIGTERM).await?;
        anyhow::bail!("{err}: sagas by status {statuses:?}; control plane:\n{stderr}");
    }
    let done = count(&pool, &run.tenant, "DONE").await?;
    assert!(
        done < i64::try_from(SAGAS)?,
        "killed in the middle ({done} done)"
    );
    first.stop_with(Signal::SIGKILL).await.ok();

    let second = control_plane(&lease, "second").await?;
    check_exactly_once(&run, SAGAS).await?;
    env::eventually("second leads", Duration::from_secs(10), || async {
        Ok(leads(&second).await?.then_some(()))
    })
    .await?;
    run.stop.cancel();
    drop(run.client);
    run.sidecar.stop_with(Signal::SIGTERM).await?;
    second.stop_with(Signal::SIGTERM).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_is_replaced_and_steps_down_without_writing() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let lease = format!("sagas-{}", uuid::Uuid::new_v4().simple());
    let first = control_plane(&lease, "first").await?;
    env::eventually("first leads", Duration::from_secs(10), || async {
        Ok(leads(&first).await?.then_some(()))
    })
    .await?;
    let second = control_plane(&lease, "second").await?;
    assert!(!leads(&second).await?, "one leader");
    const SAGAS: usize = 100;
    let run = start_run(SAGAS).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.signal(Signal::SIGSTOP)?;
    env::eventually("second takes over", Duration::from_secs(15), || async {
        Ok(leads(&second).await?.then_some(()))
    })
    .await?;
    first.signal(Signal::SIGCONT)?;
    env::eventually("first steps down", Duration::from_secs(10), || async {
        Ok((!leads(&first).await?).then_some(()))
    })
    .await?;
    check_exactly_once(&run, SAGAS).await?;
    // One leader at the end (a renewal that lapses under load may hand the
    // lease over again; that is a new term, not two leaders).
    env::eventually("one leader", Duration::from_secs(10), || async {
        Ok((leads(&second).await? != leads(&first).await?).then_some(()))
    })
    .await?;
    run.stop.cancel();
    drop(run.client);
    run.sidecar.stop_with(Signal::SIGTERM).await?;
    first.stop_with(Signal::SIGTERM).await?;
    second.stop_with(Signal::SIGTERM).await?;
    Ok(())
}
