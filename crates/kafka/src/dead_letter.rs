//! Dead letters: a message that cannot be decoded, or whose processing keeps
//! failing, goes to `dlq.<topic>` with where it came from and why (headers
//! `dlq.error`, `dlq.attempts`, `dlq.topic`, `dlq.partition`, `dlq.offset`,
//! `dlq.group`, `dlq.time`), and consumption goes on. Processing failures
//! are retried first, with exponential backoff and jitter. Operators list
//! dead letters and replay one to its original topic ([`list`],
//! [`replay`]; also `fabric dlq`).

use crate::brokers::Brokers;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::topics::dead_letter_topic;

/// Why a message was not handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// It will never decode: no point retrying.
    Undecodable(String),
    /// Handling failed; it may work on a retry.
    Failed(String),
    /// It decodes but can never be applied (a reply naming an invalid
    /// saga, say): no point retrying either.
    Rejected(String),
}

/// How a failing message is retried before it becomes a dead letter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub max_attempts: u32,
    /// The pause before the second try; it doubles with each further one.
    pub initial_backoff: Duration,
    /// The longest pause.
    pub max_backoff: Duration,
    /// Share of each pause that is random (0-1).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            jitter: 0.3,
        }
    }
}

impl RetryPolicy {
    /// The pause after `attempt` failed tries; `random` in [0, 1).
    pub fn backoff(&self, attempt: u32, random: f64) -> Duration {
        statefabric_resilience::backoff::exponential(
            self.initial_backoff,
            self.max_backoff,
            2.0,
            self.jitter,
            attempt,
            random,
        )
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Handled, after this many tries.
    Done {
        /// Tries made.
        attempts: u32,
    },
    /// Sent to the dead-letter topic.
    DeadLettered {
        /// Tries made.
        attempts: u32,
        /// The last failure.
        error: String,
    },
}

/// Publishes dead letters for one consumer group.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    group: String,
    timeout: Duration,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

fn now_millis() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string()
}

/// A fraction in [0, 1) from the clock; good enough to spread retries.
fn random() -> f64 {
    f64::from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            % 1000,
    ) / 1000.0
}

impl DeadLetters {
    /// A publisher of `group`'s dead letters, each send within `timeout`.
    pub fn new(
        brokers: &Brokers,
        group: &str,
        timeout: Duration,
    ) -> rdkafka::error::KafkaResult<Self> {
        Ok(Self {
            producer: brokers
                .client()
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .create()?,
            group: group.to_owned(),
            timeout,
        })
    }

    /// Sends `message` to its dead-letter topic, original key, value and
    /// headers kept.
    pub async fn send(
        &self,
        message: &OwnedMessage,
        error: &str,
        attempts: u32,
    ) -> rdkafka::error::KafkaResult<()> {
        let headers = letter_headers(message, error, attempts, &self.group);
        let topic = dead_letter_topic(message.topic());
        let mut record = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.producer
            .send(record, self.timeout)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// Runs `handler` with retries; a message it cannot handle is dead-
    /// lettered. Either way the caller may move past it.
    pub async fn handle<F, Fut>(
        &self,
        message: &OwnedMessage,
        policy: &RetryPolicy,
        handler: F,
    ) -> rdkafka::error::KafkaResult<Handled>
    where
        F: FnMut(&OwnedMessage) -> Fut,
        Fut: std::future::Future<Output = Result<(), Failure>>,
    {
        match attempt(message, policy, handler).await {
            Ok(((), attempts)) => Ok(Handled::Done { attempts }),
            Err((error, attempts)) => {
                self.send(message, &error, attempts).await?;
                Ok(Handled::DeadLettered { attempts, error })
            }
        }
    }
}

/// Runs `handler` under `policy`: `Ok(attempts)` once it succeeds,
/// `Err((error, attempts))` when the message is to be dead-lettered (it
/// does not decode, or every try failed).
pub async fn attempt<M, T, F, Fut>(
    message: &M,
    policy: &RetryPolicy,
    mut handler: F,
) -> Result<(T, u32), (String, u32)>
where
    F: FnMut(&M) -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match handler(message).await {
            Ok(value) => return Ok((value, attempt)),
            Err(Failure::Undecodable(e)) => return Err((format!("undecodable: {e}"), attempt)),
            Err(Failure::Rejected(e)) => return Err((format!("rejected: {e}"), attempt)),
            Err(Failure::Failed(e)) if attempt < policy.max_attempts => {
                tracing::debug!(attempt, error = %e, "handling failed; retrying");
                tokio::time::sleep(policy.backoff(attempt, random())).await;
            }
            Err(Failure::Failed(e)) => return Err((e, attempt)),
        }
    }
}

/// A dead letter's headers: the original ones, then where it came from and
/// why (`dlq.*`).
pub fn letter_headers(
    message: &OwnedMessage,
    error: &str,
    attempts: u32,
    group: &str,
) -> OwnedHeaders {
    let (partition, offset) = (
        message.partition().to_string(),
        message.offset().to_string(),
    );
    let (attempts, time) = (attempts.to_string(), now_millis());
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for h in original.iter() {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    for (key, value) in [
        ("dlq.error", error),
        ("dlq.attempts", attempts.as_str()),
        ("dlq.topic", message.topic()),
        ("dlq.partition", partition.as_str()),
        ("dlq.offset", offset.as_str()),
        ("dlq.group", group),
        ("dlq.time", time.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// A dead letter as listed for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its partition in the dead-letter topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The original message's key.
    pub key: Option<Vec<u8>>,
    /// The original message's value.
    pub payload: Option<Vec<u8>>,
    /// The `dlq.*` headers, without the prefix.
    pub why: std::collections::BTreeMap<String, String>,
}

/// Reads a dead-letter topic from the start to its current end (at most
/// `limit` messages), without joining any group.
pub fn list(
    brokers: &Brokers,
    dlq_topic: &str,
    limit: usize,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<Vec<DeadLetter>> {
    let consumer: BaseConsumer = brokers
        .client()
        .set("group.id", "statefabric-dlq-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(dlq_topic), timeout)?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = std::collections::BTreeMap::new();
    for topic in metadata.topics() {
        for p in topic.partitions() {
            let (low, high) = consumer.fetch_watermarks(dlq_topic, p.id(), timeout)?;
            if high > low {
                assignment.add_partition_offset(dlq_topic, p.id(), Offset::Offset(low))?;
                ends.insert(p.id(), high);
            }
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut positions: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    while out.len() < limit
        && ends
            .iter()
            .any(|(p, end)| positions.get(p).copied().unwrap_or(-1) + 1 < *end)
        && std::time::Instant::now() < deadline
    {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        positions.insert(message.partition(), message.offset());
        let mut why = std::collections::BTreeMap::new();
        if let Some(headers) = message.headers() {
            for h in headers.iter() {
                if let (Some(name), Some(value)) = (h.key.strip_prefix("dlq."), h.value) {
                    why.insert(name.to_owned(), String::from_utf8_lossy(value).into_owned());
                }
            }
        }
        out.push(DeadLetter {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            why,
        });
    }
    Ok(out)
}

/// Why a dead letter could not be sent back.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Kafka failed the read or the send.
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Nothing is at that position.
    #[error("no dead letter at {topic} partition {partition} offset {offset}")]
    NotFound {
        /// The dead-letter topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset.
        offset: i64,
    },
    /// The message is not one of our dead letters.
    #[error("the dead letter has no dlq.topic header: cannot tell where it came from")]
    NoOrigin,
}

/// Sends one dead letter back to the topic it came from (key, value and
/// its original headers; the `dlq.*` ones dropped). Returns that topic.
pub async fn replay(
    brokers: &Brokers,
    dlq_topic: &str,
    partition: i32,
    offset: i64,
    timeout: Duration,
) -> Result<String, ReplayError> {
    let letters = list(brokers, dlq_topic, usize::MAX, timeout)?;
    let letter = letters
        .into_iter()
        .find(|l| l.partition == partition && l.offset == offset)
        .ok_or_else(|| ReplayError::NotFound {
            topic: dlq_topic.to_owned(),
            partition,
            offset,
        })?;
    let origin = letter
        .why
        .get("topic")
        .cloned()
        .ok_or(ReplayError::NoOrigin)?;
    let producer: FutureProducer = brokers.client().set("acks", "all").create()?;
    let headers = OwnedHeaders::new().insert(Header {
        key: "replayed_from",
        value: Some(format!("{dlq_topic}/{partition}/{offset}").as_str()),
    });
    let mut record = FutureRecord::to(&origin).headers(headers);
    if let Some(key) = &letter.key {
        record = record.key(key);
    }
    if let Some(payload) = &letter.payload {
        record = record.payload(payload);
    }
    producer
        .send(record, timeout)
        .await
        .map_err(|(e, _)| ReplayError::Kafka(e))?;
    Ok(origin)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn quick(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            jitter: 0.0,
        }
    }

    #[tokio::test]
    async fn failures_are_retried_up_to_the_limit_and_others_not_at_all() {
        let tries = Cell::new(0);
        let failing = |_: &()| {
            tries.set(tries.get() + 1);
            async { Err::<(), _>(Failure::Failed("down".into())) }
        };
        assert_eq!(
            attempt(&(), &quick(3), failing).await,
            Err(("down".into(), 3))
        );
        assert_eq!(tries.get(), 3);

        let tries = Cell::new(0);
        let flaky = |_: &()| {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move {
                if n < 2 {
                    Err(Failure::Failed("once".into()))
                } else {
                    Ok(n)
                }
            }
        };
        assert_eq!(attempt(&(), &quick(3), flaky).await, Ok((2, 2)));

        for (failure, prefix) in [
            (Failure::Undecodable("x".into()), "undecodable: x"),
            (Failure::Rejected("y".into()), "rejected: y"),
        ] {
            let tries = Cell::new(0);
            let refusing = |_: &()| {
                tries.set(tries.get() + 1);
                let failure = failure.clone();
                async move { Err::<(), _>(failure) }
            };
            assert_eq!(
                attempt(&(), &quick(5), refusing).await,
                Err((prefix.into(), 1))
            );
            assert_eq!(tries.get(), 1, "{prefix}: never retried");
        }
    }

    #[test]
    fn backoff_grows_caps_and_jitters_down() {
        let p = RetryPolicy {
            max_attempts: 9,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            jitter: 0.5,
        };
        let ms: Vec<u128> = (1..=5).map(|a| p.backoff(a, 0.0).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 500, 500]);
        let jittered = p.backoff(2, 0.99).as_millis();
        assert!(
            (100..=102).contains(&jittered),
            "at most half taken off: {jittered}"
        );
    }
}
