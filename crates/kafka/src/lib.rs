//! Statefabric on Kafka.
//!
//! Owns the topic plan ([`topics`]: which topics exist, named and configured
//! per class, applied idempotently) and the built-in outbox relay
//! ([`relay`]: the leader moves committed outbox rows to their event
//! topics, Avro-encoded, in Kafka transactions, then deletes them under its
//! leader epoch).
//!
//! Partial (the Kafka issue): Debezium's connector, the exactly-once consumer
//! framework, dead-letter handling, lag monitoring and ACLs are not here yet.

pub mod relay;
pub mod topics;
