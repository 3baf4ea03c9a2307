//! Kafka to Kafka exactly once: a forwarder consumes, produces and commits
//! the input offset in one Kafka transaction. Killed (abort) after producing
//! an output and before committing, it is restarted: the open transaction is
//! aborted by the new producer's fencing, the input comes again, and a
//! `read_committed` reader sees every output exactly once (the aborted copy
//! is in the log, visible only to `read_uncommitted`).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use statefabric_tests as env;

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
                env::kafka::read_all(&output, 1, "read_committed")?,
                env::kafka::read_all(&output, 1, "read_uncommitted")?,
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
