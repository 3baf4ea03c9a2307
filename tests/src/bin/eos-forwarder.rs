//! A test consume-process-produce program for Kafka-to-Kafka exactly once
//! (`tests/tests/eos_forward.rs`) on the consumer framework's transactional
//! runner, one input per transaction: each input is forwarded as
//! `fwd:<payload>` in one Kafka transaction with its offset. With
//! `CRASH_AFTER=n` the process aborts in the n-th transaction after its
//! output and offset are sent, before the commit: the transaction is left
//! open, and the restarted producer (same transactional id) fences and
//! aborts it. Stops after 15 s without a message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::message::{Message, OwnedMessage};
use statefabric_kafka::consumer::ConsumerSettings;
use statefabric_kafka::consumer::transactional::{Batch, Output, TransactionalConsumer, Transform};
use statefabric_kafka::dead_letter::Failure;
use tokio_util::sync::CancellationToken;

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

struct Forward {
    output: String,
    crash_after: Option<u64>,
    transactions: AtomicU64,
    activity: tokio::sync::watch::Sender<()>,
}

#[async_trait]
impl Transform for Forward {
    async fn transform(&self, message: &OwnedMessage) -> Result<Vec<Output>, Failure> {
        self.activity.send_replace(());
        let payload = format!(
            "fwd:{}",
            String::from_utf8_lossy(message.payload().unwrap_or_default())
        );
        Ok(vec![Output {
            topic: self.output.clone(),
            key: message.key().map(<[u8]>::to_vec),
            payload: payload.into_bytes(),
        }])
    }

    async fn before_commit(&self, _batch: &Batch) -> Result<(), String> {
        let n = self.transactions.fetch_add(1, Ordering::SeqCst) + 1;
        if Some(n) == self.crash_after {
            std::process::abort();
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (input, output, group) = (var("IN_TOPIC")?, var("OUT_TOPIC")?, var("GROUP")?);
    let (activity, mut active) = tokio::sync::watch::channel(());
    let forward = Forward {
        output,
        crash_after: std::env::var("CRASH_AFTER")
            .ok()
            .and_then(|v| v.parse().ok()),
        transactions: AtomicU64::new(0),
        activity,
    };
    let mut settings = ConsumerSettings::new(
        statefabric_tests::kafka::Principal::Admin.brokers(),
        &group,
        &[&input],
    );
    settings.session_timeout = Duration::from_secs(6);
    let runner = TransactionalConsumer::new(settings, &var("TXID")?, 1, forward);
    let metrics = runner.metrics();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runner.run(stop.clone()));
    while tokio::time::timeout(Duration::from_secs(15), active.changed())
        .await
        .is_ok_and(|changed| changed.is_ok())
    {}
    stop.cancel();
    running.await?;
    println!("forwarded {}", metrics.get(&group, "handled"));
    Ok(())
}
