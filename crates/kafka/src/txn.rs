//! Committing a Kafka transaction without rust-rdkafka's 100 ms stall.
//!
//! rust-rdkafka's `commit_transaction` flushes first, with a zero timeout,
//! and when librdkafka still counts a message it polls the producer's event
//! queue for up to 100 ms before trying again. A message still counts for a
//! moment after its delivery future resolved (librdkafka releases it once
//! the delivery-report callback returns), and the queue that poll waits on
//! is the one a `FutureProducer`'s own thread drains — so a commit started
//! right after the last acknowledgement sometimes sleeps out the full
//! 100 ms. Kafka-bench showed one commit in twenty doing so, which was the
//! relay's p95. Waiting here for the count to reach zero first lets the
//! flush return at once. (Written here rather than patched upstream: the
//! wait is a few lines, and the fix belongs in rust-rdkafka's flush loop.)

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ProducerContext};

/// How often the count of messages librdkafka still holds is checked.
const RECHECK: Duration = Duration::from_micros(100);

/// Commits `producer`'s open transaction once librdkafka holds no message
/// of it (delivered or not) — blocking, like `commit_transaction`. Messages
/// not yet acknowledged are waited for here, for at most `timeout`, as the
/// flush would. For a producer whose events a thread polls (a
/// `FutureProducer` or `ThreadedProducer`, as everywhere here); a
/// `BaseProducer` nobody polls would keep its count and time out.
pub fn commit<P, C>(producer: &P, timeout: Duration) -> KafkaResult<()>
where
    P: Producer<C>,
    C: ProducerContext,
{
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(RECHECK);
    }
    producer.commit_transaction(deadline.saturating_duration_since(Instant::now()))
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    use super::*;

    #[test]
    fn a_message_librdkafka_still_holds_keeps_the_commit_back_until_the_deadline() {
        // Nothing listens there: the message stays queued.
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", "60000")
            .create()
            .expect("producer");
        let _queued = producer
            .send_result(FutureRecord::to("t").key("k").payload("v"))
            .map_err(|(e, _)| e)
            .expect("queued");
        assert!(producer.in_flight_count() > 0);
        let result = commit(&producer, Duration::from_millis(50));
        assert!(
            matches!(
                result,
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
            ),
            "{result:?}"
        );
    }
}
