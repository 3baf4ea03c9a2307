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
    #[serde(with = "apache_avro::serde_avro_bytes")]
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
