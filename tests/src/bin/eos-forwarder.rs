//! A test consume-process-produce loop for Kafka-to-Kafka exactly once
//! (`tests/tests/eos_forward.rs`): each input message is forwarded in one
//! Kafka transaction together with the input offset
//! (`send_offsets_to_transaction`). With `CRASH_AFTER=n` the process aborts
//! after sending the n-th output and its offset, before the commit: the
//! transaction is left open, and the restarted producer (same transactional
//! id) fences and aborts it.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (input, output, group) = (var("IN_TOPIC")?, var("OUT_TOPIC")?, var("GROUP")?);
    let crash_after: Option<u64> = std::env::var("CRASH_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    let timeout = Duration::from_secs(10);
    let consumer: StreamConsumer = statefabric_tests::kafka::admin()
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[&input])?;
    let producer: FutureProducer = statefabric_tests::kafka::admin()
        .set("transactional.id", var("TXID")?)
        .set("enable.idempotence", "true")
        .create()?;
    producer.init_transactions(timeout)?;
    let mut forwarded = 0u64;
    while let Ok(message) = tokio::time::timeout(Duration::from_secs(15), consumer.recv()).await {
        let message = message?;
        producer.begin_transaction()?;
        let payload = format!(
            "fwd:{}",
            String::from_utf8_lossy(message.payload().unwrap_or_default())
        );
        let mut record = FutureRecord::to(&output).payload(&payload);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        producer.send(record, timeout).await.map_err(|(e, _)| e)?;
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )?;
        let group_metadata = consumer
            .group_metadata()
            .ok_or_else(|| anyhow::anyhow!("no group metadata"))?;
        producer.send_offsets_to_transaction(&offsets, &group_metadata, timeout)?;
        forwarded += 1;
        if Some(forwarded) == crash_after {
            std::process::abort();
        }
        producer.commit_transaction(timeout)?;
    }
    println!("forwarded {forwarded}");
    Ok(())
}
