//! Statefabric on Kafka.
//!
//! Owns the topic plan ([`topics`]: which topics exist, named and configured
//! per class, applied idempotently) and the built-in outbox relay
//! ([`relay`]: the leader moves committed outbox rows to their event
//! topics, Avro-encoded, in Kafka transactions, then deletes them under its
//! leader epoch).
//!
//! Consumer lag per group and partition is measured by [`lag`].
//!
//! Dead letters — retries with backoff, the dead-letter topic, listing and
//! replay — are in [`dead_letter`].
//!
//! Kafka to Postgres exactly once: [`inbox`].
//!
//! Saga tasks and replies over Kafka (the saga engine's production
//! transport): [`saga_transport`].
//!
//! Every client starts from [`brokers::Brokers`]: bootstrap list and SASL
//! login.
//!
//! Every transaction commits through [`txn::commit`] (rust-rdkafka's own
//! commit can stall for 100 ms).
//!
//! How Statefabric consumes — per-partition workers with backpressure by
//! pausing, retries and dead letters, Kafka to Kafka in one transaction,
//! clean stops — is written once in [`consumer`].
//!
//! (Debezium's connector is configuration: `k8s/kafka/`.)
#![warn(missing_docs)]

// Everything that talks to a broker needs librdkafka (the `client`
// feature, on by default); the topic plan's names and settings do not, so
// the embedded build can do without native Kafka libraries.
pub mod acls;
pub mod brokers;
#[cfg(feature = "client")]
pub mod consumer;
#[cfg(feature = "client")]
pub mod dead_letter;
#[cfg(feature = "client")]
pub mod inbox;
#[cfg(feature = "client")]
pub mod lag;
#[cfg(feature = "client")]
pub mod relay;
#[cfg(feature = "client")]
pub mod saga_transport;
#[cfg(feature = "client")]
mod topic_admin;
pub mod topics;
#[cfg(feature = "client")]
pub mod txn;
