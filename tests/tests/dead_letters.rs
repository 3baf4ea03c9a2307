//! Dead letters on the real Kafka: an undecodable message goes to
//! `dlq.<topic>` at once, one that keeps failing after its retries, each
//! with where it came from and why; the messages around them are handled
//! and consumption goes on; an operator lists the dead letters and replays
//! one to its original topic (library and `fabric dlq`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use statefabric_kafka::dead_letter::{self, DeadLetters, Failure, Handled, RetryPolicy};
use statefabric_tests as env;

#[tokio::test]
async fn failing_messages_are_dead_lettered_and_can_be_replayed() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("dlq-test-{run}");
    let group = format!("dlq-group-{run}");
    let (bootstrap, brokers) = (
        env::kafka_bootstrap(),
        env::kafka::Principal::Admin.brokers(),
    );
    env::kafka::create_topic(&topic, 1).await?;
    let producer: FutureProducer = env::kafka::admin().create()?;
    for payload in ["ok-1", "garbage", "ok-2", "poison", "ok-3"] {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("k")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let consumer: StreamConsumer = env::kafka::admin()
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let dead = DeadLetters::new(&brokers, &group, Duration::from_secs(10))?;
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        jitter: 0.2,
    };
    let poison_calls = Arc::new(AtomicU32::new(0));
    let mut outcomes = BTreeMap::new();
    while outcomes.len() < 5 {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {} of 5 messages", outcomes.len()))??
            .detach();
        let calls = poison_calls.clone();
        let handled = dead
            .handle(&message, &policy, |m| {
                let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                let calls = calls.clone();
                async move {
                    match payload.as_str() {
                        "garbage" => Err(Failure::Undecodable("not JSON".into())),
                        "poison" => {
                            calls.fetch_add(1, Ordering::SeqCst);
                            Err(Failure::Failed("the poison fails".into()))
                        }
                        _ => Ok(()),
                    }
                }
            })
            .await?;
        // Handled or dead-lettered: move past it either way.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &topic,
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )?;
        consumer.commit(&tpl, CommitMode::Sync)?;
        outcomes.insert(
            String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
            handled,
        );
    }
    assert_eq!(outcomes["ok-1"], Handled::Done { attempts: 1 });
    assert_eq!(
        outcomes["ok-3"],
        Handled::Done { attempts: 1 },
        "consumption went on"
    );
    assert!(matches!(
        outcomes["garbage"],
        Handled::DeadLettered { attempts: 1, .. }
    ));
    assert!(matches!(
        outcomes["poison"],
        Handled::DeadLettered { attempts: 3, .. }
    ));
    assert_eq!(
        poison_calls.load(Ordering::SeqCst),
        3,
        "retried, then given up"
    );

    let dlq = format!("dlq.{topic}");
    let letters = {
        let (brokers, dlq) = (brokers.clone(), dlq.clone());
        tokio::task::spawn_blocking(move || {
            dead_letter::list(&brokers, &dlq, 100, Duration::from_secs(10))
        })
        .await??
    };
    assert_eq!(letters.len(), 2);
    let poison = letters
        .iter()
        .find(|l| l.payload.as_deref() == Some(b"poison".as_slice()))
        .ok_or_else(|| anyhow::anyhow!("poison not dead-lettered"))?;
    assert_eq!(poison.why["topic"], topic);
    assert_eq!(poison.why["partition"], "0");
    assert_eq!(poison.why["offset"], "3");
    assert_eq!(poison.why["attempts"], "3");
    assert_eq!(poison.why["group"], group);
    assert_eq!(poison.why["error"], "the poison fails");
    assert!(poison.why["time"].parse::<u128>().is_ok());
    assert_eq!(poison.key.as_deref(), Some(b"k".as_slice()));
    let garbage = letters
        .iter()
        .find(|l| l.why["offset"] == "1")
        .expect("garbage");
    assert!(
        garbage.why["error"].starts_with("undecodable"),
        "{:?}",
        garbage.why
    );

    // The operator lists them with the CLI, then replays the poison.
    let listed = tokio::process::Command::new(env::binary("fabric"))
        .args(["dlq", "list", "--bootstrap", &bootstrap, "--topic", &dlq])
        .args(["--username", &brokers.auth.username])
        .env("STATEFABRIC_KAFKA_PASSWORD", &brokers.auth.password)
        .output()
        .await?;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let text = String::from_utf8(listed.stdout)?;
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("error: the poison fails"), "{text}");
    let replayed = tokio::process::Command::new(env::binary("fabric"))
        .args([
            "dlq",
            "replay",
            "--bootstrap",
            &bootstrap,
            "--topic",
            &dlq,
            "--partition",
            &poison.partition.to_string(),
            "--offset",
            &poison.offset.to_string(),
            "--username",
            &brokers.auth.username,
        ])
        .env("STATEFABRIC_KAFKA_PASSWORD", &brokers.auth.password)
        .output()
        .await?;
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    // It is back on the original topic, after the five.
    let reader: BaseConsumer = env::kafka::admin()
        .set("group.id", format!("dlq-check-{run}"))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(5))?;
    reader.assign(&tpl)?;
    let back = tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            if let Some(m) = reader.poll(Duration::from_millis(200)) {
                let m = m?;
                let from = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "replayed_from"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                return anyhow::Ok(Some((m.payload().map(<[u8]>::to_vec), from)));
            }
        }
        Ok(None)
    })
    .await??;
    let (payload, from) = back.ok_or_else(|| anyhow::anyhow!("nothing replayed"))?;
    assert_eq!(payload.as_deref(), Some(b"poison".as_slice()));
    assert!(from.is_some_and(|f| f.starts_with(&dlq)));
    Ok(())
}
