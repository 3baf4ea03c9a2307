//! Input checks every backend applies before it touches storage, so bad input
//! gets the same clear error everywhere and nothing is half-written.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use statefabric_domain::{ExpectedVersion, NewEvent};

use crate::error::InvalidInput;
use crate::port::AppendRequest;

/// Size limits, configurable per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest serialized event (data plus metadata).
    pub max_event_bytes: usize,
    /// Most events in one append.
    pub max_batch_events: usize,
    /// Largest append, all events together.
    pub max_batch_bytes: usize,
    /// Most events one read returns.
    pub max_read_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Events are facts, not blobs: 1 MiB is generous, and keeps one
            // append inside Kafka's default 1 MiB message size with headroom
            // for the envelope once compressed.
            max_event_bytes: 1024 * 1024,
            max_batch_events: 1000,
            max_batch_bytes: 8 * 1024 * 1024,
            max_read_limit: 10_000,
        }
    }
}

/// A fence names a lock as the lock API does and carries a token it
/// granted (tokens start at 1), whatever it guards (an append, a context
/// write).
pub fn check_fence(fence: &crate::port::Fence) -> Result<(), InvalidInput> {
    let ok_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@');
    if fence.lock.is_empty() || fence.lock.len() > 256 || !fence.lock.chars().all(ok_char) {
        return Err(InvalidInput::BadName {
            what: "fence lock",
            value: fence.lock.clone(),
            reason: "lock names are 1-256 ASCII letters, digits or -_.:/@",
        });
    }
    if fence.token == 0 {
        return Err(InvalidInput::Zero {
            what: "fence token",
        });
    }
    Ok(())
}

/// Names (stream and event types) travel into topic names and metrics labels.
pub fn check_name(what: &'static str, value: &str) -> Result<(), InvalidInput> {
    let bad = |reason| InvalidInput::BadName {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(bad("it is empty"));
    }
    if value.len() > 128 {
        return Err(bad("it is longer than 128 bytes"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad(
            "only ASCII letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

impl Limits {
    /// Checks an append against the limits (and its names and ids),
    /// naming the first problem.
    pub fn check_append(&self, request: &AppendRequest) -> Result<(), InvalidInput> {
        check_name("stream type", &request.stream_type)?;
        if let ExpectedVersion::Exact(0) = request.expected {
            return Err(InvalidInput::Zero {
                what: "expected version (use NoStream for a new stream)",
            });
        }
        if request.events.is_empty() {
            return Err(InvalidInput::EmptyBatch);
        }
        if request.events.len() > self.max_batch_events {
            return Err(InvalidInput::TooManyEvents {
                count: request.events.len(),
                max: self.max_batch_events,
            });
        }
        if let Some(fence) = &request.fence {
            check_fence(fence)?;
        }
        if let Some(idem) = &request.idempotency {
            let len = idem.key.len();
            if !(1..=256).contains(&len) {
                return Err(InvalidInput::BadIdempotencyKey { len });
            }
        }
        let mut total = 0usize;
        for (index, event) in request.events.iter().enumerate() {
            let bytes = self.check_event(index, event)?;
            total += bytes;
        }
        if total > self.max_batch_bytes {
            return Err(InvalidInput::BatchTooLarge {
                bytes: total,
                max: self.max_batch_bytes,
            });
        }
        let mut ids: Vec<_> = request.events.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(InvalidInput::BadEvent {
                index: 0,
                reason: format!("event id {} appears twice in the batch", pair[0]),
            });
        }
        Ok(())
    }

    /// Checks one event; returns its serialized size.
    fn check_event(&self, index: usize, event: &NewEvent) -> Result<usize, InvalidInput> {
        check_name("event type", &event.event_type).map_err(|e| InvalidInput::BadEvent {
            index,
            reason: e.to_string(),
        })?;
        if event.schema_version == 0 {
            return Err(InvalidInput::BadEvent {
                index,
                reason: "schema version must be at least 1".to_owned(),
            });
        }
        if let Some(path) = find_nul(&event.data, "data") {
            return Err(InvalidInput::BadEvent {
                index,
                reason: format!("{path} contains a NUL character, which JSON storage cannot hold"),
            });
        }
        let metadata =
            serde_json::to_value(&event.metadata).map_err(|e| InvalidInput::Json(e.to_string()))?;
        if let Some(path) = find_nul(&metadata, "metadata") {
            return Err(InvalidInput::BadEvent {
                index,
                reason: format!("{path} contains a NUL character, which JSON storage cannot hold"),
            });
        }
        let bytes = json_len(&event.data) + json_len(&metadata);
        if bytes > self.max_event_bytes {
            return Err(InvalidInput::EventTooLarge {
                index,
                bytes,
                max: self.max_event_bytes,
            });
        }
        Ok(bytes)
    }

    /// Checks a read's page size.
    pub fn check_read_limit(&self, limit: u32) -> Result<(), InvalidInput> {
        if limit == 0 || limit > self.max_read_limit {
            return Err(InvalidInput::BadLimit {
                got: limit,
                max: self.max_read_limit,
            });
        }
        Ok(())
    }
}

fn json_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

/// Parses event data sent as text, for API edges that receive raw JSON.
pub fn parse_json(text: &str) -> Result<Value, InvalidInput> {
    serde_json::from_str(text).map_err(|e| InvalidInput::Json(e.to_string()))
}

/// Postgres `jsonb` cannot store U+0000 in strings or keys; find the first.
fn find_nul(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_nul(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(format!("{path} (a key)"))
            } else {
                find_nul(v, &format!("{path}.{k}"))
            }
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::Idempotency;
    use serde_json::json;
    use statefabric_domain::StreamId;

    fn request(events: Vec<NewEvent>) -> AppendRequest {
        AppendRequest::new(
            StreamId::new("s-1").expect("id"),
            "task",
            ExpectedVersion::Any,
            events,
        )
    }

    #[test]
    fn accepts_a_normal_batch() {
        let r = request(vec![NewEvent::new("Created", json!({"a": 1}))]);
        assert_eq!(Limits::default().check_append(&r), Ok(()));
    }

    #[test]
    fn refuses_each_kind_of_bad_input() {
        let limits = Limits {
            max_event_bytes: 64,
            max_batch_events: 2,
            max_batch_bytes: 90,
            max_read_limit: 10,
        };
        let ok = || NewEvent::new("E", json!({}));
        assert_eq!(
            limits.check_append(&request(vec![])),
            Err(InvalidInput::EmptyBatch)
        );
        assert!(matches!(
            limits.check_append(&request(vec![ok(), ok(), ok()])),
            Err(InvalidInput::TooManyEvents { count: 3, max: 2 })
        ));
        let big = NewEvent::new("E", json!({"x": "y".repeat(100)}));
        assert!(matches!(
            limits.check_append(&request(vec![big])),
            Err(InvalidInput::EventTooLarge { index: 0, .. })
        ));
        let medium = || NewEvent::new("E", json!({"x": "y".repeat(40)}));
        assert!(matches!(
            limits.check_append(&request(vec![medium(), medium()])),
            Err(InvalidInput::BatchTooLarge { .. })
        ));
        let nul = NewEvent::new("E", json!({"x": ["ok", "bad\u{0}"]}));
        let err = limits
            .check_append(&request(vec![ok(), nul]))
            .expect_err("nul");
        assert!(err.to_string().contains("event 1: data.x[1]"), "{err}");
        let bad_type = NewEvent::new("has space", json!({}));
        assert!(matches!(
            limits.check_append(&request(vec![bad_type])),
            Err(InvalidInput::BadEvent { index: 0, .. })
        ));
        let mut zero_schema = ok();
        zero_schema.schema_version = 0;
        assert!(limits.check_append(&request(vec![zero_schema])).is_err());
        let mut exact_zero = request(vec![ok()]);
        exact_zero.expected = ExpectedVersion::Exact(0);
        assert!(matches!(
            limits.check_append(&exact_zero),
            Err(InvalidInput::Zero { .. })
        ));
        let mut bad_stream_type = request(vec![ok()]);
        bad_stream_type.stream_type = String::new();
        assert!(matches!(
            limits.check_append(&bad_stream_type),
            Err(InvalidInput::BadName {
                what: "stream type",
                ..
            })
        ));
        let dup = ok();
        assert!(
            limits
                .check_append(&request(vec![dup.clone(), dup]))
                .is_err()
        );
        let keyed = request(vec![ok()]).idempotent(Idempotency::for_request("", &1));
        assert!(matches!(
            limits.check_append(&keyed),
            Err(InvalidInput::BadIdempotencyKey { len: 0 })
        ));
        assert!(limits.check_read_limit(0).is_err());
        assert!(limits.check_read_limit(11).is_err());
        assert!(limits.check_read_limit(10).is_ok());
    }

    #[test]
    fn invalid_json_text_is_a_clear_error() {
        let err = parse_json("{\"a\": ").expect_err("invalid");
        assert!(err.to_string().starts_with("invalid JSON"), "{err}");
        assert_eq!(parse_json("[1]"), Ok(json!([1])));
    }

    proptest::proptest! {
        #[test]
        fn any_string_data_is_accepted_iff_it_has_no_nul(s in ".*") {
            let event = NewEvent::new("E", json!({ "s": s.clone() }));
            let result = Limits::default().check_append(&request(vec![event]));
            proptest::prop_assert_eq!(result.is_ok(), !s.contains('\0'));
        }
    }
}
