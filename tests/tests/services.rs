//! Smoke tests proving each service of the test environment is the real thing
//! and configured the way later features need it.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::Connection;
use statefabric_tests as env;

#[tokio::test]
async fn postgres_has_logical_wal_and_an_rls_bound_app_role() -> anyhow::Result<()> {
    let mut admin = sqlx::PgConnection::connect(&env::pg_admin_url())
        .await
        .context(env::START_HINT)?;
    let wal_level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&mut admin)
        .await?;
    assert_eq!(wal_level, "logical");
    let slots: String = sqlx::query_scalar("SHOW max_replication_slots")
        .fetch_one(&mut admin)
        .await?;
    assert!(
        slots.parse::<u32>()? >= 4,
        "max_replication_slots = {slots}"
    );
    let senders: String = sqlx::query_scalar("SHOW max_wal_senders")
        .fetch_one(&mut admin)
        .await?;
    assert!(senders.parse::<u32>()? >= 4, "max_wal_senders = {senders}");

    // The application role must be subject to Row-Level Security: not a
    // superuser and without BYPASSRLS.
    let mut app = sqlx::PgConnection::connect(&env::pg_app_url()).await?;
    let (superuser, bypass): (bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&mut app)
            .await?;
    assert!(!superuser && !bypass, "app role must not bypass RLS");
    Ok(())
}

#[tokio::test]
async fn redis_standalone_answers() -> anyhow::Result<()> {
    let client = redis::Client::open(env::redis_url())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context(env::START_HINT)?;
    let key = format!("smoke:{}", uuid::Uuid::new_v4());
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("v")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut conn)
        .await?;
    let value: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
    assert_eq!(value, "v");
    Ok(())
}

/// A key written through the cluster client lands on a primary, is acknowledged
/// by its replica (WAIT), and reads back both through the cluster client and
/// from the replica itself.
#[tokio::test]
async fn redis_cluster_replicates_to_a_replica() -> anyhow::Result<()> {
    let seeds = env::redis_cluster_urls();
    assert_eq!(seeds.len(), 6, "the cluster has 6 nodes: {seeds:?}");
    let cluster = redis::cluster::ClusterClient::new(seeds.clone())?;
    let mut cluster_conn = cluster
        .get_async_connection()
        .await
        .context(env::START_HINT)?;

    let key = format!("smoke:{}", uuid::Uuid::new_v4());
    let value = uuid::Uuid::new_v4().to_string();

    // Which node owns the key's slot, and which replicates it?
    let mut seed = redis::Client::open(seeds[0].as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&key)
        .query_async(&mut seed)
        .await?;
    let (primary_port, replica_ports) = slot_owners(&mut seed, slot).await?;
    assert!(!replica_ports.is_empty(), "slot {slot} has no replica");

    // Write on the owning primary and wait for a replica to acknowledge it.
    let mut primary = redis::Client::open(format!("redis://127.0.0.1:{primary_port}"))?
        .get_multiplexed_async_connection()
        .await?;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut primary).await?;
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"master".to_vec())),
        "node {primary_port} should be a primary"
    );
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .query_async(&mut primary)
        .await?;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query_async(&mut primary)
        .await?;
    assert!(acked >= 1, "no replica acknowledged the write");

    // Read through the cluster client (routing by slot) ...
    let through_cluster: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut cluster_conn)
        .await?;
    assert_eq!(through_cluster, value);

    // ... and from the replica directly, in READONLY mode.
    let mut replica = redis::Client::open(format!("redis://127.0.0.1:{}", replica_ports[0]))?
        .get_multiplexed_async_connection()
        .await?;
    let () = redis::cmd("READONLY").query_async(&mut replica).await?;
    let from_replica: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut replica)
        .await?;
    assert_eq!(from_replica, value);

    let () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut cluster_conn)
        .await
        .map(|_: i64| ())?;
    Ok(())
}

/// From `CLUSTER SLOTS`: the port of the primary and the ports of the replicas
/// serving `slot`.
async fn slot_owners(
    conn: &mut redis::aio::MultiplexedConnection,
    slot: i64,
) -> anyhow::Result<(i64, Vec<i64>)> {
    // Each entry: [start, end, [ip, port, id, ...], [ip, port, id, ...]...]
    let ranges: Vec<Vec<redis::Value>> =
        redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    for range in ranges {
        let start: i64 = redis::from_redis_value_ref(&range[0])?;
        let end: i64 = redis::from_redis_value_ref(&range[1])?;
        if (start..=end).contains(&slot) {
            let mut ports = Vec::new();
            for node in &range[2..] {
                let node: Vec<redis::Value> = redis::from_redis_value_ref(node)?;
                ports.push(redis::from_redis_value_ref::<i64>(&node[1])?);
            }
            let primary = ports.remove(0);
            return Ok((primary, ports));
        }
    }
    anyhow::bail!("no node serves slot {slot}")
}

/// A transactional producer's committed batch is visible to a
/// `read_committed` consumer; its aborted batch never is.
#[tokio::test]
async fn kafka_transactions_hide_aborted_batches() -> anyhow::Result<()> {
    let _bootstrap = env::kafka_bootstrap();
    let topic = format!("smoke-tx-{}", uuid::Uuid::new_v4());

    let admin: AdminClient<DefaultClientContext> = env::kafka::admin().create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context(env::START_HINT)?;
    for result in created {
        result.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }

    let producer: FutureProducer = env::kafka::admin()
        .set(
            "transactional.id",
            format!("smoke-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "10000")
        .create()?;
    let timeout = Duration::from_secs(20);
    producer.init_transactions(timeout)?;

    let send_batch = |prefix: &'static str| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            for i in 0..5 {
                let payload = format!("{prefix}-{i}");
                producer
                    .send(
                        FutureRecord::to(&topic).key("k").payload(&payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("send {payload}: {e}"))?;
            }
            anyhow::Ok(())
        }
    };

    producer.begin_transaction()?;
    send_batch("committed").await?;
    producer.commit_transaction(timeout)?;

    producer.begin_transaction()?;
    send_batch("aborted").await?;
    producer.abort_transaction(timeout)?;

    // A final committed marker: once the consumer sees it, everything before
    // it in the partition has been delivered or filtered.
    producer.begin_transaction()?;
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("end"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("send end: {e}"))?;
    producer.commit_transaction(timeout)?;

    let consumer: StreamConsumer = env::kafka::admin()
        .set("group.id", format!("smoke-{}", uuid::Uuid::new_v4()))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;

    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let message = consumer.recv().await?;
            let payload = message
                .payload_view::<str>()
                .transpose()?
                .unwrap_or_default()
                .to_owned();
            if payload == "end" {
                return anyhow::Ok(());
            }
            seen.push(payload);
        }
    })
    .await
    .context("the committed marker never arrived")??;

    let expected: Vec<String> = (0..5).map(|i| format!("committed-{i}")).collect();
    assert_eq!(
        seen, expected,
        "read_committed must see exactly the committed batch"
    );
    Ok(())
}

/// An Avro schema registered through the Confluent-compatible API comes back
/// by id, unchanged.
#[tokio::test]
async fn schema_registry_round_trips_an_avro_schema() -> anyhow::Result<()> {
    let registry = env::registry_url();
    let subject = format!("smoke-{}-value", uuid::Uuid::new_v4());
    let schema = serde_json::json!({
        "type": "record",
        "name": "SmokeEvent",
        "namespace": "dev.statefabric.smoke",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "version", "type": "long"}
        ]
    });
    let body =
        serde_json::json!({ "schemaType": "AVRO", "schema": schema.to_string() }).to_string();
    let registered = env::http(
        "POST",
        &format!("{registry}/subjects/{subject}/versions"),
        Some("application/vnd.schemaregistry.v1+json"),
        Some(body),
    )
    .await?;
    assert_eq!(registered.status, 200, "register: {}", registered.body);
    let id = registered.json()?["id"]
        .as_i64()
        .context("registration returned no id")?;

    let fetched = env::http("GET", &format!("{registry}/schemas/ids/{id}"), None, None).await?;
    assert_eq!(fetched.status, 200, "fetch: {}", fetched.body);
    let text = fetched.json()?["schema"]
        .as_str()
        .context("no schema in response")?
        .to_owned();
    let returned: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(returned, schema);

    // The subject lists exactly the version we registered.
    let versions = env::http(
        "GET",
        &format!("{registry}/subjects/{subject}/versions"),
        None,
        None,
    )
    .await?;
    assert_eq!(versions.json()?, serde_json::json!([1]));
    Ok(())
}

/// Kafka Connect runs with Debezium's Postgres connector on its plugin path.
#[tokio::test]
async fn kafka_connect_offers_the_debezium_postgres_connector() -> anyhow::Result<()> {
    let response = env::http(
        "GET",
        &format!("{}/connector-plugins", env::connect_url()),
        None,
        None,
    )
    .await?;
    assert_eq!(response.status, 200, "{}", response.body);
    let classes: BTreeSet<String> = response
        .json()?
        .as_array()
        .context("connector-plugins is not an array")?
        .iter()
        .filter_map(|p| p["class"].as_str().map(str::to_owned))
        .collect();
    assert!(
        classes.contains("io.debezium.connector.postgresql.PostgresConnector"),
        "plugins: {classes:?}"
    );
    Ok(())
}
