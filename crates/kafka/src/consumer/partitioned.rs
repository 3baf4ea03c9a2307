//! At-least-once consumption with one worker per partition and
//! backpressure by pausing partitions (see the module above).
//!
//! The loop owns the Kafka consumer. Each message goes to its partition's
//! lane: a bounded queue in front of that partition's worker. When the
//! queue is full the partition is paused at the broker; the message that
//! did not fit (and any that were already on their way) waits in the lane,
//! and the partition resumes once they are in the queue. A worker reports
//! each finished message back to the loop, which stores its offset; the
//! stored offsets are committed in the background and once more at stop.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::Instrument;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ConsumerMetrics, ConsumerSettings, Handler};
use crate::dead_letter::{DeadLetters, Handled};

type Partition = (String, i32);

/// Remembers revoked partitions for the loop (the callback runs inside
/// librdkafka and must return quickly).
#[derive(Default)]
struct Revocations(Mutex<Vec<Partition>>);

impl ClientContext for Revocations {}

impl ConsumerContext for Revocations {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let mut revoked = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            revoked.extend(
                list.elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition())),
            );
        }
    }
}

/// A partition's way to its worker.
struct Lane {
    queue: mpsc::Sender<OwnedMessage>,
    /// Taken from Kafka but not yet in the queue (at most what was on its
    /// way when the partition was paused).
    waiting: VecDeque<OwnedMessage>,
    paused: bool,
    cancel: CancellationToken,
    worker: JoinHandle<()>,
}

/// An at-least-once consumer with a worker per partition, running a
/// [`Handler`](super::Handler) on each message.
pub struct PartitionedConsumer<H> {
    settings: ConsumerSettings,
    in_flight_per_partition: usize,
    handler: Arc<H>,
    metrics: ConsumerMetrics,
}

impl<H> std::fmt::Debug for PartitionedConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedConsumer")
            .field("group", &self.settings.group)
            .field("topics", &self.settings.topics)
            .field("in_flight_per_partition", &self.in_flight_per_partition)
            .finish_non_exhaustive()
    }
}

/// Everything a worker needs.
struct Work<H> {
    handler: Arc<H>,
    dead: DeadLetters,
    settings: ConsumerSettings,
    metrics: ConsumerMetrics,
    done: mpsc::UnboundedSender<(Partition, i64)>,
}

impl<H: Handler> PartitionedConsumer<H> {
    /// `in_flight_per_partition` (at least 1) bounds the messages taken
    /// and not finished per partition.
    pub fn new(settings: ConsumerSettings, in_flight_per_partition: usize, handler: H) -> Self {
        Self {
            settings,
            in_flight_per_partition: in_flight_per_partition.max(1),
            handler: Arc::new(handler),
            metrics: ConsumerMetrics::default(),
        }
    }

    /// Its metrics, to register before it runs.
    pub fn metrics(&self) -> ConsumerMetrics {
        self.metrics.clone()
    }

    /// Counts into `metrics` (shared, e.g. registered once by a caller that
    /// runs consumers one after another).
    pub fn with_metrics(mut self, metrics: ConsumerMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Consumes until `stop`, then finishes the work in hand (for at most
    /// the settings' timeout), commits and leaves the group.
    pub async fn run(self, stop: CancellationToken) -> KafkaResult<()> {
        let s = &self.settings;
        let consumer: StreamConsumer<Revocations> = s
            .brokers
            .client()
            .set("group.id", &s.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "session.timeout.ms",
                s.session_timeout.as_millis().to_string(),
            )
            .create_with_context(Revocations::default())?;
        let topics: Vec<&str> = s.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let (done, mut finished) = mpsc::unbounded_channel();
        let work = Arc::new(Work {
            handler: self.handler.clone(),
            dead: DeadLetters::new(&s.brokers, &s.group, s.timeout)?,
            settings: s.clone(),
            metrics: self.metrics.clone(),
            done,
        });
        let paused = self.metrics.paused_gauge(&s.group);
        let mut lanes: HashMap<Partition, Lane> = HashMap::new();
        loop {
            let revoked: Vec<Partition> = std::mem::take(
                &mut *consumer
                    .context()
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            for partition in revoked {
                if let Some(lane) = lanes.remove(&partition) {
                    // Its queued messages go to the partition's next owner.
                    lane.cancel.cancel();
                    if lane.paused {
                        paused.dec();
                    }
                }
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some((partition, offset)) = finished.recv() => {
                    if let Err(err) = consumer.store_offset(&partition.0, partition.1, offset) {
                        // Revoked meanwhile: its next owner sees it again.
                        tracing::debug!(error = %err, "offset not stored");
                    }
                    if let Some(lane) = lanes.get_mut(&partition) {
                        refill(lane);
                        if lane.paused && lane.waiting.is_empty() {
                            lane.paused = false;
                            paused.dec();
                            set_paused(&consumer, &partition, false);
                        }
                    }
                }
                received = consumer.recv() => {
                    let message = match received {
                        Ok(message) => message.detach(),
                        Err(err) => {
                            tracing::warn!(group = %s.group, error = %err, "consumer error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    self.metrics.count(&s.group, "taken", 1);
                    let partition = (message.topic().to_owned(), message.partition());
                    let lane = lanes.entry(partition.clone()).or_insert_with(|| {
                        self.lane(&work, &stop)
                    });
                    lane.waiting.push_back(message);
                    refill(lane);
                    if !lane.waiting.is_empty() && !lane.paused {
                        lane.paused = true;
                        paused.inc();
                        set_paused(&consumer, &partition, true);
                    }
                }
            }
        }
        // Stop: workers finish the message in hand and take no other.
        drop(work);
        let workers: Vec<JoinHandle<()>> = lanes.into_values().map(|lane| lane.worker).collect();
        let drained = tokio::time::timeout(s.timeout, async {
            while let Some((partition, offset)) = finished.recv().await {
                let _ = consumer.store_offset(&partition.0, partition.1, offset);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(group = %s.group, "work in hand did not finish in time; abandoned");
            for worker in &workers {
                worker.abort();
            }
        }
        if let Err(err) = consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit is the usual reason.
            tracing::debug!(group = %s.group, error = %err, "final commit");
        }
        // Dropping the consumer closes it: it leaves the group at once.
        Ok(())
    }

    fn lane(&self, work: &Arc<Work<H>>, stop: &CancellationToken) -> Lane {
        let (queue, receiver) = mpsc::channel(self.in_flight_per_partition);
        let cancel = stop.child_token();
        Lane {
            queue,
            waiting: VecDeque::new(),
            paused: false,
            worker: tokio::spawn(run_lane(receiver, work.clone(), cancel.clone())),
            cancel,
        }
    }
}

/// Moves waiting messages into the queue while it has room.
fn refill(lane: &mut Lane) {
    while let Some(message) = lane.waiting.pop_front() {
        if let Err(err) = lane.queue.try_send(message) {
            let (mpsc::error::TrySendError::Full(message)
            | mpsc::error::TrySendError::Closed(message)) = err;
            lane.waiting.push_front(message);
            return;
        }
    }
}

fn set_paused<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    (topic, partition): &Partition,
    pause: bool,
) {
    let mut list = TopicPartitionList::new();
    if list
        .add_partition_offset(topic, *partition, Offset::Invalid)
        .is_err()
    {
        return;
    }
    let result = if pause {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    if let Err(err) = result {
        tracing::warn!(%topic, partition, pause, error = %err, "pause/resume failed");
    }
}

/// One partition's worker: its messages in order, each handled (with
/// retries) or dead-lettered before the next.
async fn run_lane<H: Handler>(
    mut queue: mpsc::Receiver<OwnedMessage>,
    work: Arc<Work<H>>,
    cancel: CancellationToken,
) {
    let group = &work.settings.group;
    loop {
        let message = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            message = queue.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let span = super::consume_span(&message, group);
        loop {
            let handler = &work.handler;
            match work
                .dead
                .handle(&message, &work.settings.retry, |_| handler.handle(&message))
                .instrument(span.clone())
                .await
            {
                Ok(Handled::Done { .. }) => {
                    work.metrics.count(group, "handled", 1);
                    break;
                }
                Ok(Handled::DeadLettered { attempts, error }) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        attempts,
                        %error,
                        "dead-lettered"
                    );
                    work.metrics.count(group, "dead_lettered", 1);
                    break;
                }
                // The message is not finished until it is handled or safely
                // dead-lettered: hold the partition and try again.
                Err(err) => {
                    tracing::warn!(error = %err, "dead letter not sent; trying again");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        let position = (message.topic().to_owned(), message.partition());
        if work.done.send((position, message.offset())).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;

    use super::*;

    fn message(offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    #[tokio::test]
    async fn a_lane_queues_up_to_its_bound_and_the_rest_waits_in_order() {
        let (queue, mut worker) = mpsc::channel(2);
        let mut lane = Lane {
            queue,
            waiting: (0..3).map(message).collect(),
            paused: true,
            cancel: CancellationToken::new(),
            worker: tokio::spawn(async {}),
        };
        refill(&mut lane);
        assert_eq!(lane.waiting.len(), 1, "the bound holds");
        let first = worker.recv().await.map(|m| m.offset());
        assert_eq!(first, Some(0));
        refill(&mut lane);
        assert!(lane.waiting.is_empty());
        let rest: Vec<i64> = [worker.recv().await, worker.recv().await]
            .into_iter()
            .flatten()
            .map(|m| m.offset())
            .collect();
        assert_eq!(rest, [1, 2], "offset order kept");
    }

    #[tokio::test]
    async fn a_closed_lane_keeps_its_messages() {
        let (queue, worker) = mpsc::channel(2);
        drop(worker);
        let mut lane = Lane {
            queue,
            waiting: (0..2).map(message).collect(),
            paused: false,
            cancel: CancellationToken::new(),
            worker: tokio::spawn(async {}),
        };
        refill(&mut lane);
        assert_eq!(lane.waiting.len(), 2, "nothing is dropped on the floor");
    }
}
