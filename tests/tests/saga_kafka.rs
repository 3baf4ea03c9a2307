//! Sagas on the Kafka transport, with real processes and services: the
//! engine writes each task to the outbox in its transition, the control
//! plane's relay publishes it to the tenant's command topic, a sidecar
//! consumes it for its agent (SDK), and the answer goes back over
//! `sagas.replies` to the leader's reply consumer. Every saga ends DONE, the
//! tasks were never claimed from the tables, and the command topic holds
//! the Avro commands.

use std::time::Duration;

use nix::sys::signal::Signal;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use statefabric_domain::TenantId;
use statefabric_sdk::StateClient;
use statefabric_tests as env;
use statefabric_tests::process::{self, Storage};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_and_replies_travel_through_the_outbox_and_kafka() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let admin = env::pg_admin_url();
    let (bootstrap, registry) = (env::kafka_bootstrap(), env::registry_url());
    let lease = format!("sagas-kafka-{run}");
    let txid = format!("statefabric-outbox-relay-sagas-{run}");
    let sidecar_login = env::kafka::Principal::Sidecar.process_env();
    let mut vars = process::relay_vars(&lease, &txid);
    vars.extend([
        ("STATEFABRIC_SAGAS__TRANSPORT", "kafka".to_owned()),
        ("STATEFABRIC_API__ALLOW_ANONYMOUS", "true".to_owned()),
    ]);
    let cp = process::spawn("statefabric-control-plane", &[], &process::borrowed(&vars));
    let mut cp = cp?;
    cp.ready().await?;

    let tenant = format!("t{}", &run[..12]);
    statefabric_db::pg::create_tenant(&admin, &TenantId::new(tenant.clone())?, "").await?;
    let sidecar = process::sidecar(
        Storage::Postgres,
        &tenant,
        "kafka-agents",
        &[
            ("STATEFABRIC_TASKS__TRANSPORT", "kafka"),
            ("STATEFABRIC_TASKS__KAFKA_BOOTSTRAP", bootstrap.as_str()),
            ("STATEFABRIC_TASKS__REGISTRY_URL", registry.as_str()),
            (sidecar_login[0].0, sidecar_login[0].1.as_str()),
            (sidecar_login[1].0, sidecar_login[1].1.as_str()),
        ],
    )
    .await?;
    let client = StateClient::connect(sidecar.grpc.clone()).await?;
    let stop = CancellationToken::new();
    env::agents::approving(&client, 16, Duration::ZERO, &stop, |_| {});
    const SAGAS: usize = 20;
    let mut tasks = client.tasks();
    for i in 0..SAGAS {
        tasks
            .start_saga(
                "plan-code-critique",
                Some(&format!("{tenant}-{i}")),
                &json!({"task": format!("task {i}")}),
            )
            .await?;
    }
    let pool = sqlx::PgPool::connect(&admin).await?;
    env::eventually("every saga is DONE", Duration::from_secs(90), || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM saga_instances WHERE tenant_id = $1 AND status = 'DONE'",
        )
        .bind(&tenant)
        .fetch_one(&pool)
        .await?;
        Ok((done == i64::try_from(SAGAS)?).then_some(()))
    })
    .await?;
    let (completed, claimed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'completed'), count(claimed_by)
           FROM saga_tasks WHERE tenant_id = $1",
    )
    .bind(&tenant)
    .fetch_one(&pool)
    .await?;
    assert_eq!(completed, 3 * i64::try_from(SAGAS)?);
    assert_eq!(claimed, 0, "no task was taken from the tables");
    // The plan's output carries the input the agent got from the command.
    let plan: Value = sqlx::query_scalar(
        "SELECT output FROM saga_tasks WHERE saga_id = $1 AND step = 'PLAN' AND status = 'completed'",
    )
    .bind(format!("{tenant}-0"))
    .fetch_one(&pool)
    .await?;
    assert_eq!(plan["input"]["task"], "task 0");

    let topic = statefabric_kafka::topics::tenant_commands_topic("planner", &tenant);
    let consumer: BaseConsumer = env::kafka::admin()
        .set("group.id", format!("check-{run}"))
        .create()?;
    let (low, high) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10))?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut messages = high - low;
    for p in metadata.topics()[0].partitions().iter().skip(1) {
        let (l, h) = consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
        messages += h - l;
    }
    assert!(
        messages >= i64::try_from(SAGAS)?,
        "{messages} planner commands on {topic}"
    );

    // A reply that does not decode goes to the reply topic's dead letters
    // (the engine's consumer runs on the consumer framework) and the
    // engine goes on.
    let garbage = format!("garbage-{run}");
    let producer: rdkafka::producer::FutureProducer =
        env::kafka::Principal::Sidecar.client().create()?;
    producer
        .send(
            rdkafka::producer::FutureRecord::to("sagas.replies")
                .key(&garbage)
                .payload(&garbage),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    env::eventually(
        "the garbage reply is a dead letter",
        Duration::from_secs(60),
        || {
            let garbage = garbage.clone();
            async move {
                let letters = tokio::task::spawn_blocking(|| {
                    statefabric_kafka::dead_letter::list(
                        &env::kafka::Principal::Admin.brokers(),
                        "dlq.sagas.replies",
                        usize::MAX,
                        Duration::from_secs(10),
                    )
                })
                .await??;
                Ok(letters
                    .iter()
                    .find(|l| l.payload.as_deref() == Some(garbage.as_bytes()))
                    .map(|l| {
                        assert_eq!(l.why["group"], "statefabric-saga-engine");
                        assert!(l.why["error"].starts_with("undecodable"), "{:?}", l.why);
                    }))
            }
        },
    )
    .await?;

    // The reply consumer's counts are exported by the control plane.
    let metrics = env::http("GET", &format!("{}/metrics", cp.admin), None, None)
        .await?
        .body;
    let dead_lettered = metrics
        .lines()
        .find(|l| {
            l.starts_with("statefabric_consumer_messages_total{")
                && l.contains("group=\"statefabric-saga-engine\"")
                && l.contains("outcome=\"dead_lettered\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(dead_lettered >= Some(1.0), "{metrics}");

    stop.cancel();
    drop(client);
    sidecar.stop_with(Signal::SIGTERM).await?;
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    Ok(())
}
