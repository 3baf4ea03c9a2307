//! What Statefabric puts on Kafka, and how it is framed.
//!
//! Owns the Avro schemas of every message the system emits (`schemas/avro/`,
//! embedded by [`catalog`]): the domain event envelope, saga commands and
//! replies, saga state changes, context changes and the dead-letter
//! envelope; the client of a Confluent-compatible Schema Registry
//! ([`registry`]); the idempotent registration step with BACKWARD
//! compatibility ([`catalog::register_all`]); the Confluent wire format —
//! magic byte 0, 4-byte schema id, Avro body ([`wire`]); and the codec that
//! encodes with a registered schema and decodes by the id in the message,
//! keeping the schemas it fetched ([`codec`]).
//!
//! Subject naming: **RecordNameStrategy** — the subject is the record's full
//! name (`io.statefabric.v1.EventEnvelope`), not the topic. Event topics are
//! per aggregate type and dead-letter topics per consumed topic, so one
//! record type travels on many topics; one subject per record type means its
//! evolution is checked once, for every topic that carries it, and a topic
//! may carry more than one type.
//!
//! It does not own producing or consuming: the Kafka crate does.
#![warn(missing_docs)]

pub mod catalog;
pub mod codec;
pub mod messages;
pub mod registry;
pub mod wire;

pub use codec::{AvroCodec, CodecError};
pub use registry::{RegistryClient, RegistryError};
