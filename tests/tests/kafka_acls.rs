//! Kafka security on the real broker, which the test environment runs with
//! SASL/SCRAM and the standard ACL authorizer: the Strimzi users in
//! `k8s/charts/statefabric/files/kafka/users.yaml` grant what the test broker grants, and a
//! principal is refused where it holds no ACL, with nothing written.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use statefabric_tests as env;
use statefabric_tests::kafka::Principal;

/// (user, resource type, pattern, name, operation)
type Grant = (String, String, String, String, String);

fn repo_file(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path),
    )?)
}

fn principal(short: &str) -> anyhow::Result<Principal> {
    Ok(match short {
        "control" => Principal::ControlPlane,
        "sidecar" => Principal::Sidecar,
        "connect" => Principal::Connect,
        other => anyhow::bail!("kafka-acls.tsv names an unknown principal {other:?}"),
    })
}

fn test_broker_grants() -> anyhow::Result<BTreeSet<Grant>> {
    let mut grants = BTreeSet::new();
    for line in repo_file("testenv/kafka-acls.tsv")?.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [who, resource, pattern, name, operations] = fields[..] else {
            anyhow::bail!("kafka-acls.tsv: not five tab-separated fields: {line:?}");
        };
        let user = principal(who)?.auth().username;
        let pattern = if pattern == "prefixed" {
            "prefix"
        } else {
            pattern
        };
        for op in operations.split(',') {
            grants.insert((
                user.clone(),
                resource.to_owned(),
                pattern.to_owned(),
                name.to_owned(),
                op.to_owned(),
            ));
        }
    }
    Ok(grants)
}

fn strimzi_grants() -> anyhow::Result<BTreeSet<Grant>> {
    let mut grants = BTreeSet::new();
    for doc in repo_file("k8s/charts/statefabric/files/kafka/users.yaml")?
        .split("\n---\n")
        .skip(1)
    {
        let user: Value = yaml_serde::from_str(doc)?;
        assert_eq!(user["kind"], "KafkaUser");
        assert_eq!(user["spec"]["authentication"]["type"], "scram-sha-512");
        assert_eq!(user["spec"]["authorization"]["type"], "simple");
        let name = user["metadata"]["name"].as_str().unwrap_or_default();
        let acls = user["spec"]["authorization"]["acls"].as_array();
        for acl in acls.into_iter().flatten() {
            let resource = &acl["resource"];
            let kind = resource["type"].as_str().unwrap_or_default();
            let (pattern, target) = if kind == "cluster" {
                ("literal", "kafka-cluster")
            } else {
                (
                    resource["patternType"].as_str().unwrap_or("literal"),
                    resource["name"].as_str().unwrap_or_default(),
                )
            };
            for op in acl["operations"].as_array().into_iter().flatten() {
                grants.insert((
                    name.to_owned(),
                    kind.to_owned(),
                    pattern.to_owned(),
                    target.to_owned(),
                    op.as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    Ok(grants)
}

#[test]
fn the_strimzi_users_grant_what_the_test_broker_grants() -> anyhow::Result<()> {
    let (test, production) = (test_broker_grants()?, strimzi_grants()?);
    assert!(test.len() > 20, "{test:?}");
    assert_eq!(
        production.difference(&test).collect::<Vec<_>>(),
        Vec::<&Grant>::new(),
        "granted in k8s only"
    );
    assert_eq!(
        test.difference(&production).collect::<Vec<_>>(),
        Vec::<&Grant>::new(),
        "granted in the test environment only"
    );
    Ok(())
}

async fn produce(who: Principal, topic: &str) -> Result<(), KafkaError> {
    let producer: FutureProducer = who.client().set("message.timeout.ms", "15000").create()?;
    producer
        .send(
            FutureRecord::to(topic)
                .key("k")
                .payload(who.auth().username.as_bytes()),
            Duration::from_secs(20),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

fn refused(result: Result<(), KafkaError>, what: &str) {
    match result {
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {}
        other => panic!("{what}: expected TopicAuthorizationFailed, got {other:?}"),
    }
}

fn end_offset(topic: &str) -> anyhow::Result<i64> {
    let reader: BaseConsumer = env::kafka::admin().create()?;
    let (_, high) = reader.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    Ok(high)
}

/// Reads partition 0 from the start without a group (so only the topic's
/// Read ACL is in play), returning the first error or message count.
fn read(who: Principal, topic: &str) -> anyhow::Result<Result<usize, KafkaError>> {
    let consumer: BaseConsumer = who
        .client()
        .set("group.id", "unused-assign-only")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    Ok(count_messages(&consumer))
}

/// Polls until messages stop coming (or 20 s pass with none): how many
/// arrived, or the first error.
fn count_messages(consumer: &BaseConsumer) -> Result<usize, KafkaError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut read = 0;
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => read += 1,
            Some(Err(e)) => return Err(e),
            None if read > 0 => break,
            None => {}
        }
    }
    Ok(read)
}

#[tokio::test]
async fn a_principal_without_an_acl_is_refused_and_nothing_is_written() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let events = format!("events.acltest_{}", &run[..12]);
    env::kafka::create_topic(&events, 1).await?;

    // The control plane may write event topics: the positive control, so the
    // refusals below are about ACLs and not about the login or the topic.
    produce(Principal::ControlPlane, &events).await?;
    // A principal with no ACL at all, and a sidecar (which may touch only
    // saga command and reply topics), are refused on the event topic.
    refused(
        produce(Principal::Intruder, &events).await,
        "the intruder writing events",
    );
    refused(
        produce(Principal::Sidecar, &events).await,
        "a sidecar writing events",
    );
    assert_eq!(end_offset(&events)?, 1, "only the allowed write landed");

    // The control plane may describe every topic but read none of the
    // event topics; the admin reads the one message.
    let blocking = |who: Principal| {
        let topic = events.clone();
        tokio::task::spawn_blocking(move || read(who, &topic))
    };
    match blocking(Principal::ControlPlane).await?? {
        Err(e) => assert_eq!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::TopicAuthorizationFailed),
            "{e}"
        ),
        Ok(n) => panic!("the control plane read {n} event(s) it has no ACL for"),
    }
    assert_eq!(
        blocking(Principal::Admin)
            .await??
            .map_err(|e| e.to_string()),
        Ok(1)
    );

    // A wrong password is not a login at all.
    let mut forged = Principal::Sidecar.brokers();
    forged.auth.password = "not-the-password".to_owned();
    let probe: BaseConsumer = forged.client().create()?;
    let refused_login = tokio::task::spawn_blocking(move || {
        probe
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|_| ())
    })
    .await?;
    assert!(refused_login.is_err(), "a forged password logged in");
    Ok(())
}

/// Creates (`Some(password)`) or removes (`None`) `tenant`'s own principal
/// on the test broker as Strimzi would from
/// `statefabric_kafka::acls::kafka_user`: a SCRAM login and the ACLs of
/// `tenant_acls`, applied with Kafka's own tools.
fn tenant_principal_on_broker(tenant: &str, password: Option<&str>) -> anyhow::Result<String> {
    use statefabric_kafka::acls::{Pattern, Resource, tenant_acls, tenant_principal};
    let user = tenant_principal(tenant);
    let scram = match password {
        Some(password) => vec![
            "--add-config".to_owned(),
            format!("SCRAM-SHA-512=[password={password}]"),
        ],
        None => vec!["--delete-config".to_owned(), "SCRAM-SHA-512".to_owned()],
    };
    let mut config = vec!["--alter", "--entity-type", "users", "--entity-name", &user];
    config.extend(scram.iter().map(String::as_str));
    env::kafka::admin_tool("kafka.admin.ConfigCommand", &config)?;
    for acl in tenant_acls(tenant) {
        let principal = format!("User:{user}");
        let mut args = vec![
            if password.is_some() {
                "--add"
            } else {
                "--remove"
            },
            "--force",
            "--allow-principal",
            principal.as_str(),
            "--resource-pattern-type",
            match acl.pattern {
                Pattern::Literal => "literal",
                Pattern::Prefixed => "prefixed",
            },
            match acl.resource {
                Resource::Topic => "--topic",
                Resource::Group => "--group",
            },
            acl.name.as_str(),
        ];
        for op in acl.operations {
            args.extend(["--operation", op]);
        }
        env::kafka::admin_tool("org.apache.kafka.tools.AclCommand", &args)?;
    }
    Ok(user)
}

fn as_tenant(user: &str, password: &str) -> rdkafka::ClientConfig {
    statefabric_kafka::brokers::Brokers::new(
        env::kafka_bootstrap(),
        statefabric_kafka::brokers::KafkaAuth::scram(user, password),
    )
    .client()
}

/// Reads partition 0 of `topic` in consumer group `group` (subscribed, so
/// the group's ACL is in play too): messages read, or the first error.
fn read_in_group(
    config: rdkafka::ClientConfig,
    topic: &str,
    group: &str,
) -> anyhow::Result<Result<usize, KafkaError>> {
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    Ok(count_messages(&consumer))
}

/// A tenant's own principal (what `fabric tenants onboard --kafka-namespace`
/// asks Strimzi for) reads its own tenant's saga tasks in its own groups,
/// answers on the reply topic, and is refused another tenant's topic,
/// another tenant's group and every event topic.
#[tokio::test]
async fn a_tenants_own_principal_reaches_its_tasks_and_no_other_tenants() -> anyhow::Result<()> {
    use statefabric_kafka::topics::{agent_group, tenant_commands_topic};
    let run = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (mine, theirs) = (format!("ta{run}"), format!("tb{run}"));
    let password = uuid::Uuid::new_v4().simple().to_string();
    let user = tokio::task::spawn_blocking({
        let (mine, password) = (mine.clone(), password.clone());
        move || tenant_principal_on_broker(&mine, Some(&password))
    })
    .await??;
    let (my_topic, their_topic) = (
        tenant_commands_topic("coder", &mine),
        tenant_commands_topic("coder", &theirs),
    );
    for topic in [&my_topic, &their_topic] {
        env::kafka::create_topic(topic, 1).await?;
        produce(Principal::Admin, topic).await?;
    }
    // The reply topic the control plane makes (a fresh broker has none yet).
    env::kafka::ensure_topic(statefabric_kafka::topics::REPLIES_TOPIC, 1).await?;
    let tenant = as_tenant(&user, &password);
    let reading = |topic: String, group: String| {
        let config = tenant.clone();
        tokio::task::spawn_blocking(move || read_in_group(config, &topic, &group))
    };
    // Its own tasks, in its own group.
    assert_eq!(
        reading(my_topic.clone(), agent_group(&mine, "coder"))
            .await??
            .map_err(|e| e.to_string()),
        Ok(1)
    );
    // Another tenant's topic (in its own group): refused.
    match reading(their_topic.clone(), agent_group(&mine, "coder")).await?? {
        Err(e) => assert_eq!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::TopicAuthorizationFailed),
            "{e}"
        ),
        Ok(n) => panic!("read {n} of another tenant's tasks"),
    }
    // Its own topic in another tenant's group: refused.
    match reading(my_topic.clone(), agent_group(&theirs, "coder")).await?? {
        Err(e) => assert_eq!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::GroupAuthorizationFailed),
            "{e}"
        ),
        Ok(n) => panic!("read {n} in another tenant's group"),
    }
    // It answers on the reply topic; it writes nothing else.
    let producer: FutureProducer = tenant.clone().set("message.timeout.ms", "15000").create()?;
    let send = |topic: String| {
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key("k").payload("reply"),
                    Duration::from_secs(20),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        }
    };
    send(statefabric_kafka::topics::REPLIES_TOPIC.to_owned()).await?;
    refused(
        send(their_topic.clone()).await,
        "a tenant writing another tenant's tasks",
    );
    refused(
        send(my_topic.clone()).await,
        "a tenant writing its own tasks",
    );
    assert_eq!(
        end_offset(&their_topic)?,
        1,
        "nothing written to the other tenant"
    );
    tokio::task::spawn_blocking(move || tenant_principal_on_broker(&mine, None)).await??;
    Ok(())
}
