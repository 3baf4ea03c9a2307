//! Kafka to Kafka exactly once: a forwarder consumes, produces and commits
//! the input offset in one Kafka transaction. Killed (abort) after producing
//! an output and before committing, it is restarted: the open transaction is
//! aborted by the new producer's fencing, the input comes again, and a
//! `read_committed` reader sees every output exactly once (the aborted copy
//! is in the log, visible only to `read_uncommitted`).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use statefabric_tests as env;

/// Every message on `topic` (one partition) as `isolation` sees it.
fn read_all(topic: &str, isolation: &str) -> anyhow::Result<Vec<String>> {
    let reader: BaseConsumer = env::kafka::admin()
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("isolation.level", isolation)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    reader.assign(&tpl)?;
    let mut out = Vec::new();
    let mut idle = 0;
    while idle < 10 {
        match reader.poll(Duration::from_millis(300)) {
            Some(m) => {
                idle = 0;
                out.push(String::from_utf8_lossy(m?.payload().unwrap_or_default()).into_owned());
            }
            None => idle += 1,
        }
    }
    Ok(out)
}

#[tokio::test]
async fn a_forwarder_killed_before_commit_forwards_each_message_once() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (input, output) = (format!("eos-in-{run}"), format!("eos-out-{run}"));
    env::kafka::create_topic(&input, 1).await?;
    env::kafka::create_topic(&output, 1).await?;
    let producer: FutureProducer = env::kafka::admin().create()?;
    for i in 0..10 {
        producer
            .send(
                FutureRecord::to(&input).key("k").payload(&format!("m{i}")),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let forwarder = |crash_after: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_eos-forwarder"));
        command
            .env("IN_TOPIC", &input)
            .env("OUT_TOPIC", &output)
            .env("GROUP", format!("eos-group-{run}"))
            .env("TXID", format!("eos-tx-{run}"))
            .kill_on_drop(true);
        if let Some(n) = crash_after {
            command.env("CRASH_AFTER", n);
        }
        command.output()
    };
    let crashed = forwarder(Some("4")).await?;
    assert!(
        !crashed.status.success(),
        "it was to die before its 4th commit"
    );
    let resumed = forwarder(None).await?;
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );

    let (committed, everything) = {
        let output = output.clone();
        tokio::task::spawn_blocking(move || {
            anyhow::Ok((
                read_all(&output, "read_committed")?,
                read_all(&output, "read_uncommitted")?,
            ))
        })
        .await??
    };
    let mut counts = BTreeMap::new();
    for payload in &committed {
        *counts.entry(payload.clone()).or_insert(0) += 1;
    }
    let expected: BTreeMap<String, i32> = (0..10).map(|i| (format!("fwd:m{i}"), 1)).collect();
    assert_eq!(counts, expected, "each input forwarded exactly once");
    assert!(
        everything.len() > committed.len(),
        "the aborted copy is in the log: {} vs {}",
        everything.len(),
        committed.len()
    );
    Ok(())
}
