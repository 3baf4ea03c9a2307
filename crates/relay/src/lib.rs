//! The built-in outbox relay: while this instance leads, committed outbox
//! rows go to `events.<aggregate type>` in commit order, keyed by aggregate
//! id, as Avro `EventEnvelope`s (Confluent framing), with the event id,
//! tenant and trace context in headers. Saga tasks written to the outbox by
//! the saga engine (aggregate type [`SAGA_COMMAND`]) go instead to their
//! tenant's command topic for the agent type, as Avro `SagaCommand`s keyed
//! by saga id.
//!
//! A session (per leader epoch, or after a failure) runs three parts:
//! - `read.rs`: outbox rows after a cursor of the last row read
//!   (`statefabric_relay_batch_after`, migration 0019: commit order, below
//!   the oldest running transaction — the event store's gap-free rule),
//!   read and encoded continuously, a few reads ahead of the producing side;
//! - the producing loop here: each read goes into the open Kafka
//!   transaction as soon as it arrives (idempotent, transactional producers
//!   taking turns, see `Txn`). A transaction commits as soon as the one
//!   before it has committed and all its own records are acknowledged; the
//!   next read then opens a transaction on the next producer, so records
//!   are produced while the previous transaction commits. No read waits for
//!   a batch to finish before it is handed to Kafka;
//! - `delete.rs`: once a transaction is committed its rows are deleted in
//!   the background, each call checking the leader epoch first.
//!
//! Delivery is at-least-once: a crash, or a new session, between a Kafka
//! commit and its delete sends those rows again, and consumers deduplicate
//! by event id. Order per aggregate holds: rows come in transaction-id
//! order, a stream's writers have increasing transaction ids (the event
//! store's stream lock and check, migration 0022), and one key maps to one
//! partition. The transactional ids (`<id>.0` …
//! `<id>.3`) are the same on every replica, so Kafka fences a former
//! leader's producers as soon as the new leader initializes its own. Repeated Kafka failures open a circuit
//! breaker (`statefabric_circuit_state{dependency="kafka"}`): the relay
//! then waits for a probe instead of piling up timeouts. A transaction left
//! open (shutdown, lost leadership, a failure) is aborted explicitly. Time
//! per stage is exported as `relay_stage_seconds{stage}`.
//!
//! Its own crate beside the event store whose outbox it drains; Kafka
//! clients, topics and transactions come from `statefabric-kafka`.
#![warn(missing_docs)]

use statefabric_kafka::brokers::Brokers;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use sqlx::PgPool;
use statefabric_leader::{Leadership, Role};
use statefabric_resilience::{Breaker, BreakerConfig};
use statefabric_schema::AvroCodec;
use statefabric_schema::messages::{event_envelope_schema, saga_command_schema};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod delete;
mod read;

use self::delete::delete_sent;
use self::read::{Prepared, Reader, Record};
use statefabric_kafka::topics::{self, TopicSettings};

/// The outbox aggregate type of saga tasks (written by the saga engine).
pub const SAGA_COMMAND: &str = "saga.command";

/// How the relay runs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Where it produces.
    pub brokers: Brokers,
    /// Shared by every replica (Kafka fences the older producer); the relay's
    /// producers use `<id>.0` … `<id>.3` ([`PRODUCERS`]).
    pub transactional_id: String,
    /// The leader lease whose epoch guards the deletes.
    pub lease: String,
    /// Rows per read of the outbox; a transaction takes no more reads once
    /// it holds this many events.
    pub batch: u32,
    /// Pause when the outbox is empty.
    pub idle_poll: Duration,
    /// Deadline of Kafka transaction steps.
    pub kafka_timeout: Duration,
    /// How the topics it creates are made.
    pub topics: TopicSettings,
}

/// Why a relay batch failed: the relay closes its session and opens a
/// new one after a pause (while it still leads).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading or deleting outbox rows failed.
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Producing failed (the transaction was aborted).
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topic could not be created.
    #[error("topics: {0}")]
    Topics(#[from] topics::TopicError),
    /// An event could not be encoded (or its schema registered).
    #[error("schema: {0}")]
    Schema(#[from] statefabric_schema::CodecError),
    /// An outbox row that cannot be published.
    #[error("outbox row {id}: {reason}")]
    BadRow {
        /// The row's id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A newer leader exists: the deletes would be refused.
    #[error("lost leadership (epoch {0} is stale)")]
    Deposed(u64),
    /// The reading half ended early.
    #[error("the outbox reader stopped")]
    ReaderStopped,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    /// read | encode | wait | begin | produce | commit | delete
    stage: &'static str,
}

#[derive(Debug, Clone)]
struct Metrics {
    sent: Counter,
    batches: Counter,
    failures: Counter,
    lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Where a read's and a transaction's time goes.
    stages: Family<StageLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sent: Counter::default(),
            batches: Counter::default(),
            failures: Counter::default(),
            lag_seconds: Gauge::default(),
            // 100 µs .. ~1.6 s
            stages: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 15))
            }),
        }
    }
}

impl Metrics {
    /// Records the time since `*mark` under `stage` and moves the mark.
    fn stage(&self, stage: &'static str, mark: &mut Instant) {
        let now = Instant::now();
        self.stages
            .get_or_create(&StageLabel { stage })
            .observe((now - *mark).as_secs_f64());
        *mark = now;
    }
}

/// The relay; run it with [`Relay::run`].
#[derive(Debug)]
pub struct Relay {
    settings: RelaySettings,
    pool: PgPool,
    codec: Arc<AvroCodec>,
    metrics: Metrics,
    /// Opens after repeated Kafka failures: the relay then stops calling
    /// Kafka until a probe is due, instead of piling up timeouts.
    breaker: Breaker,
}

/// Reads waiting for the producing side.
const READ_AHEAD: usize = 8;

/// How many transactional producers a relay session takes turns with
/// (transactional ids `<id>.0` … `<id>.3`).
pub const PRODUCERS: usize = 4;

/// One transactional producer. The relay keeps [`PRODUCERS`] of them and
/// takes turns: after a commit the coordinator still writes the commit
/// markers, and a new transaction on the same transactional id meanwhile is
/// refused with CONCURRENT_TRANSACTIONS, which librdkafka retries only after
/// 20 ms — up to 20 ms per transaction. By the time a producer's turn comes
/// again its markers are written. Order holds: a transaction takes no more
/// records once it may commit, and the next one (on the next producer)
/// begins only after all its records are acknowledged, so the log keeps
/// commit order whichever transaction commits first.
///
/// A transaction's commit runs while the next one is produced (see
/// [`Pending`]); the next commits only after it succeeded, so a consumer
/// reading committed records never sees a transaction without the one
/// before it.
struct Txn {
    producer: FutureProducer,
    /// What made it, to make the fencing producer at the session's end.
    config: rdkafka::ClientConfig,
    /// A transaction is open (begun, not yet committed or aborted).
    open: AtomicBool,
    /// A transaction of this session was aborted.
    aborted: AtomicBool,
}

/// How a commit ended, and how long it took.
type CommitOutcome = (Result<(), rdkafka::error::KafkaError>, Duration);

/// The transaction records are produced into.
struct Open {
    txn: Arc<Txn>,
    /// Acknowledgements still to come.
    deliveries: FuturesUnordered<DeliveryFuture>,
    /// The outbox rows of its records.
    ids: Vec<uuid::Uuid>,
    /// The oldest event's creation time (for the processing-lag gauge).
    oldest: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// When it began (its `produce` stage runs until it may commit).
    began: Instant,
}

/// A transaction whose records are acknowledged and whose commit is under
/// way.
struct Pending {
    /// The commit, off the async threads (librdkafka blocks).
    commit: JoinHandle<CommitOutcome>,
    ids: Vec<uuid::Uuid>,
    oldest: Option<chrono::DateTime<chrono::FixedOffset>>,
}

/// What one step of the producing side waited for.
enum Event {
    Committed(Result<CommitOutcome, tokio::task::JoinError>),
    Acked(Option<Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>>),
    Read(Option<Result<Prepared, RelayError>>),
    Idle,
}

struct Session {
    epoch: u64,
    /// [`PRODUCERS`] transactional producers, taking turns (see [`Txn`]).
    txns: Vec<Arc<Txn>>,
    turn: usize,
    /// The transaction records go to.
    open: Option<Open>,
    /// The previous transaction, committing.
    pending: Option<Pending>,
    /// Reads encoded ahead by the session's reader.
    prepared: mpsc::Receiver<Result<Prepared, RelayError>>,
    reader: JoinHandle<()>,
    /// Sent rows on their way to the session's deleter.
    sent: mpsc::Sender<Vec<uuid::Uuid>>,
    deleter: JoinHandle<()>,
    /// Set by the deleter when the epoch check refused a delete.
    deposed: Arc<AtomicBool>,
}

impl Session {
    /// Ends the session: aborts a transaction left open and lets the deleter
    /// finish what was sent (for at most `timeout`; rows it did not delete
    /// are sent again by the next session — at least once).
    async fn close(mut self, timeout: Duration) {
        self.reader.abort();
        // A commit under way ends first; if it succeeded its rows are sent.
        if let Some(pending) = self.pending.take()
            && let Ok(Ok((Ok(()), _))) = tokio::time::timeout(timeout, pending.commit).await
        {
            let _ = self.sent.send(pending.ids).await;
        }
        self.abort_open(timeout);
        // An abort can race librdkafka's retry of AddPartitionsToTxn (after
        // CONCURRENT_TRANSACTIONS): the abort ends locally, then the retry
        // registers the partitions and the coordinator holds an `Ongoing`
        // transaction nobody will end. Initializing the same transactional
        // id once more ends whatever the coordinator still holds for it.
        for txn in self
            .txns
            .iter()
            .filter(|t| t.aborted.load(Ordering::SeqCst))
        {
            let fenced = txn
                .config
                .create::<FutureProducer>()
                .and_then(|fence| fence.init_transactions(timeout));
            if let Err(err) = fenced {
                tracing::warn!(error = %err, "could not end the relay's aborted transaction");
            }
        }
        drop(self.sent);
        let mut deleter = self.deleter;
        if tokio::time::timeout(timeout, &mut deleter).await.is_err() {
            deleter.abort();
        }
    }

    /// Aborts the transactions left open (one was interrupted: shutdown,
    /// lost leadership, a failure), so nothing waits for it to time out.
    fn abort_open(&self, timeout: Duration) {
        for txn in &self.txns {
            if txn.open.swap(false, Ordering::SeqCst) {
                txn.aborted.store(true, Ordering::SeqCst);
                match txn.producer.abort_transaction(timeout) {
                    Ok(()) => tracing::info!("aborted the open relay transaction"),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not abort the relay transaction");
                    }
                }
            }
        }
    }
}

impl Relay {
    /// A relay from the outbox behind `pool` to Kafka.
    pub fn new(settings: RelaySettings, pool: PgPool, codec: Arc<AvroCodec>) -> Self {
        Self {
            settings,
            pool,
            codec,
            metrics: Metrics::default(),
            breaker: Breaker::new("kafka", BreakerConfig::default()),
        }
    }

    /// Registers the relay's metrics (and its breaker's) in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        self.breaker.register_metrics(registry);
        registry.register(
            "relay_events_sent",
            "Outbox events published",
            m.sent.clone(),
        );
        registry.register(
            "relay_batches",
            "Kafka transactions committed",
            m.batches.clone(),
        );
        registry.register(
            "relay_failures",
            "Batches that failed and were retried",
            m.failures.clone(),
        );
        registry.register(
            "relay_stage_seconds",
            "Time in each stage: per read of the outbox, read it, encode it and \
             wait for the producing side to take it; per Kafka transaction, \
             begin it, produce (from its begin until it may commit: the one \
             before it committed and its records acknowledged), commit it, \
             delete its rows",
            m.stages.clone(),
        );
        registry
            .sub_registry_with_label(("stage".into(), "relay".into()))
            .register(
                "event_processing_lag_seconds",
                "Age of the oldest event in the last transaction when it was committed",
                m.lag_seconds.clone(),
            );
    }

    /// Relays while this instance leads, until `stop`.
    pub async fn run(self, leadership: Leadership, stop: CancellationToken) {
        let timeout = self.settings.kafka_timeout;
        let mut session: Option<Session> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let Role::Leader { epoch } = leadership.role() else {
                if let Some(old) = session.take() {
                    old.close(timeout).await;
                    tracing::info!("relay stopped: not the leader");
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.settings.idle_poll.max(Duration::from_millis(100))) => {}
                }
                continue;
            };
            let Some(permit) = self.breaker.permit() else {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            };
            if session.as_ref().is_some_and(|s| s.epoch != epoch)
                && let Some(old) = session.take()
            {
                old.close(timeout).await;
            }
            let outcome = async {
                if session.is_none() {
                    session = Some(self.open(epoch).await?);
                }
                let s = session.as_mut().ok_or(RelayError::Deposed(epoch))?;
                self.step(s).await
            };
            let result = tokio::select! {
                () = stop.cancelled() => break,
                result = outcome => result,
            };
            match &result {
                Err(RelayError::Kafka(_) | RelayError::Topics(_)) => permit.failure(),
                _ => permit.success(),
            }
            match result {
                // The reader waits out an empty outbox itself.
                Ok(_) => {}
                Err(err) => {
                    self.metrics.failures.inc();
                    tracing::warn!(error = %err, "relay batch failed; retrying");
                    if let Some(old) = session.take() {
                        old.close(timeout).await;
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        if let Some(old) = session.take() {
            old.close(timeout).await;
        }
    }

    /// A transactional producer for `<transactional id>.<n>`, initialized
    /// (which fences that id's producer in a former leader).
    fn txn(&self, n: usize) -> Result<Arc<Txn>, RelayError> {
        let mut config = self.settings.brokers.client();
        config
            .set(
                "transactional.id",
                format!("{}.{n}", self.settings.transactional_id),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "transaction.timeout.ms",
                (self.settings.kafka_timeout * 6).as_millis().to_string(),
            );
        let producer: FutureProducer = config.create()?;
        producer.init_transactions(self.settings.kafka_timeout)?;
        Ok(Arc::new(Txn {
            producer,
            config,
            open: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
        }))
    }

    async fn open(&self, epoch: u64) -> Result<Session, RelayError> {
        let txns = (0..PRODUCERS)
            .map(|n| self.txn(n))
            .collect::<Result<Vec<_>, _>>()?;
        let (subject, schema) = event_envelope_schema();
        let writer = self.codec.writer(subject, schema).await?;
        let (subject, schema) = saga_command_schema();
        let command_writer = self.codec.writer(subject, schema).await?;
        tracing::info!(epoch, "relay producing");
        // Reads the producing side has not taken yet wait here (bounded: a
        // slow Kafka holds the reader back).
        let (ready, prepared) = mpsc::channel(READ_AHEAD);
        let reader = tokio::spawn(
            Reader {
                pool: self.pool.clone(),
                codec: self.codec.clone(),
                writer,
                command_writer,
                settings: self.settings.clone(),
                metrics: self.metrics.clone(),
            }
            .run(ready),
        );
        // Bounded: a deleter that falls behind holds the relay back.
        let (sent, batches) = mpsc::channel(16);
        let deposed = Arc::new(AtomicBool::new(false));
        let deleter = tokio::spawn(delete_sent(
            self.pool.clone(),
            self.settings.lease.clone(),
            epoch,
            batches,
            deposed.clone(),
            self.metrics.clone(),
        ));
        Ok(Session {
            epoch,
            txns,
            turn: 0,
            open: None,
            pending: None,
            prepared,
            reader,
            sent,
            deleter,
            deposed,
        })
    }

    /// One step of the producing side: the previous transaction's commit
    /// ends, or a read goes to the open transaction, or an acknowledgement
    /// comes in (or nothing within a short wait, so the caller looks at
    /// leadership and stop often). Then, once the previous commit succeeded
    /// and every record of the open transaction is acknowledged, that
    /// transaction's commit starts and the next read opens the next one.
    async fn step(&self, session: &mut Session) -> Result<(), RelayError> {
        if session.deposed.load(Ordering::SeqCst) {
            return Err(RelayError::Deposed(session.epoch));
        }
        let cap = self.settings.batch as usize;
        let Session {
            pending,
            open,
            prepared,
            ..
        } = session;
        // Reads join the open transaction while the previous one commits
        // (it cannot commit before that anyway); once it may commit, it
        // takes no more, so its acknowledgements can all come in.
        let taking = match open {
            None => true,
            Some(open) => pending.is_some() && open.ids.len() < cap,
        };
        let event = tokio::select! {
            biased;
            committed = async {
                match pending.as_mut() {
                    Some(p) => (&mut p.commit).await,
                    None => std::future::pending().await,
                }
            } => Event::Committed(committed),
            acked = async {
                match open.as_mut() {
                    Some(o) if !o.deliveries.is_empty() => o.deliveries.next().await,
                    _ => std::future::pending().await,
                }
            } => Event::Acked(acked),
            read = async {
                if taking {
                    prepared.recv().await
                } else {
                    std::future::pending().await
                }
            } => Event::Read(read),
            () = tokio::time::sleep(Duration::from_millis(100)) => Event::Idle,
        };
        match event {
            Event::Committed(committed) => self.settle(session, committed).await?,
            Event::Acked(Some(Ok(Ok(_)))) | Event::Idle => {}
            Event::Acked(Some(Ok(Err((err, _))))) => return Err(RelayError::Kafka(err)),
            Event::Acked(Some(Err(_)) | None) => {
                return Err(RelayError::Kafka(rdkafka::error::KafkaError::Canceled));
            }
            Event::Read(None) => return Err(RelayError::ReaderStopped),
            Event::Read(Some(read)) => self.produce(session, read?)?,
        }
        self.maybe_commit(session);
        Ok(())
    }

    /// Hands a read to the open transaction (opening one on the next
    /// producer if none is open).
    fn produce(&self, session: &mut Session, read: Prepared) -> Result<(), RelayError> {
        let Prepared {
            records,
            ids,
            oldest,
            ready_at,
        } = read;
        let mut mark = ready_at;
        self.metrics.stage("wait", &mut mark);
        let open = match &mut session.open {
            Some(open) => open,
            None => {
                let txn = session.txns[session.turn].clone();
                session.turn = (session.turn + 1) % PRODUCERS;
                txn.producer.begin_transaction()?;
                txn.open.store(true, Ordering::SeqCst);
                self.metrics.stage("begin", &mut mark);
                session.open.insert(Open {
                    txn,
                    deliveries: FuturesUnordered::new(),
                    ids: Vec::new(),
                    oldest: None,
                    began: mark,
                })
            }
        };
        // librdkafka copies what it is given: each record is used once.
        for r in firsts_first(records) {
            let record = FutureRecord::to(&r.topic)
                .key(&r.key)
                .payload(&r.value)
                .headers(r.headers);
            let delivery = open
                .txn
                .producer
                .send_result(record)
                .map_err(|(err, _)| RelayError::Kafka(err))?;
            open.deliveries.push(delivery);
        }
        open.ids.extend(ids);
        open.oldest = open.oldest.into_iter().chain(oldest).min();
        Ok(())
    }

    /// Starts the open transaction's commit if it may: the previous one
    /// has succeeded and all its records are acknowledged (so every record
    /// of the next transaction, on another producer, follows them in the
    /// log).
    fn maybe_commit(&self, session: &mut Session) {
        let ready = session.pending.is_none()
            && session
                .open
                .as_ref()
                .is_some_and(|o| !o.ids.is_empty() && o.deliveries.is_empty());
        if !ready {
            return;
        }
        let Some(Open {
            txn,
            ids,
            oldest,
            mut began,
            ..
        }) = session.open.take()
        else {
            return;
        };
        self.metrics.stage("produce", &mut began);
        let timeout = self.settings.kafka_timeout;
        let commit = tokio::task::spawn_blocking(move || {
            let began = Instant::now();
            let result = statefabric_kafka::txn::commit(&txn.producer, timeout);
            if result.is_ok() {
                txn.open.store(false, Ordering::SeqCst);
            }
            (result, began.elapsed())
        });
        session.pending = Some(Pending {
            commit,
            ids,
            oldest,
        });
    }

    /// The previous transaction's commit has ended: once it succeeded, its
    /// rows go to the deleter.
    async fn settle(
        &self,
        session: &mut Session,
        committed: Result<CommitOutcome, tokio::task::JoinError>,
    ) -> Result<(), RelayError> {
        let Some(Pending { ids, oldest, .. }) = session.pending.take() else {
            return Ok(());
        };
        let (committed, took) =
            committed.map_err(|_| RelayError::Kafka(rdkafka::error::KafkaError::Canceled))?;
        committed?;
        self.metrics
            .stages
            .get_or_create(&StageLabel { stage: "commit" })
            .observe(took.as_secs_f64());
        let count = ids.len();
        if session.sent.send(ids).await.is_err() {
            return Err(RelayError::Deposed(session.epoch));
        }
        self.metrics.sent.inc_by(count as u64);
        self.metrics.batches.inc();
        if let Some(oldest) = oldest {
            let lag = (chrono::Utc::now() - oldest.with_timezone(&chrono::Utc))
                .num_milliseconds()
                .max(0);
            self.metrics.lag_seconds.set(lag as f64 / 1000.0);
        }
        Ok(())
    }
}

/// The records with each key's first one moved to the front, otherwise in
/// order: order per key (per partition) is all the log must keep. librdkafka
/// registers a transaction's partitions (AddPartitionsToTxn) as soon as the
/// first record of a new partition is queued, and the partitions queued
/// after that only once that request is answered: sending every key's
/// first record before the rest lets one request carry them all, instead
/// of one round trip for the first and another for the others.
fn firsts_first(records: Vec<Record>) -> Vec<Record> {
    let mut seen = std::collections::HashSet::new();
    let first: Vec<bool> = records
        .iter()
        .map(|r| seen.insert((r.topic.as_str(), r.key.as_str())))
        .collect();
    let (firsts, rest): (Vec<_>, Vec<_>) = records.into_iter().zip(first).partition(|(_, f)| *f);
    firsts.into_iter().chain(rest).map(|(r, _)| r).collect()
}

#[cfg(test)]
mod tests {
    use rdkafka::message::OwnedHeaders;

    use super::*;

    fn record(topic: &str, key: &str, n: u8) -> Record {
        Record {
            topic: topic.into(),
            key: key.into(),
            value: vec![n],
            headers: OwnedHeaders::new(),
        }
    }

    #[test]
    fn firsts_first_keeps_the_order_of_every_key() {
        let records = vec![
            record("t", "a", 1),
            record("t", "a", 2),
            record("t", "b", 3),
            record("u", "a", 4),
            record("t", "b", 5),
            record("t", "a", 6),
        ];
        let sent: Vec<(String, String, u8)> = firsts_first(records)
            .into_iter()
            .map(|r| (r.topic, r.key, r.value[0]))
            .collect();
        let tuple = |t: &str, k: &str, n| (t.to_owned(), k.to_owned(), n);
        assert_eq!(
            sent,
            [
                tuple("t", "a", 1),
                tuple("t", "b", 3),
                tuple("u", "a", 4),
                tuple("t", "a", 2),
                tuple("t", "b", 5),
                tuple("t", "a", 6),
            ]
        );
    }
}
