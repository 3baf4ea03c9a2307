//! Conversions between the wire types and the domain, validating on the way
//! in: a request that does not convert is refused with INVALID_ARGUMENT
//! naming the field.

use std::collections::BTreeMap;

use statefabric_domain::{
    Checkpoint, EventMetadata, ExpectedVersion, NewEvent, RecordedEvent, StreamId,
};
use statefabric_proto::state::v1 as pb;
use tonic::Status;
use uuid::Uuid;

pub(crate) fn stream_id(field: &str, raw: &str) -> Result<StreamId, Status> {
    StreamId::new(raw).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

pub(crate) fn expected(raw: Option<pb::ExpectedVersion>) -> Result<ExpectedVersion, Status> {
    use pb::expected_version::Kind;
    match raw.and_then(|e| e.kind) {
        None => Err(Status::invalid_argument(
            "expected: required (any, no_stream, stream_exists or exact)",
        )),
        Some(Kind::Any(_)) => Ok(ExpectedVersion::Any),
        Some(Kind::NoStream(_)) => Ok(ExpectedVersion::NoStream),
        Some(Kind::StreamExists(_)) => Ok(ExpectedVersion::StreamExists),
        Some(Kind::Exact(0)) => Err(Status::invalid_argument(
            "expected.exact: versions start at 1; use no_stream for a new stream",
        )),
        Some(Kind::Exact(v)) => Ok(ExpectedVersion::Exact(v)),
    }
}

pub(crate) fn checkpoint(raw: Option<pb::Checkpoint>) -> Checkpoint {
    raw.map_or(Checkpoint::START, |c| Checkpoint {
        commit: c.commit,
        position: c.position,
    })
}

pub(crate) fn checkpoint_to_proto(c: Checkpoint) -> pb::Checkpoint {
    pb::Checkpoint {
        commit: c.commit,
        position: c.position,
    }
}

pub(crate) fn json(field: &str, bytes: &[u8]) -> Result<serde_json::Value, Status> {
    serde_json::from_slice(bytes)
        .map_err(|e| Status::invalid_argument(format!("{field}: invalid JSON: {e}")))
}

/// Converts one event; `clock` is the writer's clock for this append, already
/// ticked by the sidecar.
pub(crate) fn new_event(
    index: usize,
    raw: pb::NewEvent,
    clock: &BTreeMap<String, u64>,
) -> Result<NewEvent, Status> {
    let field = |name: &str| format!("events[{index}].{name}");
    let id = if raw.id.is_empty() {
        Uuid::now_v7()
    } else {
        Uuid::parse_str(&raw.id)
            .map_err(|e| Status::invalid_argument(format!("{}: not a UUID: {e}", field("id"))))?
    };
    if raw.data_json.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{}: required (a JSON document)",
            field("data_json")
        )));
    }
    let data = json(&field("data_json"), &raw.data_json)?;
    let meta = raw.metadata.unwrap_or_default();
    let extra = if meta.extra_json.is_empty() {
        BTreeMap::new()
    } else {
        match json(&field("metadata.extra_json"), &meta.extra_json)? {
            serde_json::Value::Object(map) => map.into_iter().collect(),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "{}: must be a JSON object",
                    field("metadata.extra_json")
                )));
            }
        }
    };
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(NewEvent {
        id,
        event_type: raw.event_type,
        schema_version: raw.schema_version.max(1),
        data,
        metadata: EventMetadata {
            correlation_id: non_empty(meta.correlation_id),
            causation_id: non_empty(meta.causation_id),
            actor: None,
            traceparent: non_empty(meta.traceparent),
            vector_clock: clock.clone(),
            extra,
        },
    })
}

pub(crate) fn recorded_to_proto(event: RecordedEvent) -> pb::RecordedEvent {
    let meta = event.metadata;
    pb::RecordedEvent {
        id: event.id.to_string(),
        stream_id: event.stream_id.to_string(),
        stream_type: event.stream_type,
        event_type: event.event_type,
        schema_version: event.schema_version,
        data_json: serde_json::to_vec(&event.data).unwrap_or_default(),
        metadata: Some(pb::EventMetadata {
            correlation_id: meta.correlation_id.unwrap_or_default(),
            causation_id: meta.causation_id.unwrap_or_default(),
            traceparent: meta.traceparent.unwrap_or_default(),
            vector_clock: meta.vector_clock.into_iter().collect(),
            extra_json: if meta.extra.is_empty() {
                Vec::new()
            } else {
                serde_json::to_vec(&meta.extra).unwrap_or_default()
            },
        }),
        stream_version: event.stream_version,
        global_position: event.global_position,
        checkpoint: Some(checkpoint_to_proto(event.checkpoint)),
        created_at: event.created_at.to_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(data: &[u8]) -> pb::NewEvent {
        pb::NewEvent {
            id: String::new(),
            event_type: "E".into(),
            schema_version: 0,
            data_json: data.to_vec(),
            metadata: None,
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let clock = BTreeMap::new();
        let err = new_event(2, raw(b"{"), &clock).expect_err("invalid json");
        assert!(
            err.message()
                .starts_with("events[2].data_json: invalid JSON"),
            "{}",
            err.message()
        );
        let err = new_event(0, raw(b""), &clock).expect_err("empty");
        assert!(err.message().contains("required"), "{}", err.message());
        let mut bad_id = raw(b"{}");
        bad_id.id = "not-a-uuid".into();
        let err = new_event(0, bad_id, &clock).expect_err("id");
        assert!(
            err.message().starts_with("events[0].id: not a UUID"),
            "{}",
            err.message()
        );
        let mut bad_extra = raw(b"{}");
        bad_extra.metadata = Some(pb::EventMetadata {
            extra_json: b"[1]".to_vec(),
            ..Default::default()
        });
        assert!(new_event(0, bad_extra, &clock).is_err());
        assert!(expected(None).is_err());
        assert!(
            expected(Some(pb::ExpectedVersion {
                kind: Some(pb::expected_version::Kind::Exact(0))
            }))
            .is_err()
        );
        assert!(stream_id("stream_id", "has space").is_err());
    }

    proptest! {
        /// Whatever bytes arrive, conversion either accepts valid JSON or
        /// refuses with INVALID_ARGUMENT; it never panics.
        #[test]
        fn arbitrary_payloads_are_accepted_iff_json(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let result = new_event(0, raw(&bytes), &BTreeMap::new());
            let is_json = !bytes.is_empty() && serde_json::from_slice::<serde_json::Value>(&bytes).is_ok();
            prop_assert_eq!(result.is_ok(), is_json);
            if let Err(status) = result {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            }
        }

        #[test]
        fn stream_ids_convert_iff_valid(s in "\\PC{0,140}") {
            let ok = stream_id("stream_id", &s).is_ok();
            prop_assert_eq!(ok, StreamId::new(s.clone()).is_ok());
        }
    }
}
