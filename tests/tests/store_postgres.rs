//! The event store on the real Postgres: the shared contract, plus what only
//! Postgres has — Row-Level Security against crafted queries, the outbox
//! trigger, append-only audit, and the gap-free feed under slow transactions.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use statefabric_domain::{Checkpoint, ExpectedVersion, NewEvent, StreamId, TenantId};
use statefabric_store::pg::{self, PgConfig, PgEventStore};
use statefabric_store::{AppendRequest, EventStore, FeedOptions, Scope, subscribe_all};
use statefabric_tests as env;
use statefabric_tests::store_contract::Fixture;
use tokio::sync::OnceCell;

struct Postgres;

static MIGRATED: OnceCell<()> = OnceCell::const_new();

async fn migrated() {
    MIGRATED
        .get_or_init(|| async {
            statefabric_db::pg::migrate(&env::pg_admin_url())
                .await
                .unwrap_or_else(|e| panic!("migrations failed ({}): {e}", env::START_HINT));
        })
        .await;
}

fn config() -> PgConfig {
    PgConfig {
        url: env::pg_app_url(),
        max_connections: 8,
        ..PgConfig::default()
    }
}

async fn store_with(config: PgConfig) -> PgEventStore {
    migrated().await;
    PgEventStore::connect(config)
        .await
        .expect("connect as app role")
}

async fn new_tenant() -> TenantId {
    migrated().await;
    let tenant = TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple())).expect("tenant id");
    statefabric_db::pg::create_tenant(&env::pg_admin_url(), &tenant, "test")
        .await
        .expect("create tenant");
    tenant
}

#[async_trait::async_trait(?Send)]
impl Fixture for Postgres {
    async fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(store_with(config()).await)
    }

    async fn store_with_idempotency_ttl(&self, ttl: Duration) -> Arc<dyn EventStore> {
        Arc::new(
            store_with(PgConfig {
                idempotency_ttl: ttl,
                ..config()
            })
            .await,
        )
    }

    async fn context_store(&self) -> Arc<dyn statefabric_store::context::ContextStore> {
        Arc::new(store_with(config()).await)
    }

    async fn tenant(&self) -> TenantId {
        new_tenant().await
    }

    async fn idempotency_keys_stored(&self, tenant: &TenantId) -> i64 {
        let mut admin = PgConnection::connect(&env::pg_admin_url())
            .await
            .expect("admin");
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_one(&mut admin)
            .await
            .expect("count keys")
    }
}

statefabric_tests::store_contract_tests!(Postgres);

/// The contract again, with context stores acting for one tenant (as a
/// sidecar's do: `PgEventStore::connect_for`), whose plain writes take the
/// lock-free path. The first tenant a test asks for is the store's; later
/// ones are others, which the same store serves through transactions.
mod acting_for_one_tenant {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    struct OneTenant {
        own: OnceCell<TenantId>,
        handed_out: AtomicBool,
    }

    impl OneTenant {
        fn new() -> Self {
            Self {
                own: OnceCell::new(),
                handed_out: AtomicBool::new(false),
            }
        }

        async fn own(&self) -> TenantId {
            self.own.get_or_init(new_tenant).await.clone()
        }
    }

    #[async_trait::async_trait(?Send)]
    impl Fixture for OneTenant {
        async fn store(&self) -> Arc<dyn EventStore> {
            Postgres.store().await
        }

        async fn store_with_idempotency_ttl(&self, ttl: Duration) -> Arc<dyn EventStore> {
            Postgres.store_with_idempotency_ttl(ttl).await
        }

        async fn context_store(&self) -> Arc<dyn statefabric_store::context::ContextStore> {
            let own = self.own().await;
            Arc::new(
                PgEventStore::connect_for(config(), &own)
                    .await
                    .expect("connect as app role"),
            )
        }

        async fn tenant(&self) -> TenantId {
            if self.handed_out.swap(true, Ordering::SeqCst) {
                new_tenant().await
            } else {
                self.own().await
            }
        }

        async fn idempotency_keys_stored(&self, tenant: &TenantId) -> i64 {
            Postgres.idempotency_keys_stored(tenant).await
        }
    }

    statefabric_tests::store_contract_tests!(OneTenant::new());
}

fn scope(tenant: &TenantId) -> Scope {
    Scope::new(tenant.clone(), "pg-test").with_trace_id("trace-pg")
}

fn stream() -> StreamId {
    StreamId::new(format!("s-{}", uuid::Uuid::new_v4().simple())).expect("stream id")
}

/// A new stream of `victim` holding one private event.
async fn secret_stream(store: &PgEventStore, victim: &TenantId) -> anyhow::Result<StreamId> {
    let id = stream();
    store
        .append(
            &scope(victim),
            AppendRequest::new(
                id.clone(),
                "task",
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Secret", json!({"plan": "private"}))],
            ),
        )
        .await?;
    Ok(id)
}

/// A raw connection as the application role, acting for `tenant` (or for no
/// tenant at all), to try what a buggy or malicious query could do.
async fn app_conn(tenant: Option<&TenantId>) -> anyhow::Result<PgConnection> {
    let mut conn = PgConnection::connect(&env::pg_app_url()).await?;
    if let Some(tenant) = tenant {
        sqlx::query("SELECT set_config('statefabric.tenant', $1, false)")
            .bind(tenant.as_str())
            .execute(&mut conn)
            .await?;
    }
    Ok(conn)
}

#[tokio::test]
async fn row_level_security_stops_crafted_cross_tenant_access() -> anyhow::Result<()> {
    let store = store_with(config()).await;
    let victim = new_tenant().await;
    let attacker = new_tenant().await;
    let id = secret_stream(&store, &victim).await?;
    store
        .save_snapshot(
            &scope(&victim),
            &statefabric_domain::Snapshot {
                stream_id: id.clone(),
                stream_type: "task".to_owned(),
                version: 1,
                state: json!({"plan": "private"}),
                schema_version: 1,
            },
        )
        .await?;

    use statefabric_store::context::{ContextChange, ContextStore, ContextWrite};
    store
        .write(
            &scope(&victim),
            ContextWrite {
                id: "plan".to_owned(),
                merge: statefabric_domain::MergeType::None,
                base: statefabric_domain::VectorClock::new(),
                change: ContextChange::Put(json!({"secret": true})),
                idempotency: None,
                fence: None,
                known: None,
            },
        )
        .await?;
    store
        .append(
            &scope(&victim),
            AppendRequest::new(
                id.clone(),
                "task",
                ExpectedVersion::Any,
                vec![NewEvent::new("Fenced", json!({}))],
            )
            .fenced("repo-lock", 1),
        )
        .await?;

    let mut conn = app_conn(Some(&attacker)).await?;
    // Reads naming the victim's tenant and stream explicitly see nothing.
    for table in [
        "event_store",
        "streams",
        "snapshots",
        "event_outbox",
        "audit_log",
        "context_documents",
        "context_revisions",
        "fences",
    ] {
        let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = $1");
        let visible: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(victim.as_str())
            .fetch_one(&mut conn)
            .await?;
        assert_eq!(visible, 0, "{table} leaks the victim's rows");
    }
    // Updates of the victim's rows touch nothing.
    let updated =
        sqlx::query("UPDATE streams SET version = 99 WHERE tenant_id = $1 AND stream_id = $2")
            .bind(victim.as_str())
            .bind(id.as_str())
            .execute(&mut conn)
            .await?
            .rows_affected();
    assert_eq!(updated, 0);
    let updated = sqlx::query("UPDATE context_documents SET content = '{}' WHERE tenant_id = $1")
        .bind(victim.as_str())
        .execute(&mut conn)
        .await?
        .rows_affected();
    assert_eq!(updated, 0);
    let updated = sqlx::query("UPDATE snapshots SET state = '{}' WHERE tenant_id = $1")
        .bind(victim.as_str())
        .execute(&mut conn)
        .await?
        .rows_affected();
    assert_eq!(updated, 0);
    // Writing rows that claim the victim's tenant is refused by the policy.
    let insert_event = sqlx::query(
        "INSERT INTO event_store (event_id, tenant_id, stream_id, stream_type, event_type, \
         event_schema_version, data, stream_version) \
         VALUES (gen_random_uuid(), $1, $2, 'task', 'Forged', 1, '{}', 2)",
    )
    .bind(victim.as_str())
    .bind(id.as_str())
    .execute(&mut conn)
    .await;
    let err = insert_event.expect_err("forged append must fail");
    assert!(err.to_string().contains("row-level security"), "{err}");
    let insert_snapshot = sqlx::query(
        "INSERT INTO snapshots (tenant_id, stream_id, stream_type, stream_version, state, state_schema_version) \
         VALUES ($1, $2, 'task', 1, '{}', 1) \
         ON CONFLICT (tenant_id, stream_id) DO UPDATE SET state = EXCLUDED.state",
    )
    .bind(victim.as_str())
    .bind(id.as_str())
    .execute(&mut conn)
    .await;
    assert!(insert_snapshot.is_err(), "forged snapshot must fail");

    // With no tenant set at all, nothing is visible.
    let mut anonymous = app_conn(None).await?;
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM event_store")
        .fetch_one(&mut anonymous)
        .await?;
    assert_eq!(visible, 0);

    // The victim's data is intact.
    assert_eq!(
        ContextStore::get(&store, &victim, "plan")
            .await?
            .map(|d| d.content),
        Some(json!({"secret": true}))
    );
    let events = store.read_stream(&victim, &id, 1, 10).await?;
    assert_eq!(events.len(), 2);
    let snapshot = store.load_snapshot(&victim, &id).await?.expect("snapshot");
    assert_eq!(snapshot.state, json!({"plan": "private"}));
    Ok(())
}

#[tokio::test]
async fn events_are_immutable_and_audit_is_insert_only_for_the_app() -> anyhow::Result<()> {
    let store = store_with(config()).await;
    let tenant = new_tenant().await;
    let id = stream();
    store
        .append(
            &scope(&tenant),
            AppendRequest::new(
                id.clone(),
                "task",
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Created", json!({}))],
            ),
        )
        .await?;
    let mut conn = app_conn(Some(&tenant)).await?;
    for sql in [
        "UPDATE event_store SET data = '{}'",
        "DELETE FROM event_store",
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
    ] {
        let err = sqlx::query(sql).execute(&mut conn).await.expect_err(sql);
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
    }
    let (actor, action, target, before, after, trace): (
        String,
        String,
        String,
        Option<i64>,
        Option<i64>,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT actor, action, target, version_before, version_after, trace_id \
             FROM audit_log WHERE target = $1",
    )
    .bind(format!("stream:{id}"))
    .fetch_one(&mut conn)
    .await?;
    assert_eq!(
        (
            actor.as_str(),
            action.as_str(),
            before,
            after,
            trace.as_deref()
        ),
        ("pg-test", "append", None, Some(1), Some("trace-pg"))
    );
    assert_eq!(target, format!("stream:{id}"));
    Ok(())
}

#[tokio::test]
async fn every_event_gets_its_outbox_row_in_the_same_transaction() -> anyhow::Result<()> {
    let store = store_with(config()).await;
    let tenant = new_tenant().await;
    let id = stream();
    let mut event = NewEvent::new("PlanDrafted", json!({"steps": 3}));
    event.metadata.traceparent =
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned());
    event.metadata.correlation_id = Some("corr-9".to_owned());
    let event_id = event.id;
    store
        .append(
            &scope(&tenant),
            AppendRequest::new(
                id.clone(),
                "plan",
                ExpectedVersion::NoStream,
                vec![event, NewEvent::new("PlanApproved", json!({}))],
            ),
        )
        .await?;

    let mut admin = PgConnection::connect(&env::pg_admin_url()).await?;
    let rows: Vec<(
        uuid::Uuid,
        String,
        String,
        String,
        serde_json::Value,
        serde_json::Value,
    )> = sqlx::query_as(
        "SELECT id, aggregatetype, aggregateid, type, payload, headers FROM event_outbox \
             WHERE tenant_id = $1 ORDER BY global_position",
    )
    .bind(tenant.as_str())
    .fetch_all(&mut admin)
    .await?;
    assert_eq!(rows.len(), 2);
    let (id0, aggregate_type, aggregate_id, event_type, payload, headers) = &rows[0];
    assert_eq!(*id0, event_id);
    assert_eq!(aggregate_type, "plan");
    assert_eq!(aggregate_id, id.as_str());
    assert_eq!(event_type, "PlanDrafted");
    assert_eq!(payload["data"], json!({"steps": 3}));
    assert_eq!(payload["stream_version"], json!(1));
    assert_eq!(headers["correlation_id"], json!("corr-9"));
    assert!(
        headers["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-0af7"))
    );

    // A failed append leaves no outbox row behind.
    let failed = store
        .append(
            &scope(&tenant),
            AppendRequest::new(
                id.clone(),
                "plan",
                ExpectedVersion::Exact(1),
                vec![NewEvent::new("Late", json!({}))],
            ),
        )
        .await;
    assert!(failed.is_err());
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM event_outbox WHERE tenant_id = $1")
        .bind(tenant.as_str())
        .fetch_one(&mut admin)
        .await?;
    assert_eq!(count, 2);
    Ok(())
}

/// The classic event-store bug: a transaction takes a global position, then
/// commits after later positions were already read. The feed must still
/// deliver it, because it never advances past a transaction still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_never_skips_an_event_from_a_slow_transaction() -> anyhow::Result<()> {
    let store = Arc::new(store_with(config()).await);
    let tenant = new_tenant().await;
    let options = FeedOptions {
        page_size: 100,
        poll_interval: Duration::from_millis(10),
        buffer: 256,
    };
    let mut feed = Box::pin(subscribe_all(
        store.clone(),
        tenant.clone(),
        Checkpoint::START,
        options,
    ));

    let mut written = BTreeSet::new();
    for round in 0..3 {
        // A slow transaction takes its position first and holds it open...
        let mut slow_tx = store.begin_for(&tenant).await?;
        let slow_event = NewEvent::new("Slow", json!({"round": round}));
        written.insert(slow_event.id);
        store
            .append_in(
                &mut slow_tx,
                &scope(&tenant),
                &AppendRequest::new(stream(), "task", ExpectedVersion::Any, vec![slow_event]),
            )
            .await?;
        // ...while fast writers take later positions and commit.
        for _ in 0..20 {
            let event = NewEvent::new("Fast", json!({"round": round}));
            written.insert(event.id);
            store
                .append(
                    &scope(&tenant),
                    AppendRequest::new(stream(), "task", ExpectedVersion::Any, vec![event]),
                )
                .await?;
        }
        // Give the feed every chance to run ahead of the open transaction.
        tokio::time::sleep(Duration::from_millis(300)).await;
        slow_tx.commit().await?;
    }

    let mut received = BTreeSet::new();
    let mut slow_seen = 0;
    while received.len() < written.len() {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!("feed stopped at {} of {}", received.len(), written.len())
            })?
            .expect("feed open")?;
        if event.event_type == "Slow" {
            slow_seen += 1;
        }
        assert!(
            received.insert(event.id),
            "duplicate delivery of {} at {} ({})",
            event.id,
            event.checkpoint,
            event.event_type
        );
    }
    assert_eq!(received, written);
    assert_eq!(slow_seen, 3);
    Ok(())
}

#[tokio::test]
async fn bad_configuration_is_unavailable_not_a_hang() -> anyhow::Result<()> {
    let result = PgEventStore::connect(PgConfig {
        url: "postgres://nobody:wrong@127.0.0.1:1/statefabric".to_owned(),
        acquire_timeout: Duration::from_secs(2),
        ..PgConfig::default()
    })
    .await;
    assert!(matches!(
        result,
        Err(statefabric_store::StoreError::Unavailable(_))
    ));
    Ok(())
}

#[tokio::test]
async fn pool_metrics_are_exported() -> anyhow::Result<()> {
    let store = store_with(config()).await;
    let mut registry = prometheus_client::registry::Registry::default();
    store.register_metrics(&mut registry);
    let tenant = new_tenant().await;
    store.read_all(&tenant, 1, 10).await?;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    for name in [
        "store_pool_connections_in_use",
        "store_pool_connections_idle",
        "store_pool_waiting",
    ] {
        assert!(
            text.contains(&format!("{name} ")),
            "{name} missing:\n{text}"
        );
    }
    let value = |name: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    // The connection may still be on its way back to the pool: count both.
    let open = value("store_pool_connections_in_use") + value("store_pool_connections_idle");
    assert!(open >= 1, "{text}");
    assert_eq!(value("store_pool_waiting"), 0, "{text}");
    Ok(())
}

/// `stream`'s events in the order the feed delivers them (transaction id,
/// then position: the relay reads the outbox in the same order), once all
/// `count` are past the feed's horizon (other tests' open transactions hold
/// it back).
async fn feed_order(
    store: &PgEventStore,
    tenant: &TenantId,
    stream: &StreamId,
    count: usize,
) -> anyhow::Result<Vec<(String, u64)>> {
    for _ in 0..200 {
        let events: Vec<(String, u64)> = store
            .read_feed(tenant, Checkpoint::START, 1000)
            .await?
            .into_iter()
            .filter(|e| &e.stream_id == stream)
            .map(|e| (e.event_type, e.stream_version))
            .collect();
        if events.len() >= count {
            return Ok(events);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the feed did not reach {count} events of {stream}")
}

/// A transaction takes its id at its first write. One that wrote something
/// else first and then appends to a stream that a later transaction has
/// meanwhile appended to and committed would land the next version with the
/// smaller id: the feed and the relay would deliver version 3 before
/// version 2. In a caller's transaction the append is refused instead, with
/// a retryable error, and nothing is written.
#[tokio::test]
async fn an_append_overtaken_in_a_callers_transaction_is_refused() -> anyhow::Result<()> {
    let store = store_with(config()).await;
    let tenant = new_tenant().await;
    let scope = scope(&tenant);
    for expected in [
        ExpectedVersion::Any,
        ExpectedVersion::StreamExists,
        ExpectedVersion::Exact(2),
    ] {
        let s = stream();
        let append = |event: &str, expected| {
            AppendRequest::new(
                s.clone(),
                "task",
                expected,
                vec![NewEvent::new(event, json!({}))],
            )
        };
        store
            .append(&scope, append("First", ExpectedVersion::Any))
            .await?;
        // The caller's transaction takes its id with a write elsewhere...
        let mut tx = store.begin_for(&tenant).await?;
        store.append_in(&mut tx, &scope, &elsewhere()).await?;
        // ...and a later transaction appends to the stream and commits.
        store
            .append(&scope, append("Overtook", ExpectedVersion::Any))
            .await?;

        let err = store
            .append_in(&mut tx, &scope, &append("Late", expected))
            .await
            .expect_err("an overtaken append must be refused");
        assert!(
            matches!(&err, statefabric_store::StoreError::WriteOrder { stream } if stream == &s),
            "{expected:?}: {err}"
        );
        assert!(err.is_transient(), "{err}");
        tx.rollback().await?;

        // A stale expectation is still reported as such, not as write order.
        let mut tx = store.begin_for(&tenant).await?;
        store.append_in(&mut tx, &scope, &elsewhere()).await?;
        let stale = store
            .append_in(&mut tx, &scope, &append("Stale", ExpectedVersion::Exact(1)))
            .await
            .expect_err("a stale expectation must be refused");
        assert!(
            matches!(stale, statefabric_store::StoreError::Concurrency { .. }),
            "{stale}"
        );
        tx.rollback().await?;

        // Nothing was written; run again, the append lands after the other.
        let mut tx = store.begin_for(&tenant).await?;
        store
            .append_in(&mut tx, &scope, &append("Late", expected))
            .await?;
        tx.commit().await?;
        assert_eq!(
            feed_order(&store, &tenant, &s, 3).await?,
            [
                ("First".to_owned(), 1),
                ("Overtook".to_owned(), 2),
                ("Late".to_owned(), 3)
            ],
            "{expected:?}"
        );
    }
    Ok(())
}

/// An append to a stream of its own.
fn elsewhere() -> AppendRequest {
    AppendRequest::new(
        stream(),
        "task",
        ExpectedVersion::Any,
        vec![NewEvent::new("Elsewhere", json!({}))],
    )
}

/// The same race through `EventStore::append`: an idempotent, fenced append
/// claims its key (its first write, which gives its transaction an id),
/// then waits for the fence row another transaction holds; meanwhile a
/// plain append to the same stream comes in. The stream's events must
/// still reach the feed and the outbox in version order: the plain append
/// waits for the stream's lock, which the fenced one took first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_racing_on_a_stream_reach_the_feed_in_version_order() -> anyhow::Result<()> {
    let store = Arc::new(store_with(config()).await);
    let tenant = new_tenant().await;
    let scope = scope(&tenant);
    let s = stream();
    let lock = format!("lock-{}", uuid::Uuid::new_v4().simple());
    let event = |event_type: &str| vec![NewEvent::new(event_type, json!({}))];
    store
        .append(
            &scope,
            AppendRequest::new(s.clone(), "task", ExpectedVersion::Any, event("First"))
                .fenced(&lock, 1),
        )
        .await?;

    // Hold the fence row, so the fenced append waits after claiming its key.
    let mut holder = PgConnection::connect(&env::pg_admin_url()).await?;
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await?;
    sqlx::query("BEGIN").execute(&mut holder).await?;
    sqlx::query("SELECT 1 FROM fences WHERE tenant_id = $1 AND lock_name = $2 FOR UPDATE")
        .bind(tenant.as_str())
        .bind(&lock)
        .execute(&mut holder)
        .await?;
    let append = |request: AppendRequest| {
        let (store, scope) = (store.clone(), scope.clone());
        tokio::spawn(async move { store.append(&scope, request).await })
    };
    let fenced = append(
        AppendRequest::new(s.clone(), "task", ExpectedVersion::Any, event("Fenced"))
            .idempotent(statefabric_store::Idempotency::for_request(
                format!("key-{lock}"),
                &"fenced",
            ))
            .fenced(&lock, 2),
    );
    let mut admin = PgConnection::connect(&env::pg_admin_url()).await?;
    let mut waiting = false;
    for _ in 0..200 {
        let waiters: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))",
        )
        .bind(holder_pid)
        .fetch_one(&mut admin)
        .await?;
        if waiters > 0 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(waiting, "the fenced append never waited for the fence row");

    let plain = append(AppendRequest::new(
        s.clone(),
        "task",
        ExpectedVersion::Any,
        event("Plain"),
    ));
    // Time for the plain append to overtake, were it not held back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    let fenced = fenced.await??;
    let plain = plain.await??;
    assert_eq!(
        (fenced.result.last_version, plain.result.last_version),
        (2, 3)
    );

    let in_order = [
        ("First".to_owned(), 1),
        ("Fenced".to_owned(), 2),
        ("Plain".to_owned(), 3),
    ];
    assert_eq!(feed_order(&store, &tenant, &s, 3).await?, in_order);
    // The relay's order: the outbox rows by transaction id, then position.
    let outbox: Vec<(String, i64)> = sqlx::query_as(
        "SELECT type, (payload->>'stream_version')::bigint FROM event_outbox \
          WHERE tenant_id = $1 AND aggregateid = $2 \
          ORDER BY transaction_id, global_position",
    )
    .bind(tenant.as_str())
    .bind(s.as_str())
    .fetch_all(&mut admin)
    .await?;
    let outbox: Vec<(String, u64)> = outbox
        .into_iter()
        .map(|(t, v)| (t, u64::try_from(v).unwrap_or_default()))
        .collect();
    assert_eq!(outbox, in_order);
    Ok(())
}

#[tokio::test]
async fn a_tenant_login_reaches_its_own_tenant_whatever_the_session_names() -> anyhow::Result<()> {
    let store = store_with(config()).await;
    let victim = new_tenant().await;
    let attacker = new_tenant().await;
    let id = secret_stream(&store, &victim).await?;
    let password = uuid::Uuid::new_v4().simple().to_string();
    let role =
        statefabric_db::pg::create_tenant_login(&env::pg_admin_url(), &attacker, &password).await?;
    assert!(role.starts_with("sft_"), "{role}");

    // The attacker's own login, naming the victim's tenant: nothing.
    let mut conn = PgConnection::connect(&env::pg_url(&role, &password)).await?;
    sqlx::query("SELECT set_config('statefabric.tenant', $1, false)")
        .bind(victim.as_str())
        .execute(&mut conn)
        .await?;
    for table in ["event_store", "streams", "audit_log", "tenants"] {
        let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = $1");
        let visible: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(victim.as_str())
            .fetch_one(&mut conn)
            .await?;
        assert_eq!(
            visible, 0,
            "{table}: a tenant login read another tenant's rows"
        );
    }
    let written = sqlx::query(
        "INSERT INTO streams (tenant_id, stream_id, stream_type, version) VALUES ($1, 'planted', 'task', 1)",
    )
    .bind(victim.as_str())
    .execute(&mut conn)
    .await;
    let refused = written.expect_err("a write for another tenant is refused");
    assert!(
        refused.to_string().contains("row-level security"),
        "{refused}"
    );
    conn.close().await?;

    // The same login works as the store's for its own tenant.
    let own = PgEventStore::connect(PgConfig {
        url: env::pg_url(&role, &password),
        max_connections: 2,
        ..PgConfig::default()
    })
    .await?;
    let mine = stream();
    own.append(
        &scope(&attacker),
        AppendRequest::new(
            mine.clone(),
            "task",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Mine", json!({}))],
        ),
    )
    .await?;
    assert_eq!(own.read_stream(&attacker, &mine, 1, 10).await?.len(), 1);
    // Acting for the victim through the store: refused, not leaked.
    let leaked = own.read_stream(&victim, &id, 1, 10).await;
    assert!(
        leaked.map(|events| events.is_empty()).unwrap_or(true),
        "the victim's stream read through the attacker's login"
    );

    // An application login bound to no tenant is as before.
    let mut unbound = app_conn(Some(&victim)).await?;
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM event_store WHERE tenant_id = $1")
        .bind(victim.as_str())
        .fetch_one(&mut unbound)
        .await?;
    assert_eq!(visible, 1);
    Ok(())
}

/// Context writes are announced after their commit (migration 0029: no
/// trigger), from the lock-free path and from the locked one (a keyed
/// write); a keyed write replayed is not announced again.
#[tokio::test]
async fn context_writes_are_announced_on_the_channel_after_commit() -> anyhow::Result<()> {
    use statefabric_store::Idempotency;
    use statefabric_store::context::{ContextChange, ContextStore, ContextWrite};
    let tenant = new_tenant().await;
    let store = PgEventStore::connect_for(config(), &tenant).await?;
    let mut listener = sqlx::postgres::PgListener::connect(&env::pg_app_url()).await?;
    listener.listen(pg::CONTEXT_CHANNEL).await?;
    let write = |idempotency: Option<Idempotency>, n: u64| ContextWrite {
        id: "plan".to_owned(),
        merge: statefabric_domain::MergeType::LwwRegister,
        base: statefabric_domain::VectorClock::new(),
        change: ContextChange::Put(json!({"step": n})),
        idempotency,
        fence: None,
        known: None,
    };
    let scope = scope(&tenant);
    let first = store.write(&scope, write(None, 1)).await?;
    let keyed = Idempotency::for_request("k-1", &json!({"step": 2}));
    let second = store.write(&scope, write(Some(keyed.clone()), 2)).await?;
    let replayed = store.write(&scope, write(Some(keyed), 2)).await?;
    assert!(replayed.replayed);
    let heard: Vec<String> = [first.document.revision, second.document.revision]
        .iter()
        .map(|revision| format!("{tenant} plan {revision}"))
        .collect();
    let mut got = Vec::new();
    while got.len() < heard.len() {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await??;
        if n.payload().starts_with(tenant.as_str()) {
            got.push(n.payload().to_owned());
        }
    }
    assert_eq!(got, heard);
    // Nothing more for this tenant: the replay was not announced.
    let more = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let n = listener.recv().await?;
            if n.payload().starts_with(tenant.as_str()) {
                return Ok::<_, sqlx::Error>(n.payload().to_owned());
            }
        }
    })
    .await;
    assert!(more.is_err(), "announced again: {more:?}");
    Ok(())
}

/// A pooled connection whose server backend went away (a Postgres restart,
/// a proxy's idle cut) is found dead before it is handed out again once it
/// has idled past `PING_IF_IDLE_FOR`, and replaced: the caller sees no
/// error. (Connections used more recently skip that round trip.)
#[tokio::test]
async fn a_pooled_connection_killed_while_idle_is_replaced() -> anyhow::Result<()> {
    migrated().await;
    let name = format!("reconnect-{}", uuid::Uuid::new_v4().simple());
    let url = env::pg_app_url();
    let mut options = statefabric_db::pg::PoolOptions::new(&url, 1);
    options.application_name = &name;
    let pool = statefabric_db::pg::connect(&options).await?;
    let before: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await?;

    let mut admin = PgConnection::connect(&env::pg_admin_url()).await?;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&name)
    .fetch_all(&mut admin)
    .await?;
    assert_eq!(killed, vec![true], "the pool's one backend");
    tokio::time::sleep(statefabric_db::pg::PING_IF_IDLE_FOR + Duration::from_millis(300)).await;

    let after: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    assert_ne!(before, after, "a new backend serves the pool");
    pool.close().await;
    Ok(())
}
