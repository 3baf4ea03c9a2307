//! Rust forms of the schemas, field for field (`schemas/avro/*.avsc`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `io.statefabric.v1.EventEnvelope`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub event_id: String,
    pub tenant_id: String,
    pub stream_id: String,
    pub stream_type: String,
    pub version: i64,
    /// The event store's global position (commit order).
    pub commit_position: i64,
    pub event_type: String,
    pub content_type: String,
    #[serde(with = "apache_avro::serde::bytes")]
    pub payload: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub vector_clock: BTreeMap<String, i64>,
    /// Milliseconds since the epoch.
    pub recorded_at: i64,
}

/// The schema of [`EventEnvelope`] and its subject.
pub fn event_envelope_schema() -> (&'static str, &'static str) {
    (
        "io.statefabric.v1.EventEnvelope",
        include_str!("../../../schemas/avro/event_envelope.avsc"),
    )
}

/// `io.statefabric.v1.SagaCommand`: one attempt of a saga step for an agent
/// type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaCommand {
    /// saga/step/visit/attempt[/undo]
    pub idempotency_key: String,
    pub tenant_id: String,
    pub saga_id: String,
    pub step: String,
    pub visit: i32,
    pub attempt: i32,
    pub compensation: bool,
    pub agent_type: String,
    pub action: String,
    /// JSON.
    #[serde(with = "apache_avro::serde::bytes")]
    pub input: Vec<u8>,
    pub timeout_ms: i64,
    /// Milliseconds since the epoch.
    pub issued_at: i64,
}

pub fn saga_command_schema() -> (&'static str, &'static str) {
    (
        "io.statefabric.v1.SagaCommand",
        include_str!("../../../schemas/avro/saga_command.avsc"),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    #[serde(rename = "COMPLETED")]
    Completed,
    #[serde(rename = "FAILED")]
    Failed,
}

/// `io.statefabric.v1.SagaReply`: an agent's answer to a [`SagaCommand`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaReply {
    pub idempotency_key: String,
    pub tenant_id: String,
    pub saga_id: String,
    pub outcome: Outcome,
    /// JSON, when completed.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    /// The sidecar identity that answered.
    pub agent: String,
    /// Milliseconds since the epoch.
    pub answered_at: i64,
}

pub fn saga_reply_schema() -> (&'static str, &'static str) {
    (
        "io.statefabric.v1.SagaReply",
        include_str!("../../../schemas/avro/saga_reply.avsc"),
    )
}
