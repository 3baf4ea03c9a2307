//! Statefabric on Kafka: the client plumbing.
//!
//! Owns the topic plan ([`topics`]: which topics exist, named and configured
//! per class, applied idempotently). What runs on Kafka lives beside what
//! it serves: the outbox relay in `statefabric-relay`, the saga transport
//! in `statefabric-saga-kafka`.
//!
//! Consumer lag per group and partition is measured by [`lag`].
//!
//! Dead letters — retries with backoff, the dead-letter topic, listing and
//! replay — are in [`dead_letter`].
//!
//! Kafka to Postgres exactly once: [`inbox`].
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
mod topic_admin;
pub mod topics;
#[cfg(feature = "client")]
pub mod txn;
