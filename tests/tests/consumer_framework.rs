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

/// Counts what it handles.
struct Counting(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl Handler for Counting {
    async fn handle(&self, message: &OwnedMessage) -> Result<(), Failure> {
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(payload);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_leaves_its_group_at_once() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (topic, group) = (format!("fw-leave-{run}"), format!("fw-leave-{run}"));
    env::kafka::create_topic(&topic, 2).await?;
    let first: Vec<(i32, String)> = (0..20).map(|i| (i % 2, format!("a{i:02}"))).collect();
    produce(&topic, &first).await?;
    // A long session timeout: a member that vanished without leaving would
    // hold its partitions for a minute.
    let settings = || {
        let mut s = ConsumerSettings::new(Principal::Admin.brokers(), &group, &[&topic]);
        s.session_timeout = Duration::from_secs(60);
        s
    };
    let seen_a = Arc::new(Mutex::new(Vec::new()));
    let a = PartitionedConsumer::new(settings(), 8, Counting(seen_a.clone()));
    let a_metrics = a.metrics();
    let stop_a = CancellationToken::new();
    let running_a = tokio::spawn(a.run(stop_a.clone()));
    env::eventually(
        "the first consumer handled its 20",
        Duration::from_secs(30),
        || {
            let (m, g) = (a_metrics.clone(), group.clone());
            async move { Ok((m.get(&g, "handled") == 20).then_some(())) }
        },
    )
    .await?;
    stop_a.cancel();
    running_a.await??;

    // The successor gets both partitions from the committed offsets and
    // handles only what came after, well inside the session timeout.
    let second: Vec<(i32, String)> = (0..10).map(|i| (i % 2, format!("b{i:02}"))).collect();
    produce(&topic, &second).await?;
    let seen_b = Arc::new(Mutex::new(Vec::new()));
    let b = PartitionedConsumer::new(settings(), 8, Counting(seen_b.clone()));
    let b_metrics = b.metrics();
    let stop_b = CancellationToken::new();
    let running_b = tokio::spawn(b.run(stop_b.clone()));
    env::eventually(
        "the successor handled the next 10",
        Duration::from_secs(30),
        || {
            let (m, g) = (b_metrics.clone(), group.clone());
            async move { Ok((m.get(&g, "handled") >= 10).then_some(())) }
        },
    )
    .await?;
    stop_b.cancel();
    running_b.await??;
    let mut got = seen_b.lock().unwrap_or_else(|e| e.into_inner()).clone();
    got.sort();
    let expected: Vec<String> = second.iter().map(|(_, m)| m.clone()).collect();
    assert_eq!(got, expected, "only the new messages, each once");
    Ok(())
}
