use serde::Serialize;
use serde::de::DeserializeOwned;
use statefabric_domain::{Causality, Checkpoint, VectorClock};
use statefabric_proto::state::v1 as pb;

use crate::error::Error;

/// What the writer believes about the stream before appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Whatever the stream holds, or no stream.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist, at any version.
    StreamExists,
    /// The stream's last version (1 or more).
    Exact(u64),
}

impl From<Expected> for pb::ExpectedVersion {
    fn from(e: Expected) -> Self {
        use pb::expected_version::Kind;
        let kind = match e {
            Expected::Any => Kind::Any(pb::Empty {}),
            Expected::NoStream => Kind::NoStream(pb::Empty {}),
            Expected::StreamExists => Kind::StreamExists(pb::Empty {}),
            Expected::Exact(v) => Kind::Exact(v),
        };
        pb::ExpectedVersion { kind: Some(kind) }
    }
}

/// An event to append.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub(crate) raw: pb::NewEvent,
}

impl NewEvent {
    /// An event whose payload is `data` serialized as JSON.
    pub fn json<T: Serialize>(event_type: &str, data: &T) -> Result<Self, Error> {
        Ok(Self::raw_json(event_type, serde_json::to_vec(data)?))
    }

    /// An event from JSON bytes as they are (the sidecar validates them).
    pub fn raw_json(event_type: &str, data_json: Vec<u8>) -> Self {
        Self {
            raw: pb::NewEvent {
                event_type: event_type.to_owned(),
                schema_version: 1,
                data_json,
                ..pb::NewEvent::default()
            },
        }
    }

    /// Gives the event this id (a random one otherwise).
    pub fn with_id(mut self, id: uuid::Uuid) -> Self {
        self.raw.id = id.to_string();
        self
    }

    /// The id that ties this event to the work it is part of.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.metadata().correlation_id = id.into();
        self
    }

    /// The id of what caused this event (a command, another event).
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.metadata().causation_id = id.into();
        self
    }

    /// The clock of what the writer had seen (e.g. the clock of the event it
    /// is reacting to); the sidecar merges it and adds its own tick.
    pub fn after(mut self, seen: &VectorClock) -> Self {
        let meta = self.metadata();
        for (writer, count) in seen.as_map() {
            let entry = meta.vector_clock.entry(writer.clone()).or_insert(0);
            *entry = (*entry).max(*count);
        }
        self
    }

    fn metadata(&mut self) -> &mut pb::EventMetadata {
        self.raw
            .metadata
            .get_or_insert_with(pb::EventMetadata::default)
    }
}

/// An event as recorded.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event's id.
    pub id: String,
    /// The stream it belongs to.
    pub stream_id: String,
    /// The stream's type (fixed at its first append).
    pub stream_type: String,
    /// What happened.
    pub event_type: String,
    /// Its version within the stream (1 for the first).
    pub stream_version: u64,
    /// Its position in the tenant's whole log.
    pub global_position: u64,
    /// Where a subscription resumes after this event.
    pub checkpoint: Checkpoint,
    /// The payload.
    pub data: serde_json::Value,
    /// See [`NewEvent::with_correlation_id`].
    pub correlation_id: String,
    /// See [`NewEvent::with_causation_id`].
    pub causation_id: String,
    /// The writer's vector clock when it was appended.
    pub clock: VectorClock,
}

impl Event {
    /// Decodes the payload into a type of the caller's.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(serde_json::from_value(self.data.clone())?)
    }
}

impl TryFrom<pb::RecordedEvent> for Event {
    type Error = Error;

    fn try_from(raw: pb::RecordedEvent) -> Result<Self, Error> {
        let meta = raw.metadata.unwrap_or_default();
        let checkpoint = raw.checkpoint.unwrap_or_default();
        Ok(Self {
            id: raw.id,
            stream_id: raw.stream_id,
            stream_type: raw.stream_type,
            event_type: raw.event_type,
            stream_version: raw.stream_version,
            global_position: raw.global_position,
            checkpoint: Checkpoint {
                commit: checkpoint.commit,
                position: checkpoint.position,
            },
            data: serde_json::from_slice(&raw.data_json)?,
            correlation_id: meta.correlation_id,
            causation_id: meta.causation_id,
            clock: meta
                .vector_clock
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
                .into(),
        })
    }
}

/// Whether `a` happened before `b`, after it, or concurrently, by their
/// vector clocks.
pub fn causality(a: &Event, b: &Event) -> Causality {
    a.clock.compare(&b.clock)
}
