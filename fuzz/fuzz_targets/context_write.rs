#![no_main]
//! A context write as the store decides it (`statefabric_store::context::
//! decide`, pure, called by both backends): JSON Patch documents and CRDT
//! ops as an agent sends them (raw JSON), puts and deletes, against a current
//! document and a base vector. Never panics; an accepted write advances the
//! revision by one, its vector covers both the stored one and the writer's
//! base plus its own tick, the content stays within the size limit, a merge-
//! typed document's content is its merge state materialized, and a refused
//! patch (RFC 6902: all or nothing) is refused as a whole.

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use statefabric_domain::{CrdtState, MergeType, Op, VectorClock};
use statefabric_fuzz::{SmallJson, name};
use statefabric_store::context::{ContextChange, ContextWrite, MAX_DOCUMENT_BYTES, Stored, decide};

#[derive(Debug, Arbitrary)]
enum Change {
    Put(SmallJson),
    /// Raw bytes, parsed as the sidecar parses `patch_json`.
    Patch(Vec<u8>),
    /// Raw bytes, parsed as a list of ops.
    Merge(Vec<u8>),
    /// Well-formed ops built from small values.
    MergeOps(Vec<(u8, SmallJson, i64)>),
    Delete,
}

#[derive(Debug, Arbitrary)]
struct Input {
    merge: u8,
    /// None: no document yet.
    current: Option<(SmallJson, Vec<(u8, u8)>, bool)>,
    base: Vec<(u8, u8)>,
    change: Change,
    write_merge: bool,
}

fn vector(entries: &[(u8, u8)]) -> VectorClock {
    VectorClock::from(
        entries
            .iter()
            .map(|(w, n)| (name("w", *w), u64::from(*n % 4)))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn ops_from(raw: &[(u8, SmallJson, i64)]) -> Vec<Op> {
    raw.iter()
        .map(|(kind, value, n)| match kind % 4 {
            0 => Op::Put {
                key: name("k", *kind),
                value: value.to_json(),
                stamp: statefabric_domain::Stamp {
                    micros: (*n as u64) % 8,
                    writer: name("w", *kind),
                },
            },
            1 => Op::Add {
                element: value.to_json(),
                tag: format!("t{n}"),
            },
            2 => Op::Increment {
                writer: name("w", *kind),
                delta: *n,
            },
            _ => Op::Set {
                value: value.to_json(),
                stamp: statefabric_domain::Stamp {
                    micros: (*n as u64) % 8,
                    writer: name("w", *kind),
                },
            },
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let merge = [
        MergeType::None,
        MergeType::LwwRegister,
        MergeType::LwwMap,
        MergeType::OrSet,
        MergeType::PnCounter,
    ][usize::from(input.merge % 5)];
    let current = input.current.as_ref().map(|(content, v, deleted)| {
        let crdt = CrdtState::empty(merge);
        Stored {
            merge,
            // A merge-typed document's content is its materialized state.
            content: match &crdt {
                _ if *deleted => serde_json::Value::Null,
                Some(state) => state.materialize(),
                None => content.to_json(),
            },
            crdt,
            vector: vector(v),
            revision: 1 + v.len() as u64,
            deleted: *deleted,
        }
    });
    let change = match &input.change {
        Change::Put(v) => ContextChange::Put(v.to_json()),
        Change::Patch(bytes) => match serde_json::from_slice::<json_patch::Patch>(bytes) {
            Ok(patch) => ContextChange::Patch(patch),
            Err(_) => return,
        },
        Change::Merge(bytes) => match serde_json::from_slice::<Vec<Op>>(bytes) {
            Ok(ops) => ContextChange::Merge(ops),
            Err(_) => return,
        },
        Change::MergeOps(raw) => ContextChange::Merge(ops_from(raw)),
        Change::Delete => ContextChange::Delete,
    };
    let write = ContextWrite {
        id: "doc-1".to_owned(),
        merge: if input.write_merge {
            merge
        } else {
            MergeType::None
        },
        base: vector(&input.base),
        change,
        idempotency: None,
        fence: None,
        known: None,
    };
    let Ok(next) = decide(current.as_ref(), &write, "writer-1", 42) else {
        return;
    };
    let revision = current.as_ref().map_or(0, |c| c.revision);
    assert_eq!(next.revision, revision + 1);
    if let Some(current) = &current {
        assert!(current.vector.dominated_by(&next.vector));
        assert_eq!(next.merge, current.merge, "a write changed the merge type");
    }
    assert!(write.base.dominated_by(&next.vector));
    let stored_tick = current.as_ref().map_or(0, |c| c.vector.get("writer-1"));
    assert!(next.vector.get("writer-1") > stored_tick.max(write.base.get("writer-1")));
    let size = serde_json::to_vec(&next.content).map_or(usize::MAX, |v| v.len());
    assert!(size <= MAX_DOCUMENT_BYTES);
    if next.deleted {
        assert_eq!(next.content, serde_json::Value::Null);
    }
    match (&next.crdt, next.merge) {
        (None, MergeType::None) => {}
        // A deleted document's content is null; its state starts afresh.
        (Some(state), m) if m != MergeType::None && !next.deleted => {
            assert_eq!(state.merge_type(), m);
            assert_eq!(
                state.materialize(),
                next.content,
                "content is not the merge state"
            );
        }
        (Some(state), m) if m != MergeType::None => {
            assert_eq!(Some(state), CrdtState::empty(m).as_ref());
        }
        (crdt, m) => panic!("a {m:?} document with merge state {crdt:?}"),
    }
    if let (ContextChange::Patch(patch), Some(current)) = (&write.change, &current) {
        let mut expected = current.content.clone();
        json_patch::patch(&mut expected, patch).expect("an accepted patch applies");
        assert_eq!(next.content, expected);
    }
});
