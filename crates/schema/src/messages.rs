//! Rust forms of the schemas, field for field (`schemas/avro/*.avsc`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `io.statefabric.v1.EventEnvelope`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// The event's id.
    pub event_id: String,
    /// The tenant it belongs to.
    pub tenant_id: String,
    /// Its stream.
    pub stream_id: String,
    /// The stream's type.
    pub stream_type: String,
    /// Its version within the stream.
    pub version: i64,
    /// The event store's global position (commit order).
    pub commit_position: i64,
    /// What happened.
    pub event_type: String,
    /// The payload's media type (`application/json`).
    pub content_type: String,
    /// The payload.
    #[serde(with = "apache_avro::serde::bytes")]
    pub payload: Vec<u8>,
    /// Correlation, causation and trace ids, and the like.
    pub metadata: BTreeMap<String, String>,
    /// The writer's vector clock.
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
    /// The saga's tenant.
    pub tenant_id: String,
    /// The saga.
    pub saga_id: String,
    /// The step of its definition.
    pub step: String,
    /// How many times the saga has entered the step.
    pub visit: i32,
    /// The try of this visit, from 1.
    pub attempt: i32,
    /// True for the step's compensation.
    pub compensation: bool,
    /// The agent type that should handle it.
    pub agent_type: String,
    /// What to do.
    pub action: String,
    /// JSON.
    #[serde(with = "apache_avro::serde::bytes")]
    pub input: Vec<u8>,
    /// Answer or heartbeat within this many milliseconds.
    pub timeout_ms: i64,
    /// Milliseconds since the epoch.
    pub issued_at: i64,
}

/// The schema of [`SagaCommand`] and its subject.
pub fn saga_command_schema() -> (&'static str, &'static str) {
    (
        "io.statefabric.v1.SagaCommand",
        include_str!("../../../schemas/avro/saga_command.avsc"),
    )
}

/// How an agent's attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// It did the work (`output` holds the result).
    #[serde(rename = "COMPLETED")]
    Completed,
    /// It could not (`error` says why).
    #[serde(rename = "FAILED")]
    Failed,
}

/// `io.statefabric.v1.SagaReply`: an agent's answer to a [`SagaCommand`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaReply {
    /// The command's key, which the reply answers.
    pub idempotency_key: String,
    /// The saga's tenant.
    pub tenant_id: String,
    /// The saga.
    pub saga_id: String,
    /// Completed or failed.
    pub outcome: Outcome,
    /// JSON, when completed.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub output: Option<Vec<u8>>,
    /// Why it failed, when failed.
    pub error: Option<String>,
    /// The sidecar identity that answered.
    pub agent: String,
    /// Milliseconds since the epoch.
    pub answered_at: i64,
}

/// The schema of [`SagaReply`] and its subject.
pub fn saga_reply_schema() -> (&'static str, &'static str) {
    (
        "io.statefabric.v1.SagaReply",
        include_str!("../../../schemas/avro/saga_reply.avsc"),
    )
}
