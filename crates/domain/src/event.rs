//! Events as the store records them, and what a writer expects of a stream.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::id::{StreamId, TenantId};

/// What the writer believes about a stream's current version. A stale belief
/// makes the append fail with the actual version and write nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "version", rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// Append whatever the stream's state.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist, at any version.
    StreamExists,
    /// The stream's last event must have exactly this version (1-based).
    Exact(u64),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("an existing stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// Causality and tracing data carried by every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Ties the event to the work it is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// What caused it (a command, another event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Who wrote it (the sidecar's identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// W3C `traceparent` of the writing request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The writer's vector clock (writer id -> counter) when it wrote.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vector_clock: BTreeMap<String, u64>,
    /// Anything else the application wants to keep with the event.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Unique across the store; also the outbox message id and the dedupe
    /// key downstream consumers use.
    pub id: Uuid,
    /// What happened.
    pub event_type: String,
    /// Version of this event type's payload schema, starting at 1.
    pub schema_version: u32,
    /// The payload.
    pub data: Value,
    /// Causality and tracing data.
    #[serde(default)]
    pub metadata: EventMetadata,
}

impl NewEvent {
    /// An event with a fresh time-ordered id, schema version 1 and no metadata.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            data,
            metadata: EventMetadata::default(),
        }
    }

    /// The event with `metadata`.
    pub fn with_metadata(mut self, metadata: EventMetadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A position in a store's commit-ordered feed (see the store's
/// `subscribe_all`). Ordered by commit, then by global position; only
/// meaningful for the backend that produced it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Checkpoint {
    /// The writing transaction (Postgres `xid8`), or 0 where commits are
    /// already in position order (SQLite).
    pub commit: u64,
    /// The event's global position.
    pub position: u64,
}

impl Checkpoint {
    /// Before everything.
    pub const START: Checkpoint = Checkpoint {
        commit: 0,
        position: 0,
    };
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.commit, self.position)
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The event's id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its stream.
    pub stream_id: StreamId,
    /// The stream's type.
    pub stream_type: String,
    /// What happened.
    pub event_type: String,
    /// Version of the payload's schema.
    pub schema_version: u32,
    /// The payload.
    pub data: Value,
    /// Causality and tracing data.
    pub metadata: EventMetadata,
    /// 1-based position within its stream.
    pub stream_version: u64,
    /// Store-wide position, assigned at insert (not commit) time.
    pub global_position: u64,
    /// Where this event sits in the commit-ordered feed.
    pub checkpoint: Checkpoint,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// An aggregate's state at a stream version, so loading need not replay from
/// the first event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The stream's type.
    pub stream_type: String,
    /// The stream version the state reflects.
    pub version: u64,
    /// The aggregate's state, serialized.
    pub state: Value,
    /// Version of the state's own schema, so old snapshots can be ignored
    /// after the aggregate's state shape changes.
    pub schema_version: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_order_by_commit_then_position() {
        let a = Checkpoint {
            commit: 10,
            position: 7,
        };
        let b = Checkpoint {
            commit: 11,
            position: 3,
        };
        assert!(a < b);
        assert!(Checkpoint::START < a);
    }

    #[test]
    fn expected_version_serializes_readably() {
        let json = serde_json::to_string(&ExpectedVersion::Exact(3)).expect("json");
        assert_eq!(json, r#"{"kind":"exact","version":3}"#);
        let any: ExpectedVersion = serde_json::from_str(r#"{"kind":"any"}"#).expect("json");
        assert_eq!(any, ExpectedVersion::Any);
    }
}
