//! Kafka helpers for the tests and benchmarks: topics of their own, and the
//! Debezium outbox connector's configuration pointed at the test
//! environment.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use statefabric_kafka::brokers::{Brokers, KafkaAuth};

/// The test broker's principals (`testenv/services.env`; their ACLs are in
/// `testenv/kafka-acls.tsv`). Tests set up and check with the admin; the
/// processes under test log in as the component they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// The super user.
    Admin,
    ControlPlane,
    Sidecar,
    Connect,
    /// Holds no ACL at all.
    Intruder,
}

impl Principal {
    fn key(self) -> &'static str {
        match self {
            Self::Admin => "ADMIN",
            Self::ControlPlane => "CONTROL",
            Self::Sidecar => "SIDECAR",
            Self::Connect => "CONNECT",
            Self::Intruder => "INTRUDER",
        }
    }

    pub fn auth(self) -> KafkaAuth {
        let key = self.key();
        KafkaAuth::scram(
            crate::setting(&format!("KAFKA_{key}_USER")),
            crate::setting(&format!("KAFKA_{key}_PASSWORD")),
        )
    }

    pub fn brokers(self) -> Brokers {
        Brokers::new(crate::kafka_bootstrap(), self.auth())
    }

    /// A client configuration logged in as this principal.
    pub fn client(self) -> ClientConfig {
        self.brokers().client()
    }

    /// The environment that logs a Statefabric process in as this principal.
    pub fn process_env(self) -> Vec<(&'static str, String)> {
        let auth = self.auth();
        vec![
            ("STATEFABRIC_KAFKA__USERNAME", auth.username),
            ("STATEFABRIC_KAFKA__PASSWORD", auth.password),
        ]
    }
}

/// Every payload of `topic`'s first `partitions` partitions, as a reader
/// with `isolation` (`read_committed` or `read_uncommitted`) sees them;
/// blocking, done when the topic has been quiet for two seconds.
pub fn read_all(topic: &str, partitions: i32, isolation: &str) -> anyhow::Result<Vec<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let reader: BaseConsumer = admin()
        .set("group.id", "unused-assign-only")
        .set("isolation.level", isolation)
        .create()?;
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    reader.assign(&list)?;
    let (mut out, mut idle) = (Vec::new(), 0);
    while idle < 8 {
        match reader.poll(std::time::Duration::from_millis(250)) {
            Some(m) => {
                idle = 0;
                out.push(String::from_utf8_lossy(m?.payload().unwrap_or_default()).into_owned());
            }
            None => idle += 1,
        }
    }
    Ok(out)
}

/// The state of a transactional id at its coordinator (`Empty`, `Ongoing`,
/// `PrepareAbort`, `CompleteAbort`, `CompleteCommit`, …), asked with Kafka's
/// own `TransactionsCommand` (librdkafka has no such call).
pub fn transaction_state(transactional_id: &str) -> anyhow::Result<String> {
    let text = admin_tool(
        "org.apache.kafka.tools.TransactionsCommand",
        &["describe", "--transactional-id", transactional_id],
    )?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let (header, values) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    let column = header
        .split_whitespace()
        .position(|c| c == "TransactionState")
        .ok_or_else(|| anyhow::anyhow!("no TransactionState column in: {text}"))?;
    values
        .split_whitespace()
        .nth(column)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no state in: {text}"))
}

/// Runs one of Kafka's own admin tools (Java; `class` is its main class)
/// as the admin against the test broker; its stdout.
pub fn admin_tool(class: &str, args: &[&str]) -> anyhow::Result<String> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| {
            anyhow::anyhow!("{name} is not set: source the env.sh testenv/up.sh writes")
        })
    };
    let output = std::process::Command::new("java")
        .args(["-cp", &var("STATEFABRIC_TEST_KAFKA_TOOLS_CLASSPATH")?])
        .arg(class)
        .args(["--bootstrap-server", &crate::kafka_bootstrap()])
        .args([
            "--command-config",
            &var("STATEFABRIC_TEST_KAFKA_ADMIN_PROPERTIES")?,
        ])
        .args(args)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "{class} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(text)
}

/// A client configuration for the tests' own setup and checks (the admin).
pub fn admin() -> ClientConfig {
    Principal::Admin.client()
}

/// Creates `name` with `partitions` partitions on the test broker.
pub async fn create_topic(name: &str, partitions: i32) -> anyhow::Result<()> {
    create(name, partitions, false).await
}

/// Makes `name` unless it exists (a topic other suites or earlier runs may
/// have made, which a fresh broker does not have).
pub async fn ensure_topic(name: &str, partitions: i32) -> anyhow::Result<()> {
    create(name, partitions, true).await
}

async fn create(name: &str, partitions: i32, may_exist: bool) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = admin().create()?;
    for result in admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) if may_exist => {}
            Err((topic, code)) => anyhow::bail!("creating {topic}: {code}"),
        }
    }
    Ok(())
}

/// The name the tests register the Debezium outbox connector under.
pub const DEBEZIUM_CONNECTOR: &str = "statefabric-outbox-test";

/// `k8s/charts/statefabric/files/kafka/debezium-outbox-connector.json` with the test environment's
/// database address and credentials, its own slot, single-broker topics,
/// and routing to `cdc.events.<aggregate type>` (beside the built-in
/// relay's `events.*`, not on them).
pub fn debezium_test_config() -> anyhow::Result<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s/charts/statefabric/files/kafka/debezium-outbox-connector.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let port = crate::pg_admin_url()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next().map(str::to_owned))
        .unwrap_or_default();
    for (key, value) in [
        ("database.hostname", "127.0.0.1".to_owned()),
        ("database.port", port),
        ("database.password", "statefabric_cdc".to_owned()),
        ("slot.name", "statefabric_outbox_test".to_owned()),
        (
            "transforms.outbox.route.topic.replacement",
            "cdc.events.${routedByValue}".to_owned(),
        ),
        ("topic.creation.default.replication.factor", "1".to_owned()),
        ("topic.creation.default.partitions", "3".to_owned()),
    ] {
        config[key] = json!(value);
    }
    Ok(config)
}

/// Registers (or updates) the test connector on the test Kafka Connect.
pub async fn register_debezium() -> anyhow::Result<()> {
    let url = format!(
        "{}/connectors/{DEBEZIUM_CONNECTOR}/config",
        crate::connect_url()
    );
    let config = debezium_test_config()?;
    let put = crate::http(
        "PUT",
        &url,
        Some("application/json"),
        Some(config.to_string()),
    )
    .await?;
    anyhow::ensure!(
        matches!(put.status, 200 | 201),
        "registering the connector: {} {}",
        put.status,
        put.body
    );
    // Connect answers the config PUT before its herder has written the new
    // connector's status: a restart or resume sent now gets 404 ("Status for
    // connector … not found") on a Connect that has never seen it. So act on
    // the status once it exists, and only where it asks for it.
    let status = crate::eventually(
        "the Debezium connector's status",
        std::time::Duration::from_secs(60),
        connector_status,
    )
    .await?;
    // A task that failed in an earlier run (Connect keeps it across runs)
    // starts again; a running one is left alone.
    let failed = |state: &serde_json::Value| state == "FAILED";
    let any_task_failed = status["tasks"]
        .as_array()
        .is_some_and(|tasks| tasks.iter().any(|task| failed(&task["state"])));
    if failed(&status["connector"]["state"]) || any_task_failed {
        connector_call("POST", "restart?includeTasks=true&onlyFailed=true").await?;
    }
    // Running again, if a benchmark stopped or paused it.
    if matches!(
        status["connector"]["state"].as_str(),
        Some("PAUSED" | "STOPPED")
    ) {
        connector_call("PUT", "resume").await?;
    }
    Ok(())
}

/// Stops the test connector (a benchmark measuring the relay alone) and
/// waits until its task is gone; [`register_debezium`] starts it again,
/// where it left off. A paused connector is not enough: its task keeps
/// reading the replication slot (and Postgres keeps decoding for it) until
/// its queue is full, which costs the machine a fifth of a core.
pub async fn stop_debezium() -> anyhow::Result<()> {
    connector_call("PUT", "stop").await?;
    crate::eventually(
        "the Debezium connector stopped",
        std::time::Duration::from_secs(60),
        || async {
            let stopped = connector_status().await?.is_some_and(|status| {
                status["connector"]["state"] == "STOPPED"
                    && status["tasks"].as_array().is_some_and(Vec::is_empty)
            });
            Ok(stopped.then_some(()))
        },
    )
    .await
}

/// The test connector's status from Connect's REST API; `None` while
/// Connect has none for it yet (404).
async fn connector_status() -> anyhow::Result<Option<serde_json::Value>> {
    let url = format!(
        "{}/connectors/{DEBEZIUM_CONNECTOR}/status",
        crate::connect_url()
    );
    let response = crate::http("GET", &url, None, None).await?;
    match response.status {
        404 => Ok(None),
        200 => Ok(Some(serde_json::from_str(&response.body)?)),
        other => anyhow::bail!("GET {url}: {other} {}", response.body),
    }
}

/// `method` on the test connector's `action` (Connect's REST API).
async fn connector_call(method: &str, action: &str) -> anyhow::Result<()> {
    let url = format!(
        "{}/connectors/{DEBEZIUM_CONNECTOR}/{action}",
        crate::connect_url()
    );
    let response = crate::http(method, &url, None, None).await?;
    anyhow::ensure!(
        matches!(response.status, 200..=204),
        "{method} connectors/{DEBEZIUM_CONNECTOR}/{action}: {} {}",
        response.status,
        response.body
    );
    Ok(())
}
