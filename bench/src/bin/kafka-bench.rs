//! Event commit to consumer, through both outbox paths in one run: the
//! control plane's built-in relay (transactional, Avro) and Debezium's
//! outbox connector (logical decoding, EventRouter), with a raw rdkafka
//! produce-to-consume baseline at the same rate.
//!
//! The paths are measured one after the other, each alone on the machine
//! (2 cores shared with Postgres and three JVMs): first the relay with the
//! connector stopped, then Debezium with no relay running (resumed, and
//! caught up with what it skipped before measuring), then the baselines:
//! raw Kafka transactions while the same appends load Postgres (no relay,
//! no connector: what Kafka transactions alone give under this write load),
//! and, with the machine otherwise idle, a raw idempotent producer and raw
//! transactions.
//! Events are appended to the real Postgres at a fixed rate (one appender
//! per aggregate, a batch every 10 ms, catching up after a slow append);
//! the harness notes when each append committed (its call returned), and
//! each consumer records the time from that commit to receiving the event
//! (found by the `event_id` header both paths set, so the harness spends no
//! CPU decoding what it receives).
//! The relay's time per stage (read, encode, wait, begin, produce, commit,
//! delete) is read from the control plane's metrics at the end of its
//! phase.
//!
//! Run against the test environment (testenv/up.sh), release build:
//!   cargo build --release -p statefabric-control-plane -p statefabric-bench
//!   target/release/kafka-bench --seconds 10 --rate 5000

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use statefabric_bench::{Latencies, report};
use statefabric_domain::{ExpectedVersion, NewEvent, StreamId};
use statefabric_store::pg::{PgConfig, PgEventStore};
use statefabric_store::{AppendRequest, EventStore, Scope};
use statefabric_tests as env;
use tokio::process::Command;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events per second appended.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Aggregates appended to at once (one appender each, a batch every
    /// 10 ms): the write transactions per second are 100 times this.
    #[arg(long, default_value_t = 8)]
    aggregates: u64,
    /// Only the two raw baselines: what this broker gives, without Postgres.
    #[arg(long)]
    baselines_only: bool,
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn since(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(now_micros() - micros).unwrap_or(0))
}

/// When each appended event committed, by event id (both paths carry it in
/// the `event_id` header, so receiving needs no decoding): `None` while its
/// append has not returned yet.
#[derive(Clone, Default)]
struct Commits(Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, Option<i64>>>>);

impl Commits {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<uuid::Uuid, Option<i64>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Before the append: these events are ours.
    fn expect(&self, ids: &[uuid::Uuid]) {
        self.lock().extend(ids.iter().map(|id| (*id, None)));
    }

    /// After the append returned.
    fn note(&self, ids: &[uuid::Uuid]) {
        let now = now_micros();
        self.lock().extend(ids.iter().map(|id| (*id, Some(now))));
    }

    /// When the event `message` carries committed; one seen before its
    /// append call returned counts from now (zero); one not appended by this
    /// phase (a warm-up event) is not counted.
    fn committed(&self, message: &BorrowedMessage<'_>) -> Option<i64> {
        let headers = message.headers()?;
        let id = headers
            .iter()
            .find(|h| h.key == "event_id")
            .and_then(|h| std::str::from_utf8(h.value?).ok())
            .and_then(|v| uuid::Uuid::parse_str(v).ok())?;
        let committed = self.lock().get(&id).copied()?;
        Some(committed.unwrap_or_else(now_micros))
    }
}

fn consumer(group: &str, committed_only: bool) -> anyhow::Result<StreamConsumer> {
    Ok(env::kafka::admin()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .set(
            "isolation.level",
            if committed_only {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()?)
}

/// What a consumer saw: each message's time from its source (commit, or
/// creation for the baselines) to receipt, and to the record's timestamp
/// (set by the producer when the record was handed to it).
#[derive(Default)]
struct Received {
    total: Latencies,
    to_producer: Latencies,
}

/// Subscribes once the topic exists; collects `expected` messages (or what
/// arrives before `deadline`). `source` gives a message's source time (µs
/// since the epoch), or `None` for a message not to count.
async fn collect(
    consumer: StreamConsumer,
    topic: String,
    expected: usize,
    deadline: Instant,
    source: impl Fn(&BorrowedMessage<'_>) -> Option<i64> + Send + 'static,
) -> anyhow::Result<Received> {
    while !consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(2))
        .is_ok_and(|m| {
            m.topics()
                .iter()
                .any(|t| t.name() == topic && !t.partitions().is_empty())
        })
    {
        anyhow::ensure!(Instant::now() < deadline, "{topic} never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.subscribe(&[&topic])?;
    let mut received = Received::default();
    while (received.total.count() as usize) < expected && Instant::now() < deadline {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        else {
            continue;
        };
        let message = message?;
        if let Some(from) = source(&message) {
            received.total.record(since(from));
            if let Some(ms) = message.timestamp().to_millis() {
                let micros = u64::try_from(ms * 1000 - from).unwrap_or(0);
                received.to_producer.record(Duration::from_micros(micros));
            }
        }
    }
    Ok(received)
}

/// The control plane's process and admin port.
async fn start_control_plane(run: &str) -> anyhow::Result<(tokio::process::Child, u16)> {
    let exe = std::env::current_exe()?.with_file_name("statefabric-control-plane");
    anyhow::ensure!(
        exe.is_file(),
        "{} missing: build it with --release",
        exe.display()
    );
    let admin_port = env::free_port();
    let child = Command::new(exe)
        .env(
            "STATEFABRIC_ADMIN__LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
        .env("STATEFABRIC_LEADER__BACKEND", "postgres")
        .env("STATEFABRIC_LEADER__POSTGRES_URL", env::pg_control_url())
        .env("STATEFABRIC_LEADER__NAME", format!("bench-{run}"))
        // The relay alone: the engine would also drive whatever sagas
        // earlier tests left running in the shared database.
        .env("STATEFABRIC_SAGAS__ENABLED", "false")
        .env("STATEFABRIC_RELAY__ENABLED", "true")
        .env("STATEFABRIC_RELAY__KAFKA_BOOTSTRAP", env::kafka_bootstrap())
        .envs(env::kafka::Principal::ControlPlane.process_env())
        .env("STATEFABRIC_RELAY__REGISTRY_URL", env::registry_url())
        .env(
            "STATEFABRIC_RELAY__TRANSACTIONAL_ID",
            format!("statefabric-outbox-relay-bench-{run}"),
        )
        .env("STATEFABRIC_RELAY__BATCH", "2000")
        .env("STATEFABRIC_RELAY__IDLE_POLL", "2ms")
        .env("STATEFABRIC_RELAY__TOPICS__REPLICATION", "1")
        .env("STATEFABRIC_RELAY__TOPICS__MIN_INSYNC_REPLICAS", "1")
        .kill_on_drop(true)
        .spawn()?;
    statefabric_bench::wait_ready("control plane", admin_port).await?;
    Ok((child, admin_port))
}

/// Appends `total` events of `stream_type` at the rate (one appender per
/// aggregate, a batch every 10 ms, bursting to catch up after a slow
/// append), noting when each append committed; returns how many were
/// appended and in how many seconds.
async fn append_at_rate(
    store: Arc<PgEventStore>,
    tenant: &statefabric_domain::TenantId,
    stream_type: &str,
    args: &Args,
    commits: &Commits,
) -> anyhow::Result<(usize, f64)> {
    let total = args.rate * args.seconds;
    let aggregates = args.aggregates.max(1);
    let per_tick = (args.rate / 100).max(aggregates);
    let per_batch = per_tick / aggregates;
    let batches = total / (per_batch * aggregates);
    let started = Instant::now();
    let mut appenders = Vec::new();
    for a in 0..aggregates {
        let (store, scope) = (store.clone(), Scope::new(tenant.clone(), "bench"));
        let (stream_type, commits) = (stream_type.to_owned(), commits.clone());
        appenders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for b in 0..batches {
                tick.tick().await;
                let events: Vec<NewEvent> = (0..per_batch)
                    .map(|i| NewEvent::new("Measured", json!({"a": a, "b": b, "i": i})))
                    .collect();
                let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
                commits.expect(&ids);
                store
                    .append(
                        &scope,
                        AppendRequest::new(
                            StreamId::new(format!("{stream_type}-{a}"))?,
                            &stream_type,
                            ExpectedVersion::Any,
                            events,
                        ),
                    )
                    .await?;
                commits.note(&ids);
            }
            anyhow::Ok(())
        }));
    }
    for appender in appenders {
        appender.await??;
    }
    Ok((
        usize::try_from(batches * per_batch * aggregates)?,
        started.elapsed().as_secs_f64(),
    ))
}

/// Phase 1: the relay alone (the Debezium connector stopped). Returns the
/// latencies, events appended, seconds, and the control plane's metrics.
async fn relay_phase(
    args: &Args,
    run: &str,
    store: Arc<PgEventStore>,
    tenant: &statefabric_domain::TenantId,
) -> anyhow::Result<(Received, usize, f64, String)> {
    env::kafka::stop_debezium().await?;
    let (_control_plane, admin_port) = start_control_plane(run).await?;
    let stream_type = format!("bench_{}", &run[..8]);
    warm_up(
        &store,
        tenant,
        &stream_type,
        &format!("events.{stream_type}"),
        true,
    )
    .await?;
    let total = usize::try_from(args.rate * args.seconds)?;
    let commits = Commits::default();
    let seen = commits.clone();
    let relay = tokio::spawn(collect(
        consumer(&format!("bench-relay-{run}"), true)?,
        format!("events.{stream_type}"),
        total,
        Instant::now() + Duration::from_secs(args.seconds + 60),
        move |message| seen.committed(message),
    ));
    let (appended, secs) = append_at_rate(store, tenant, &stream_type, args, &commits).await?;
    let latencies = tokio::time::timeout(Duration::from_secs(120), relay).await???;
    let metrics = env::http(
        "GET",
        &format!("http://127.0.0.1:{admin_port}/metrics"),
        None,
        None,
    )
    .await?
    .body;
    Ok((latencies, appended, secs, metrics))
}

/// Appends one event of `stream_type` and waits until it arrives on
/// `topic`: the path is up (topic made, schema registered, producers
/// initialized, a stopped connector caught up) before anything is measured.
async fn warm_up(
    store: &PgEventStore,
    tenant: &statefabric_domain::TenantId,
    stream_type: &str,
    topic: &str,
    committed_only: bool,
) -> anyhow::Result<()> {
    store
        .append(
            &Scope::new(tenant.clone(), "bench"),
            AppendRequest::new(
                StreamId::new(format!("{stream_type}-warm-up"))?,
                stream_type,
                ExpectedVersion::Any,
                vec![NewEvent::new("WarmUp", json!({}))],
            ),
        )
        .await?;
    let group = format!("bench-warm-up-{}", uuid::Uuid::new_v4().simple());
    let seen = collect(
        consumer(&group, committed_only)?,
        topic.to_owned(),
        1,
        Instant::now() + Duration::from_secs(180),
        |_| Some(now_micros()),
    )
    .await?;
    anyhow::ensure!(
        seen.total.count() == 1,
        "the warm-up event never reached {topic}"
    );
    Ok(())
}

/// Phase 2: Debezium alone (no relay running; the connector resumed and
/// caught up with what it skipped while stopped).
async fn debezium_phase(
    args: &Args,
    run: &str,
    store: Arc<PgEventStore>,
    tenant: &statefabric_domain::TenantId,
) -> anyhow::Result<(Latencies, usize, f64)> {
    env::kafka::register_debezium().await?;
    let stream_type = format!("cdc_{}", &run[..8]);
    let topic = format!("cdc.events.{stream_type}");
    // When this arrives, the backlog of phase 1 is behind.
    warm_up(&store, tenant, &stream_type, &topic, false).await?;
    let total = usize::try_from(args.rate * args.seconds)?;
    let commits = Commits::default();
    let seen = commits.clone();
    let debezium = tokio::spawn(collect(
        consumer(&format!("bench-cdc-{run}"), false)?,
        topic,
        total,
        Instant::now() + Duration::from_secs(args.seconds + 60),
        move |message| seen.committed(message),
    ));
    let (appended, secs) = append_at_rate(store, tenant, &stream_type, args, &commits).await?;
    let latencies = tokio::time::timeout(Duration::from_secs(120), debezium).await???;
    Ok((latencies.total, appended, secs))
}

/// A baseline message's payload: when it was made (µs since the epoch).
fn made_at(payload: &[u8]) -> Option<i64> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

/// Sends (key, payload) pairs to `topic` and waits for every acknowledgement.
async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    messages: &[(String, String)],
) -> anyhow::Result<()> {
    let deliveries = messages.iter().map(|(key, payload)| {
        producer.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
    });
    for delivery in futures::future::join_all(deliveries).await {
        delivery.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Phase 4: a raw idempotent producer and a consumer at the same rate.
async fn raw_phase(args: &Args, run: &str) -> anyhow::Result<(Latencies, usize, f64)> {
    let total = usize::try_from(args.rate * args.seconds)?;
    let keys = usize::try_from(args.aggregates.max(1))?;
    let per_tick = usize::try_from(args.rate / 100)?.max(keys);
    let topic = format!("bench-raw-{run}");
    let producer: FutureProducer = env::kafka::admin()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    let raw = tokio::spawn(collect(
        consumer(&format!("bench-raw-{run}"), false)?,
        topic.clone(),
        total,
        Instant::now() + Duration::from_secs(args.seconds + 60),
        |message| made_at(message.payload()?),
    ));
    let started = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while sent < total {
        tick.tick().await;
        let messages: Vec<(String, String)> = (0..per_tick)
            .map(|i| (format!("agg-{}", i % keys), now_micros().to_string()))
            .collect();
        send_all(&producer, &topic, &messages).await?;
        sent += per_tick;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((raw.await??.total, sent, secs))
}

/// Phase 5 (and 3): what Kafka transactions cost without the relay. Messages are
/// made at the rate (timestamped when made, as an outbox row is when
/// committed); one transactional producer sends everything made by the time
/// it is free as one transaction, as the relay does, to a topic with the
/// relay's partitions; a `read_committed` consumer receives them.
async fn raw_txn_phase(args: &Args, run: &str) -> anyhow::Result<(Latencies, usize, f64)> {
    let total = usize::try_from(args.rate * args.seconds)?;
    let keys = usize::try_from(args.aggregates.max(1))?;
    let per_tick = usize::try_from(args.rate / 100)?.max(keys);
    let topic = format!("bench-raw-txn-{run}");
    env::kafka::create_topic(&topic, 12).await?;
    let producer: FutureProducer = env::kafka::admin()
        .set("transactional.id", format!("bench-raw-txn-{run}"))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()?;
    let producer = Arc::new(producer);
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(Duration::from_secs(30))).await??;
    let raw = tokio::spawn(collect(
        consumer(&format!("bench-raw-txn-{run}"), true)?,
        topic.clone(),
        total,
        Instant::now() + Duration::from_secs(args.seconds + 60),
        |message| made_at(message.payload()?),
    ));
    let (made, mut ready) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let maker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0;
        while sent < total {
            tick.tick().await;
            for i in 0..per_tick {
                let _ = made.send((format!("agg-{}", i % keys), now_micros().to_string()));
            }
            sent += per_tick;
        }
    });
    let started = Instant::now();
    let mut sent = 0usize;
    while let Some(first) = ready.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = ready.try_recv() {
            batch.push(next);
        }
        producer.begin_transaction()?;
        send_all(&producer, &topic, &batch).await?;
        let committing = producer.clone();
        // As the relay commits (rust-rdkafka's own commit can stall 100 ms).
        tokio::task::spawn_blocking(move || {
            statefabric_kafka::txn::commit(&*committing, Duration::from_secs(10))
        })
        .await??;
        sent += batch.len();
    }
    maker.await?;
    let secs = started.elapsed().as_secs_f64();
    Ok((raw.await??.total, sent, secs))
}

/// Phase 3: raw transactions (as in phase 5) while the appends of phases 1
/// and 2 load Postgres at the same rate, with neither the relay nor the
/// connector running: Kafka transactions on this machine under this write
/// load (not a floor: one producer meets the CONCURRENT_TRANSACTIONS retry
/// that the relay's producers taking turns avoid).
async fn loaded_raw_txn_phase(
    args: &Args,
    run: &str,
    store: Arc<PgEventStore>,
    tenant: &statefabric_domain::TenantId,
) -> anyhow::Result<(Latencies, usize, f64)> {
    env::kafka::stop_debezium().await?;
    let stream_type = format!("load_{}", &run[..8]);
    let (commits, txn_run) = (Commits::default(), format!("{run}-loaded"));
    let (_, loaded) = tokio::try_join!(
        append_at_rate(store, tenant, &stream_type, args, &commits),
        raw_txn_phase(args, &txn_run),
    )?;
    Ok(loaded)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = uuid::Uuid::new_v4().simple().to_string();
    if args.baselines_only {
        let (raw, sent, raw_secs) = raw_phase(&args, &run).await?;
        let (raw_txn, txn_sent, txn_secs) = raw_txn_phase(&args, &run).await?;
        report_baselines((&raw, sent, raw_secs), (&raw_txn, txn_sent, txn_secs));
        return Ok(());
    }
    let tenant = statefabric_bench::fresh_tenant().await?;
    let store = Arc::new(
        PgEventStore::connect(PgConfig {
            url: env::pg_app_url(),
            max_connections: 8,
            ..PgConfig::default()
        })
        .await?,
    );
    env::kafka::register_debezium().await?;
    let relayed = relay_phase(&args, &run, store.clone(), &tenant).await;
    // Whatever happened, the connector runs again for what follows.
    let (debezium, cdc_appended, cdc_secs) =
        debezium_phase(&args, &run, store.clone(), &tenant).await?;
    let loaded = loaded_raw_txn_phase(&args, &run, store, &tenant).await;
    // Phases 2 and 3 ran with no relay: their outbox rows go with the rest.
    statefabric_bench::drop_tenant(&tenant).await?;
    let (relay, appended, append_secs, metrics) = relayed?;
    let (loaded, loaded_sent, loaded_secs) = loaded?;
    let (raw, sent, raw_secs) = raw_phase(&args, &run).await?;
    let (raw_txn, txn_sent, txn_secs) = raw_txn_phase(&args, &run).await?;
    // The connector runs again for whatever follows (tests, other runs).
    env::kafka::register_debezium().await?;

    println!(
        "per path: {appended} events appended in {append_secs:.1} s for the relay, {cdc_appended} in {cdc_secs:.1} s for Debezium (target {} /s, {} aggregates), release build\n",
        args.rate, args.aggregates
    );
    report(
        "relay: commit -> consumer",
        relay.total.count() as f64 / append_secs,
        "events",
        Some(&relay.total),
    );
    report(
        "  of which commit -> handed to producer",
        relay.to_producer.count() as f64 / append_secs,
        "events",
        Some(&relay.to_producer),
    );
    report(
        "debezium: commit -> consumer",
        debezium.count() as f64 / cdc_secs,
        "events",
        Some(&debezium),
    );
    report(
        "raw transactions under the append load",
        loaded.count() as f64 / loaded_secs,
        "msgs",
        Some(&loaded),
    );
    report_baselines((&raw, sent, raw_secs), (&raw_txn, txn_sent, txn_secs));
    println!(
        "received: relay {} / {appended}, debezium {} / {cdc_appended}, \
         raw transactions under load {} / {loaded_sent}",
        relay.total.count(),
        debezium.count(),
        loaded.count(),
    );
    let (_, r95, _) = relay.total.percentiles_ms();
    let (_, b95, _) = raw.percentiles_ms();
    let (_, t95, _) = raw_txn.percentiles_ms();
    let (_, l95, _) = loaded.percentiles_ms();
    println!(
        "relay p95 is {:.1}x the raw p95, {:.1}x the raw transactional p95 and \
         {:.1}x the raw transactional p95 under the append load",
        r95 / b95.max(0.001),
        r95 / t95.max(0.001),
        r95 / l95.max(0.001)
    );
    println!(
        "relay time by stage, per read (read, encode, wait) and per Kafka transaction \
         (the rest): mean, and the bucket holding the p95"
    );
    let stage_value = |stage: &str, suffix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "relay_stage_seconds_{suffix}{{stage=\"{stage}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    for stage in [
        "read", "encode", "wait", "begin", "produce", "commit", "delete",
    ] {
        let (sum, count) = (stage_value(stage, "sum"), stage_value(stage, "count"));
        println!(
            "  {stage:<8} {:>7.2} ms  p95 <= {:>6.1} ms  ({count} times)",
            1000.0 * sum / count.max(1.0),
            1000.0 * bucket_p95(&metrics, stage, count)
        );
    }
    Ok(())
}

fn report_baselines(
    (raw, sent, raw_secs): (&Latencies, usize, f64),
    (raw_txn, txn_sent, txn_secs): (&Latencies, usize, f64),
) {
    report(
        "raw rdkafka: produce -> consume",
        raw.count() as f64 / raw_secs,
        "msgs",
        Some(raw),
    );
    report(
        "raw rdkafka transactions: produce -> consume",
        raw_txn.count() as f64 / txn_secs,
        "msgs",
        Some(raw_txn),
    );
    println!(
        "received: raw {} / {sent}, raw transactions {} / {txn_sent}",
        raw.count(),
        raw_txn.count()
    );
}

/// The upper bound of the histogram bucket that holds the 95th percentile
/// of `stage` (Prometheus buckets are cumulative).
fn bucket_p95(metrics: &str, stage: &str, count: f64) -> f64 {
    let label = format!("stage=\"{stage}\"");
    metrics
        .lines()
        .filter(|l| l.contains("relay_stage_seconds_bucket{") && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let n: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le.parse::<f64>().unwrap_or(f64::INFINITY), n))
        })
        .find(|(_, n)| *n >= 0.95 * count)
        .map_or(f64::NAN, |(le, _)| le)
}
