//! The built-in outbox relay end to end on the real Postgres, Kafka and
//! Schema Registry: events appended concurrently to several aggregates (two
//! idempotent writers racing on each) come
//! out of a control plane (the leader) on `events.<aggregate type>`, keyed by
//! aggregate id, Avro-encoded in the Confluent format, each exactly once in
//! this run, in order per aggregate, read with `read_committed`; the outbox
//! is emptied behind them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::json;
use statefabric_domain::{ExpectedVersion, NewEvent, StreamId, TenantId};
use statefabric_schema::messages::EventEnvelope;
use statefabric_schema::{AvroCodec, RegistryClient};
use statefabric_store::pg::{PgConfig, PgEventStore};
use statefabric_store::{AppendRequest, EventStore, Scope};
use statefabric_tests as env;
use statefabric_tests::process;

/// A relay drains every tenant's outbox: one relay test at a time.
static ONE_RELAY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appended_events_reach_their_topic_once_and_in_order() -> anyhow::Result<()> {
    let _alone = ONE_RELAY.lock().await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let stream_type = format!("relaytest_{}", &run[..8]);
    let topic = format!("events.{stream_type}");
    let admin = env::pg_admin_url();
    let lease = format!("relay-{run}");
    let bootstrap = env::kafka_bootstrap();
    let registry = env::registry_url();
    let txid = format!("statefabric-outbox-relay-test-{run}");
    // The consumer's group, watched by the control plane's lag monitor.
    let group = format!("relaygroup{run}");
    let lag_var = format!("STATEFABRIC_LAG__GROUPS__{}", group.to_uppercase());
    let mut vars = process::relay_vars(&lease, &txid);
    vars.extend([
        // Saga engines run only in the saga tests (one per database).
        ("STATEFABRIC_SAGAS__ENABLED", "false".to_owned()),
        ("STATEFABRIC_LEADER__TTL", "3s".to_owned()),
        ("STATEFABRIC_LEADER__RENEW_EVERY", "500ms".to_owned()),
        ("STATEFABRIC_RELAY__BATCH", "2000".to_owned()),
        ("STATEFABRIC_LAG__KAFKA_BOOTSTRAP", bootstrap.clone()),
        ("STATEFABRIC_LAG__INTERVAL", "200ms".to_owned()),
    ]);
    let mut env_vars: Vec<(&str, &str)> = process::borrowed(&vars);
    env_vars.push((&lag_var, &topic));
    let mut cp = process::spawn("statefabric-control-plane", &[], &env_vars)?;
    cp.ready().await?;

    let tenant = TenantId::new(format!("t-{}", &run[..12]))?;
    statefabric_db::pg::create_tenant(&admin, &tenant, "relay test").await?;
    let store = Arc::new(
        PgEventStore::connect(PgConfig {
            url: env::pg_app_url(),
            ..PgConfig::default()
        })
        .await?,
    );
    // Three aggregates, each written by two tasks at once in small batches,
    // with idempotency keys: claiming a key gives a transaction its id
    // before it appends, the case in which a stream's writers could
    // otherwise commit out of transaction-id order.
    let mut writers = Vec::new();
    for (a, w) in (0..3).flat_map(|a| [(a, 0), (a, 1)]) {
        let (store, tenant, stream_type) = (store.clone(), tenant.clone(), stream_type.clone());
        let run = run.clone();
        writers.push(tokio::spawn(async move {
            let id = StreamId::new(format!("agg-{a}"))?;
            for batch in 0..5 {
                let events = (0..2)
                    .map(|i| NewEvent::new("Happened", json!({"a": a, "w": w, "n": batch * 2 + i})))
                    .collect();
                let key = format!("{run}-{a}-{w}-{batch}");
                store
                    .append(
                        &Scope::new(tenant.clone(), "relay-test"),
                        AppendRequest::new(id.clone(), &stream_type, ExpectedVersion::Any, events)
                            .idempotent(statefabric_store::Idempotency::for_request(key, &batch)),
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }

    let consumer: StreamConsumer = env::kafka::admin()
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()?;
    let codec = AvroCodec::new(Arc::new(RegistryClient::new(
        &registry,
        Duration::from_secs(10),
    )));
    let mut seen = BTreeSet::new();
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    // The outbox is shared: rows other test files left (tens of thousands
    // after the store tests) are relayed first, in commit order.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut subscribed = false;
    while seen.len() < 60 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of 60 events arrived",
            seen.len()
        );
        if !subscribed {
            // The relay creates the topic with its first batch.
            if consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .is_ok_and(|m| {
                    m.topics()
                        .iter()
                        .any(|t| t.name() == topic && !t.partitions().is_empty())
                })
            {
                consumer.subscribe(&[&topic])?;
                subscribed = true;
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        }
        let Ok(received) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await
        else {
            continue;
        };
        let message = received?;
        let envelope: EventEnvelope = codec
            .decode(message.payload().unwrap_or_default(), None)
            .await?;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        assert_eq!(key, envelope.stream_id, "keyed by aggregate id");
        assert_eq!(envelope.tenant_id, tenant.as_str());
        assert_eq!(envelope.stream_type, stream_type);
        let header = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "event_id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(header.as_deref(), Some(envelope.event_id.as_str()));
        let data: serde_json::Value = serde_json::from_slice(&envelope.payload)?;
        assert!(data.get("n").is_some(), "{data}");
        assert!(
            seen.insert(envelope.event_id.clone()),
            "event {} twice",
            envelope.event_id
        );
        versions.entry(key).or_default().push(envelope.version);
    }
    for (aggregate, v) in &versions {
        assert_eq!(*v, (1..=20).collect::<Vec<i64>>(), "order of {aggregate}");
    }
    // The outbox is emptied behind the relay.
    let owner = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await?;
    env::eventually("outbox emptied", Duration::from_secs(10), || {
        let (owner, tenant) = (owner.clone(), tenant.clone());
        async move {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM event_outbox WHERE tenant_id = $1")
                    .bind(tenant.as_str())
                    .fetch_one(&owner)
                    .await?;
            Ok((left == 0).then_some(()))
        }
    })
    .await?;
    // Read but not committed: the lag monitor sees the group at least 60
    // offsets behind (transaction markers take offsets too), then caught up
    // once it commits.
    let lag = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("statefabric_kafka_consumer_lag{") && l.contains(&group))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    env::eventually(
        "a lag of 60 or more reported",
        Duration::from_secs(20),
        || async {
            let m = env::http("GET", &format!("{}/metrics", cp.admin), None, None)
                .await?
                .body;
            Ok((lag(&m) >= 60.0).then_some(()))
        },
    )
    .await?;
    // Poll on a moment (nothing more arrives), which moves the position
    // past the last transaction's commit marker, then commit.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), consumer.recv())
            .await
            .is_err(),
        "no event beyond the 60"
    );
    consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)?;
    env::eventually("lag of 0 reported", Duration::from_secs(20), || async {
        let m = env::http("GET", &format!("{}/metrics", cp.admin), None, None)
            .await?
            .body;
        Ok((lag(&m) == 0.0).then_some(()))
    })
    .await?;
    let metrics = env::http("GET", &format!("{}/metrics", cp.admin), None, None)
        .await?
        .body;
    let sent = metrics
        .lines()
        .find(|l| l.starts_with("statefabric_relay_events_sent_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(sent >= 60.0, "{sent}");
    Ok(())
}

#[tokio::test]
async fn with_kafka_unreachable_the_breaker_opens_and_nothing_is_lost() -> anyhow::Result<()> {
    let _alone = ONE_RELAY.lock().await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (admin, control) = (env::pg_admin_url(), env::pg_control_url());
    let lease = format!("relay-down-{run}");
    let registry = env::registry_url();
    let mut cp = process::spawn(
        "statefabric-control-plane",
        &[],
        &[
            ("STATEFABRIC_LEADER__BACKEND", "postgres"),
            // Saga engines run only in the saga tests (one per database).
            ("STATEFABRIC_SAGAS__ENABLED", "false"),
            ("STATEFABRIC_LEADER__POSTGRES_URL", control.as_str()),
            ("STATEFABRIC_LEADER__POSTGRES_MIGRATE_URL", admin.as_str()),
            ("STATEFABRIC_LEADER__NAME", lease.as_str()),
            ("STATEFABRIC_RELAY__ENABLED", "true"),
            // Nothing listens there.
            ("STATEFABRIC_RELAY__KAFKA_BOOTSTRAP", "127.0.0.1:1"),
            ("STATEFABRIC_RELAY__REGISTRY_URL", registry.as_str()),
            ("STATEFABRIC_RELAY__TIMEOUT", "300ms"),
        ],
    )?;
    cp.ready().await?;
    let tenant = TenantId::new(format!("t-{}", &run[..12]))?;
    statefabric_db::pg::create_tenant(&admin, &tenant, "relay down").await?;
    let store = PgEventStore::connect(PgConfig {
        url: env::pg_app_url(),
        ..PgConfig::default()
    })
    .await?;
    store
        .append(
            &Scope::new(tenant.clone(), "relay-test"),
            AppendRequest::new(
                StreamId::new("agg-0")?,
                "relaydown",
                ExpectedVersion::Any,
                vec![NewEvent::new("Happened", json!({}))],
            ),
        )
        .await?;
    let metric = |body: &str, name: &str| {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    env::eventually(
        "the kafka breaker opens",
        Duration::from_secs(30),
        || async {
            let body = env::http("GET", &format!("{}/metrics", cp.admin), None, None)
                .await?
                .body;
            Ok(
                (metric(&body, "statefabric_circuit_state{dependency=\"kafka\"}") == Some(2.0))
                    .then_some(()),
            )
        },
    )
    .await?;
    // While it is open, failures stop piling up.
    let body = env::http("GET", &format!("{}/metrics", cp.admin), None, None)
        .await?
        .body;
    let failures = metric(&body, "statefabric_relay_failures_total").unwrap_or(0.0);
    assert!((5.0..=7.0).contains(&failures), "{failures} failures");
    // Nothing was lost: the event waits in the outbox.
    let owner = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM event_outbox WHERE tenant_id = $1")
        .bind(tenant.as_str())
        .fetch_one(&owner)
        .await?;
    assert_eq!(left, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_stopped_mid_transaction_aborts_it() -> anyhow::Result<()> {
    let _alone = ONE_RELAY.lock().await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let stream_type = format!("relaystop_{}", &run[..8]);
    let admin = env::pg_admin_url();
    let tenant = TenantId::new(format!("t-{}", &run[..12]))?;
    statefabric_db::pg::create_tenant(&admin, &tenant, "relay stop").await?;
    let store = Arc::new(
        PgEventStore::connect(PgConfig {
            url: env::pg_app_url(),
            ..PgConfig::default()
        })
        .await?,
    );
    // A stop lands mid-transaction only some of the time (the relay also
    // reads the outbox between transactions): try until one does. Each
    // try also checks that a stop between transactions leaves none open.
    let mut aborted = false;
    for attempt in 0..8 {
        let lease = format!("relay-stop-{run}-{attempt}");
        let txid = format!("statefabric-outbox-relay-stop-{run}-{attempt}");
        let mut vars = process::relay_vars(&lease, &txid);
        vars.extend([
            ("STATEFABRIC_SAGAS__ENABLED", "false".to_owned()),
            // Small batches: many transactions, each open a while.
            ("STATEFABRIC_RELAY__BATCH", "20".to_owned()),
            ("STATEFABRIC_RELAY__IDLE_POLL", "1ms".to_owned()),
        ]);
        let cp = process::spawn("statefabric-control-plane", &[], &process::borrowed(&vars));
        let mut cp = cp?;
        cp.ready().await?;
        let stop_writing = tokio_util::sync::CancellationToken::new();
        let writer = {
            let (store, tenant, stream_type, stop) = (
                store.clone(),
                tenant.clone(),
                stream_type.clone(),
                stop_writing.clone(),
            );
            tokio::spawn(async move {
                let id = StreamId::new("agg-0")?;
                let mut n = 0;
                while !stop.is_cancelled() {
                    let events = (0..5)
                        .map(|i| NewEvent::new("Happened", json!({"n": n * 5 + i})))
                        .collect();
                    store
                        .append(
                            &Scope::new(tenant.clone(), "relay-test"),
                            AppendRequest::new(
                                id.clone(),
                                &stream_type,
                                ExpectedVersion::Any,
                                events,
                            ),
                        )
                        .await?;
                    n += 1;
                }
                anyhow::Ok(())
            })
        };
        tokio::time::sleep(Duration::from_millis(1500 + 150 * attempt)).await;
        let (code, log) = cp.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
        stop_writing.cancel();
        writer.await??;
        assert_eq!(code, 0, "{log}");
        // Nothing fences this relay's transactional id now (no successor
        // starts), so a transaction it left open would stay `Ongoing` — and
        // hold every `read_committed` reader of its partitions back — for
        // its whole timeout (a minute).
        for producer in 0..statefabric_relay::PRODUCERS {
            // The relay's producers take turns (`<id>.0`, `<id>.1`, …).
            let id = format!("{txid}.{producer}");
            let state = {
                let id = id.clone();
                tokio::task::spawn_blocking(move || env::kafka::transaction_state(&id)).await??
            };
            assert!(
                matches!(
                    state.as_str(),
                    "CompleteAbort" | "CompleteCommit" | "Empty" | "PrepareAbort" | "PrepareCommit"
                ),
                "the relay's transaction {id} is {state} after its stop; its log:\n{}",
                log.lines()
                    .filter(|l| l.contains("relay"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        if log.contains("aborted the open relay transaction") {
            aborted = true;
            break;
        }
    }
    assert!(aborted, "no stop landed inside a transaction in 8 tries");
    Ok(())
}
