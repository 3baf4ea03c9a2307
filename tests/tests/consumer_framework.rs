//! The consumer framework on the real Kafka: per-partition backpressure by
//! pausing, order per partition, retries then dead letters with
//! consumption going on, offsets committed at a clean stop; and the
//! transactional runner's dead letters and aborted batches. (The crash
//! tests of both runners are `inbox.rs` and `eos_forward.rs`.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefabric_kafka::consumer::partitioned::PartitionedConsumer;
use statefabric_kafka::consumer::transactional::{Batch, Output, TransactionalConsumer, Transform};
use statefabric_kafka::consumer::{ConsumerSettings, Handler};
use statefabric_kafka::dead_letter::{Failure, RetryPolicy};
use statefabric_tests as env;
use statefabric_tests::kafka::Principal;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        jitter: 0.3,
    }
}

async fn produce(topic: &str, messages: &[(i32, String)]) -> anyhow::Result<()> {
    let producer: FutureProducer = env::kafka::admin().create()?;
    for (partition, payload) in messages {
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(*partition)
                    .key("k")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Waits at a gate, records what it saw per partition (first tries only),
/// refuses to decode "garbage" and always fails "poison".
struct Gated {
    gate: Arc<Semaphore>,
    seen: Arc<Mutex<BTreeMap<i32, Vec<String>>>>,
}

#[async_trait]
impl Handler for Gated {
    async fn handle(&self, message: &OwnedMessage) -> Result<(), Failure> {
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let list = seen.entry(message.partition()).or_default();
            if list.last() != Some(&payload) {
                list.push(payload.clone());
            }
        }
        if let Ok(permit) = self.gate.acquire().await {
            permit.forget();
        }
        match payload.as_str() {
            "garbage" => Err(Failure::Undecodable("not a message".into())),
            "poison" => Err(Failure::Failed("the poison fails".into())),
            _ => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_pause_at_their_bound_and_everything_is_handled_in_order() -> anyhow::Result<()>
{
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (topic, group) = (format!("fw-test-{run}"), format!("fw-group-{run}"));
    env::kafka::create_topic(&topic, 2).await?;
    let mut messages: Vec<(i32, String)> = (0..200).map(|i| (i % 2, format!("m{i:03}"))).collect();
    messages.insert(50, (0, "poison".into()));
    messages.insert(120, (1, "garbage".into()));
    produce(&topic, &messages).await?;

    let gate = Arc::new(Semaphore::new(0));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let mut settings = ConsumerSettings::new(Principal::Admin.brokers(), &group, &[&topic]);
    settings.retry = quick_retries();
    const BOUND: usize = 4;
    let consumer = PartitionedConsumer::new(
        settings,
        BOUND,
        Gated {
            gate: gate.clone(),
            seen: seen.clone(),
        },
    );
    let metrics = consumer.metrics();
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));

    // With every handler held at the gate, both partitions fill their
    // bound and pause: far fewer than the 202 messages are taken.
    env::eventually("both partitions paused", Duration::from_secs(30), || {
        let metrics = metrics.clone();
        let group = group.clone();
        async move { Ok((metrics.paused(&group) == 2).then_some(())) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = metrics.get(&group, "taken");
    // Per partition: one in the handler, BOUND queued, one that did not fit.
    assert!(
        taken <= 2 * (BOUND as u64 + 2),
        "taken while paused: {taken}"
    );

    gate.add_permits(10_000);
    env::eventually("all handled", Duration::from_secs(60), || {
        let metrics = metrics.clone();
        let group = group.clone();
        async move {
            let finished = metrics.get(&group, "handled") + metrics.get(&group, "dead_lettered");
            Ok((finished == 202).then_some(()))
        }
    })
    .await?;
    assert_eq!(metrics.get(&group, "dead_lettered"), 2);
    assert_eq!(metrics.paused(&group), 0, "resumed once drained");
    stop.cancel();
    running.await??;

    // Each partition's messages were handled in offset order.
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (partition, list) in &seen {
        let expected: Vec<String> = messages
            .iter()
            .filter(|(p, _)| p == partition)
            .map(|(_, m)| m.clone())
            .collect();
        assert_eq!(list, &expected, "partition {partition}");
    }
    // The two bad messages are dead letters; the group's offsets are at
    // the end of both partitions after the clean stop.
    let dlq = format!("dlq.{topic}");
    let letters = {
        let dlq = dlq.clone();
        tokio::task::spawn_blocking(move || env::kafka::read_all(&dlq, 3, "read_committed"))
            .await??
    };
    let mut letters_sorted = letters.clone();
    letters_sorted.sort();
    assert_eq!(letters_sorted, ["garbage", "poison"]);
    let committed = {
        let (topic, group) = (topic.clone(), group.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i64>> {
            let reader: BaseConsumer = env::kafka::admin().set("group.id", &group).create()?;
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, 0);
            list.add_partition(&topic, 1);
            let committed = reader.committed_offsets(list, Duration::from_secs(10))?;
            Ok(committed
                .elements()
                .iter()
                .map(|e| e.offset().to_raw().unwrap_or(-1))
                .collect())
        })
        .await??
    };
    assert_eq!(committed, vec![101, 101]);
    Ok(())
}

/// Doubles each message; "poison" always fails; the first commit is
/// vetoed once.
struct Doubler {
    output: String,
    vetoed: AtomicBool,
}

#[async_trait]
impl Transform for Doubler {
    async fn transform(&self, message: &OwnedMessage) -> Result<Vec<Output>, Failure> {
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        if payload == "poison" {
            return Err(Failure::Failed("the poison fails".into()));
        }
        Ok(["a", "b"]
            .iter()
            .map(|copy| Output {
                topic: self.output.clone(),
                key: None,
                payload: format!("{payload}-{copy}").into_bytes(),
            })
            .collect())
    }

    async fn before_commit(&self, _batch: &Batch) -> Result<(), String> {
        if self.vetoed.swap(true, Ordering::SeqCst) {
            Ok(())
        } else {
            Err("not this time".into())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_batches_dead_letter_and_survive_an_abort() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (input, output, group) = (
        format!("fwt-in-{run}"),
        format!("fwt-out-{run}"),
        format!("fwt-group-{run}"),
    );
    env::kafka::create_topic(&input, 1).await?;
    env::kafka::create_topic(&output, 1).await?;
    let messages: Vec<(i32, String)> = ["x1", "x2", "poison", "x3"]
        .iter()
        .map(|m| (0, (*m).to_owned()))
        .collect();
    produce(&input, &messages).await?;
    let mut settings = ConsumerSettings::new(Principal::Admin.brokers(), &group, &[&input]);
    settings.retry = quick_retries();
    let runner = TransactionalConsumer::new(
        settings,
        &format!("fwt-tx-{run}"),
        10,
        Doubler {
            output: output.clone(),
            vetoed: AtomicBool::new(false),
        },
    );
    let metrics = runner.metrics();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runner.run(stop.clone()));
    env::eventually("all four finished", Duration::from_secs(60), || {
        let metrics = metrics.clone();
        let group = group.clone();
        async move {
            let finished = metrics.get(&group, "handled") + metrics.get(&group, "dead_lettered");
            Ok((finished >= 4).then_some(()))
        }
    })
    .await?;
    stop.cancel();
    running.await?;
    // The vetoed batch was read again: inputs taken more than once, but
    // every output committed exactly once and one dead letter.
    assert!(metrics.get(&group, "taken") > 4);
    let (committed, dead) = {
        let (output, dlq) = (output.clone(), format!("dlq.{input}"));
        tokio::task::spawn_blocking(move || {
            anyhow::Ok((
                env::kafka::read_all(&output, 1, "read_committed")?,
                env::kafka::read_all(&dlq, 3, "read_committed")?,
            ))
        })
        .await??
    };
    let mut committed_sorted = committed.clone();
    committed_sorted.sort();
    assert_eq!(
        committed_sorted,
        ["x1-a", "x1-b", "x2-a", "x2-b", "x3-a", "x3-b"]
    );
    assert_eq!(dead, ["poison"]);
    Ok(())
}
