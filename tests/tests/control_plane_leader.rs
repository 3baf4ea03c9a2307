//! Leader election among real control-plane processes on the real Postgres,
//! with the lease in Postgres or in a Kubernetes Lease on the real API
//! server: one leader; a leader paused (SIGSTOP) past its lease is replaced
//! by a new term; its old epoch is refused by the database fence; woken
//! (SIGCONT), it steps down; a clean shutdown hands over at once.

use std::time::Duration;

use nix::sys::signal::Signal;
use statefabric_leader::Elector;
use statefabric_leader::pg::PgElector;
use statefabric_tests as env;
use statefabric_tests::process::{self, Service};

fn lease() -> String {
    format!("cp-{}", uuid::Uuid::new_v4().simple())
}

/// Where the lease lives: Postgres, or a Lease in this Kubernetes namespace.
#[derive(Clone, Copy)]
enum Backend<'a> {
    Postgres,
    Kubernetes { namespace: &'a str },
}

async fn control_plane(
    lease: &str,
    identity: &str,
    backend: Backend<'_>,
) -> anyhow::Result<Service> {
    let (app, admin) = (env::pg_app_url(), env::pg_admin_url());
    let kubeconfig = env::kube::kubeconfig_path().display().to_string();
    let mut vars = vec![];
    match backend {
        Backend::Postgres => vars.push(("STATEFABRIC_LEADER__BACKEND", "postgres")),
        Backend::Kubernetes { namespace } => vars.extend([
            ("STATEFABRIC_LEADER__BACKEND", "kubernetes"),
            ("STATEFABRIC_LEADER__KUBERNETES_NAMESPACE", namespace),
            ("KUBECONFIG", kubeconfig.as_str()),
        ]),
    }
    vars.extend([
        // Saga engines run only in the saga tests (one per database).
        ("STATEFABRIC_SAGAS__ENABLED", "false"),
        ("STATEFABRIC_LEADER__POSTGRES_URL", app.as_str()),
        ("STATEFABRIC_LEADER__POSTGRES_MIGRATE_URL", admin.as_str()),
        ("STATEFABRIC_LEADER__NAME", lease),
        ("STATEFABRIC_LEADER__IDENTITY", identity),
        ("STATEFABRIC_LEADER__TTL", "1500ms"),
        ("STATEFABRIC_LEADER__RENEW_EVERY", "200ms"),
    ]);
    let mut service = process::spawn("statefabric-control-plane", &[], &vars)?;
    service.ready().await?;
    Ok(service)
}

/// (leader?, epoch) from the process's metrics.
async fn role(service: &Service) -> anyhow::Result<(bool, u64)> {
    let body = env::http("GET", &format!("{}/metrics", service.admin), None, None)
        .await?
        .body;
    let value = |name: &str| {
        body.lines()
            .find(|l| l.split(' ').next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    Ok((
        value("statefabric_leader") == 1.0,
        value("statefabric_leader_epoch") as u64,
    ))
}

async fn pool() -> anyhow::Result<sqlx::PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env::pg_app_url())
        .await?)
}

async fn fence_accepts(pool: &sqlx::PgPool, lease: &str, epoch: u64) -> anyhow::Result<bool> {
    let result = sqlx::query("SELECT statefabric_check_epoch($1, $2)")
        .bind(lease)
        .bind(i64::try_from(epoch)?)
        .execute(pool)
        .await;
    match result {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("SF001") => Ok(false),
        Err(other) => Err(other.into()),
    }
}

#[tokio::test]
async fn a_lease_has_one_holder_and_every_new_term_a_larger_epoch() -> anyhow::Result<()> {
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    let pool = pool().await?;
    let name = lease();
    let a = PgElector::new(pool.clone(), &name, "a");
    let b = PgElector::new(pool.clone(), &name, "b");
    let ttl = Duration::from_millis(600);
    let first = a.acquire(ttl).await?.expect("free");
    assert_eq!(a.acquire(ttl).await?, Some(first), "renewal keeps the term");
    assert_eq!(b.acquire(ttl).await?, None, "held by a");
    assert!(fence_accepts(&pool, &name, first).await?);
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        !fence_accepts(&pool, &name, first).await?,
        "a lapsed term is fenced"
    );
    let second = b.acquire(ttl).await?.expect("lapsed");
    assert!(second > first);
    assert!(!fence_accepts(&pool, &name, first).await?);
    assert!(fence_accepts(&pool, &name, second).await?);
    assert_eq!(a.acquire(ttl).await?, None, "a must wait for b's lease");
    b.release(second).await?;
    let third = a.acquire(ttl).await?.expect("released");
    assert!(third > second);
    Ok(())
}

#[tokio::test]
async fn a_paused_leader_is_replaced_fenced_and_steps_down() -> anyhow::Result<()> {
    paused_leader_is_replaced_fenced_and_steps_down(Backend::Postgres).await
}

#[tokio::test]
async fn on_a_kubernetes_lease_a_paused_leader_is_replaced_fenced_and_steps_down()
-> anyhow::Result<()> {
    let client = env::kube::client().await?;
    let namespace = env::kube::TestNamespace::create(&client).await?;
    paused_leader_is_replaced_fenced_and_steps_down(Backend::Kubernetes {
        namespace: &namespace.name,
    })
    .await?;
    namespace.delete().await
}

#[tokio::test]
async fn the_kubernetes_lease_names_its_holder_and_is_freed_at_shutdown() -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let client = env::kube::client().await?;
    let namespace = env::kube::TestNamespace::create(&client).await?;
    let name = lease();
    let a = control_plane(
        &name,
        "cp-a",
        Backend::Kubernetes {
            namespace: &namespace.name,
        },
    )
    .await?;
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &namespace.name);
    let holder = |lease: Option<Lease>| lease.and_then(|l| l.spec).and_then(|s| s.holder_identity);
    // Leader once it holds both the Lease and the fence's term (a first
    // renewal that is slow leaves it a follower until the next one).
    env::eventually("a leads", Duration::from_secs(10), || async {
        Ok(role(&a).await?.0.then_some(()))
    })
    .await?;
    assert_eq!(
        holder(leases.get_opt(&name).await?).as_deref(),
        Some("cp-a")
    );
    let (code, _) = a.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    assert_eq!(
        holder(leases.get_opt(&name).await?),
        None,
        "released at shutdown"
    );
    namespace.delete().await
}

async fn paused_leader_is_replaced_fenced_and_steps_down(
    backend: Backend<'_>,
) -> anyhow::Result<()> {
    let name = lease();
    let a = control_plane(&name, "cp-a", backend).await?;
    let first = env::eventually("a leads", Duration::from_secs(10), || async {
        Ok(match role(&a).await? {
            (true, epoch) => Some(epoch),
            _ => None,
        })
    })
    .await?;
    let b = control_plane(&name, "cp-b", backend).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!role(&b).await?.0, "one leader at a time");

    a.signal(Signal::SIGSTOP)?;
    let second = env::eventually("b takes over", Duration::from_secs(10), || async {
        Ok(match role(&b).await? {
            (true, epoch) => Some(epoch),
            _ => None,
        })
    })
    .await?;
    assert!(second > first, "a new term: {second} after {first}");
    let pool = pool().await?;
    assert!(
        !fence_accepts(&pool, &name, first).await?,
        "the paused leader's writes would be refused"
    );
    a.signal(Signal::SIGCONT)?;
    env::eventually("a steps down", Duration::from_secs(5), || async {
        Ok((!role(&a).await?.0).then_some(()))
    })
    .await?;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(role(&b).await?, (true, second), "b keeps its term");
        assert!(!role(&a).await?.0, "a stays a follower");
    }
    assert!(fence_accepts(&pool, &name, second).await?);

    // A clean stop hands over at once, not after the lease runs out.
    let stopped = std::time::Instant::now();
    let (code, _) = b.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    let third = env::eventually("a leads again", Duration::from_secs(10), || async {
        Ok(match role(&a).await? {
            (true, epoch) => Some(epoch),
            _ => None,
        })
    })
    .await?;
    assert!(third > second);
    println!("handed over {:?} after SIGTERM", stopped.elapsed());
    Ok(())
}

#[tokio::test]
async fn the_control_plane_exports_its_postgres_pools() -> anyhow::Result<()> {
    let cp = control_plane(&lease(), "pools", Backend::Postgres).await?;
    let body = env::http("GET", &format!("{}/metrics", cp.admin), None, None)
        .await?
        .body;
    for metric in [
        "statefabric_store_pool_connections_in_use{pool=\"leader\"}",
        "statefabric_store_pool_connections_idle{pool=\"leader\"}",
        "statefabric_store_pool_connections_max{pool=\"leader\"} 4",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(metric)),
            "{metric} missing:\n{body}"
        );
    }
    let (code, _) = cp.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    Ok(())
}
