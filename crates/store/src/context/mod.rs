//! Shared context documents: the port, and the rules every backend applies
//! to a write ([`decide`]) so both adapters agree on what a write means.
//!
//! A document carries a version vector. A plain document (`MergeType::None`)
//! accepts a write only from a writer that has seen its current version: the
//! vector the writer read must equal the stored one; if the stored one has
//! moved on (a concurrent change the writer missed) the write is refused with
//! the current vector. A merge-typed document accepts concurrent writes and
//! merges them through its CRDT operations. Every accepted write bumps the
//! revision (which deltas are computed against) and ticks the writer's
//! entry in the vector.

pub mod pg;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use statefabric_domain::{CrdtError, CrdtState, MergeType, Op, TenantId, VectorClock};

use crate::error::{InvalidInput, Result, StoreError};
use crate::port::{Idempotency, Scope};

/// Revisions kept per document for computing deltas, at least; older ones
/// get the full document.
pub const REVISIONS_KEPT: u64 = 32;

/// Revisions are trimmed on every this-many-th write of a document, not on
/// each: between [`REVISIONS_KEPT`] and `REVISIONS_KEPT + TRIM_EVERY - 1`
/// are kept, and fifteen writes in sixteen skip the statement.
pub const TRIM_EVERY: u64 = 16;

/// Largest document content, serialized.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// A document as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextDocument {
    /// Its id (stream-id rules).
    pub id: String,
    /// How concurrent writes combine; fixed at creation.
    pub merge: MergeType,
    /// The JSON content (for merge types, the CRDT's value).
    pub content: Value,
    /// Writer id → writes of that writer seen.
    pub vector: VectorClock,
    /// Increases by one with every accepted write, from 1.
    pub revision: u64,
    /// Deleted (the row stays, so the revision goes on from here).
    pub deleted: bool,
    /// When the last write was stored.
    pub updated_at: DateTime<Utc>,
    /// CRDT state for merge-typed documents.
    #[serde(skip)]
    pub crdt: Option<CrdtState>,
}

/// What a write does.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextChange {
    /// Replace the content (plain documents and LWW registers).
    Put(Value),
    /// Apply an RFC 6902 JSON Patch (plain documents).
    Patch(json_patch::Patch),
    /// Apply CRDT operations (merge-typed documents).
    Merge(Vec<Op>),
    /// Mark the document deleted.
    Delete,
}

/// One write to a document.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextWrite {
    /// The document.
    pub id: String,
    /// The merge type; fixed when the document is created.
    pub merge: MergeType,
    /// The vector the writer read; empty for "I have seen nothing" (create).
    pub base: VectorClock,
    /// What it does.
    pub change: ContextChange,
    /// Makes a repeat of the write a replay of the first.
    pub idempotency: Option<Idempotency>,
    /// Refuse the write if a newer token of this lock was already used.
    pub fence: Option<crate::port::Fence>,
    /// The document as the caller last saw it stored (a cache entry), if
    /// it has it: a store may decide on it instead of reading the document
    /// first. Only ever a hint — the write is conditional on the revision,
    /// so an out-of-date one costs a read and another try, not a wrong
    /// write.
    pub known: Option<std::sync::Arc<ContextDocument>>,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextOutcome {
    /// The document after it (replayed: after the first execution).
    pub document: ContextDocument,
    /// True when an idempotency key matched an earlier write.
    pub replayed: bool,
}

/// Where context documents live; each call is confined to one tenant.
#[async_trait]
pub trait ContextStore: Send + Sync + std::fmt::Debug + 'static {
    /// A document (deleted ones too, marked); `None` when it never existed.
    async fn get(&self, tenant: &TenantId, id: &str) -> Result<Option<ContextDocument>>;
    /// The content at an earlier revision, if still kept.
    async fn content_at(&self, tenant: &TenantId, id: &str, revision: u64)
    -> Result<Option<Value>>;
    /// Decides and applies a write ([`decide`]): its revision, its audit
    /// row and its idempotency record are stored together.
    async fn write(&self, scope: &Scope, write: ContextWrite) -> Result<ContextOutcome>;
}

/// What every backend checks of a write before anything else: its id and
/// its fence's shape (a malformed fence is the caller's error, never a
/// failed constraint of the store's).
pub(crate) fn check_write(write: &ContextWrite) -> Result<(), InvalidInput> {
    check_id(&write.id)?;
    if let Some(fence) = &write.fence {
        crate::limits::check_fence(fence)?;
    }
    Ok(())
}

/// Document ids follow stream-id rules (they key caches and notifications).
pub fn check_id(id: &str) -> Result<(), InvalidInput> {
    statefabric_domain::StreamId::new(id)
        .map(|_| ())
        .map_err(|e| InvalidInput::BadName {
            what: "document id",
            value: id.to_owned(),
            reason: match e {
                statefabric_domain::IdError::Empty { .. } => "it is empty",
                statefabric_domain::IdError::TooLong { .. } => "it is longer than 128 bytes",
                statefabric_domain::IdError::BadChar { .. } => {
                    "only ASCII letters, digits and '-', '_', '.', ':', '@' are allowed"
                }
            },
        })
}

/// The stored form a backend reads and writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The merge type.
    pub merge: MergeType,
    /// The content.
    pub content: Value,
    /// The CRDT state (merge types).
    pub crdt: Option<CrdtState>,
    /// The version vector.
    pub vector: VectorClock,
    /// The revision.
    pub revision: u64,
    /// Whether deleted.
    pub deleted: bool,
}

impl From<&ContextDocument> for Stored {
    fn from(doc: &ContextDocument) -> Self {
        Self {
            merge: doc.merge,
            content: doc.content.clone(),
            crdt: doc.crdt.clone(),
            vector: doc.vector.clone(),
            revision: doc.revision,
            deleted: doc.deleted,
        }
    }
}

/// A stored document's columns as both backends read them (JSON columns
/// already parsed), checked into [`Stored`]; a bad value is reported as
/// corrupt storage naming the column.
pub(crate) fn decode_stored(
    merge: &str,
    content: Value,
    crdt: Option<Value>,
    vector: Value,
    revision: i64,
    deleted: bool,
) -> Result<Stored> {
    let merge = MergeType::parse(merge).ok_or_else(|| corrupt("merge type", merge.to_owned()))?;
    let crdt: Option<CrdtState> = crdt
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| corrupt("crdt state", e.to_string()))?;
    let vector: VectorClock =
        serde_json::from_value(vector).map_err(|e| corrupt("version vector", e.to_string()))?;
    Ok(Stored {
        merge,
        content,
        crdt,
        vector,
        revision: u64::try_from(revision).unwrap_or_default(),
        deleted,
    })
}

/// An error for a stored value that does not parse.
pub(crate) fn corrupt(what: &str, detail: String) -> StoreError {
    StoreError::Backend(sqlx::Error::Decode(
        format!("stored {what}: {detail}").into(),
    ))
}

/// [`decide`] on the caller's `known` document instead of a read, when the
/// write carries one for its own id and it allows the write. `None` means
/// read the document: a refusal on the hint may be the hint's being out of
/// date, so only what is stored may refuse.
pub(crate) fn decide_on_known(write: &ContextWrite, writer: &str) -> Option<Stored> {
    let known = write
        .known
        .as_deref()
        .filter(|known| known.id == write.id)?;
    decide(Some(&Stored::from(known)), write, writer, now_micros()).ok()
}

/// The hybrid clock's reading for a decision: microseconds since the epoch.
pub(crate) fn now_micros() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or_default()
}

/// Decides what `write` by `writer` (at hybrid time `now_micros`) turns the
/// current document into, or why it is refused. Pure: both backends call it
/// with the row they locked.
pub fn decide(
    current: Option<&Stored>,
    write: &ContextWrite,
    writer: &str,
    now_micros: u64,
) -> Result<Stored> {
    check_id(&write.id)?;
    if let Some(current) = current
        && current.merge != write.merge
    {
        return Err(InvalidInput::BadName {
            what: "merge type",
            value: write.merge.as_str().to_owned(),
            reason: "the document was created with another merge type",
        }
        .into());
    }
    let empty = VectorClock::new();
    let stored_vector = current.map_or(&empty, |c| &c.vector);
    // A vector naming writes the document never had is malformed (or from
    // another document), whatever the merge type.
    if !write.base.dominated_by(stored_vector) {
        return Err(InvalidInput::BadEvent {
            index: 0,
            reason: format!(
                "version vector {:?} names writes document {} never had (it is at {:?})",
                write.base.as_map(),
                write.id,
                stored_vector.as_map()
            ),
        }
        .into());
    }
    if write.merge == MergeType::None && !stored_vector.dominated_by(&write.base) {
        return Err(StoreError::ContextConflict {
            id: write.id.clone(),
            current: stored_vector.clone(),
        });
    }

    let live = current.filter(|c| !c.deleted);
    let mut next = Stored {
        merge: write.merge,
        content: live.map_or(Value::Null, |c| c.content.clone()),
        crdt: live
            .and_then(|c| c.crdt.clone())
            .or_else(|| CrdtState::empty(write.merge)),
        vector: stored_vector.clone(),
        revision: current.map_or(0, |c| c.revision) + 1,
        deleted: false,
    };
    match (&write.change, write.merge) {
        (ContextChange::Delete, _) => {
            if live.is_none() {
                return Err(StoreError::DocumentNotFound(write.id.clone()));
            }
            next.deleted = true;
            next.content = Value::Null;
            next.crdt = CrdtState::empty(write.merge);
        }
        (ContextChange::Put(value), MergeType::None) => next.content = value.clone(),
        (ContextChange::Put(value), MergeType::LwwRegister) => {
            let op = Op::Set {
                value: value.clone(),
                stamp: statefabric_domain::Stamp {
                    micros: now_micros,
                    writer: writer.to_owned(),
                },
            };
            apply_ops(&write.id, &mut next, &[op])?;
        }
        (ContextChange::Patch(patch), MergeType::None) => {
            if live.is_none() {
                return Err(StoreError::DocumentNotFound(write.id.clone()));
            }
            json_patch::patch(&mut next.content, patch)
                .map_err(|e| InvalidInput::Json(format!("JSON Patch does not apply: {e}")))?;
        }
        (ContextChange::Merge(ops), merge) if merge != MergeType::None => {
            apply_ops(&write.id, &mut next, ops)?
        }
        (change, merge) => {
            return Err(InvalidInput::BadName {
                what: "change",
                value: match change {
                    ContextChange::Put(_) => "put",
                    ContextChange::Patch(_) => "patch",
                    ContextChange::Merge(_) => "merge",
                    ContextChange::Delete => "delete",
                }
                .to_owned(),
                reason: match merge {
                    MergeType::None => "plain documents take put, patch or delete",
                    MergeType::LwwRegister => "LWW registers take put, merge or delete",
                    _ => "merge-typed documents take merge operations or delete",
                },
            }
            .into());
        }
    }
    let size = serde_json::to_vec(&next.content).map_or(0, |v| v.len());
    if size > MAX_DOCUMENT_BYTES {
        return Err(InvalidInput::EventTooLarge {
            index: 0,
            bytes: size,
            max: MAX_DOCUMENT_BYTES,
        }
        .into());
    }
    next.vector.merge(&write.base);
    next.vector.tick(writer, 0);
    Ok(next)
}

fn apply_ops(id: &str, next: &mut Stored, ops: &[Op]) -> Result<()> {
    if ops.is_empty() {
        return Err(InvalidInput::EmptyBatch.into());
    }
    let Some(state) = next.crdt.as_mut() else {
        return Err(InvalidInput::Json("document has no merge state".into()).into());
    };
    for op in ops {
        state.apply(op).map_err(|e| match e {
            CrdtError::WrongOp(wrong) => StoreError::from(InvalidInput::BadEvent {
                index: 0,
                reason: wrong.to_string(),
            }),
            range @ CrdtError::OutOfRange { .. } => StoreError::OutOfRange {
                id: id.to_owned(),
                reason: range.to_string(),
            },
        })?;
    }
    next.content = state.materialize();
    Ok(())
}

/// The document as returned to callers.
pub fn to_document(id: &str, stored: Stored, updated_at: DateTime<Utc>) -> ContextDocument {
    ContextDocument {
        id: id.to_owned(),
        merge: stored.merge,
        content: stored.content,
        vector: stored.vector,
        revision: stored.revision,
        deleted: stored.deleted,
        updated_at,
        crdt: stored.crdt,
    }
}

/// The audit action of a change.
pub fn action(change: &ContextChange) -> &'static str {
    match change {
        ContextChange::Put(_) => "context.put",
        ContextChange::Patch(_) => "context.patch",
        ContextChange::Merge(_) => "context.merge",
        ContextChange::Delete => "context.delete",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(merge: MergeType, base: VectorClock, change: ContextChange) -> ContextWrite {
        ContextWrite {
            id: "plan".into(),
            merge,
            base,
            change,
            idempotency: None,
            fence: None,
            known: None,
        }
    }

    #[test]
    fn plain_documents_refuse_writers_that_missed_a_change() {
        let created = decide(
            None,
            &write(
                MergeType::None,
                VectorClock::new(),
                ContextChange::Put(json!({"a": 1})),
            ),
            "p",
            1,
        )
        .expect("create");
        assert_eq!(created.revision, 1);
        assert_eq!(created.vector.get("p"), 1);
        // Another writer who read the first version updates it.
        let second = decide(
            Some(&created),
            &write(
                MergeType::None,
                created.vector.clone(),
                ContextChange::Patch(
                    serde_json::from_value(json!([{"op": "add", "path": "/b", "value": 2}]))
                        .expect("patch"),
                ),
            ),
            "c",
            2,
        )
        .expect("update");
        assert_eq!(second.content, json!({"a": 1, "b": 2}));
        // The first writer, still holding the old vector, is refused.
        let err = decide(
            Some(&second),
            &write(
                MergeType::None,
                created.vector.clone(),
                ContextChange::Put(json!({})),
            ),
            "p",
            3,
        )
        .expect_err("stale");
        assert!(matches!(err, StoreError::ContextConflict { .. }), "{err}");
        // A vector from the future is malformed.
        let mut future = second.vector.clone();
        future.tick("ghost", 9);
        let err = decide(
            Some(&second),
            &write(MergeType::None, future, ContextChange::Put(json!({}))),
            "p",
            3,
        )
        .expect_err("future");
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    }

    #[test]
    fn merge_typed_documents_accept_concurrent_writes() {
        let add = |n: i64| {
            ContextChange::Merge(vec![Op::Increment {
                writer: "x".into(),
                delta: n,
            }])
        };
        let one = decide(
            None,
            &write(MergeType::PnCounter, VectorClock::new(), add(5)),
            "a",
            1,
        )
        .expect("create");
        // Two writers who both read `one` write concurrently: both land.
        let two = decide(
            Some(&one),
            &write(MergeType::PnCounter, one.vector.clone(), add(-2)),
            "b",
            2,
        )
        .expect("b");
        let three = decide(
            Some(&two),
            &write(MergeType::PnCounter, one.vector.clone(), add(10)),
            "c",
            3,
        )
        .expect("c");
        assert_eq!(three.content, json!(13));
        assert_eq!(three.vector.get("b"), 1);
        assert_eq!(three.vector.get("c"), 1);
    }

    #[test]
    fn bad_changes_are_refused() {
        let bad_patch: json_patch::Patch =
            serde_json::from_value(json!([{"op": "remove", "path": "/missing"}])).expect("patch");
        let doc = decide(
            None,
            &write(
                MergeType::None,
                VectorClock::new(),
                ContextChange::Put(json!({})),
            ),
            "p",
            1,
        )
        .expect("create");
        let err = decide(
            Some(&doc),
            &write(
                MergeType::None,
                doc.vector.clone(),
                ContextChange::Patch(bad_patch),
            ),
            "p",
            2,
        )
        .expect_err("patch");
        assert!(err.to_string().contains("JSON Patch"), "{err}");
        let err = decide(
            Some(&doc),
            &write(MergeType::OrSet, doc.vector.clone(), ContextChange::Delete),
            "p",
            2,
        )
        .expect_err("type");
        assert!(err.to_string().contains("merge type"), "{err}");
        let err = decide(
            None,
            &write(
                MergeType::None,
                VectorClock::new(),
                ContextChange::Merge(vec![]),
            ),
            "p",
            1,
        )
        .expect_err("merge on plain");
        assert!(err.to_string().contains("plain documents"), "{err}");
        let err = decide(
            None,
            &write(MergeType::None, VectorClock::new(), ContextChange::Delete),
            "p",
            1,
        )
        .expect_err("missing");
        assert!(matches!(err, StoreError::DocumentNotFound(_)), "{err}");
        let mut bad_id = write(
            MergeType::None,
            VectorClock::new(),
            ContextChange::Put(json!(1)),
        );
        bad_id.id = "has space".into();
        assert!(decide(None, &bad_id, "p", 1).is_err());
    }
}
