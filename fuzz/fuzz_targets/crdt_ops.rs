#![no_main]
//! CRDT op application (`statefabric_domain::crdt`), the heart of merge-
//! typed documents: ops from many writers, applied in two different orders,
//! end in the same state (commutativity); applied twice, they change nothing
//! more (idempotence) — except PN-counter increments, which the store
//! applies exactly once per accepted write; an op refused leaves the state
//! as it was; and the state survives its JSON column.

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use statefabric_domain::{CrdtState, MergeType, Op, Stamp};
use statefabric_fuzz::{SmallJson, name};

#[derive(Debug, Arbitrary)]
enum FuzzOp {
    Set {
        value: SmallJson,
        micros: u8,
        writer: u8,
    },
    Put {
        key: u8,
        value: SmallJson,
        micros: u8,
        writer: u8,
    },
    Remove {
        key: u8,
        micros: u8,
        writer: u8,
    },
    Add {
        element: SmallJson,
        tag: u8,
    },
    Discard {
        element: SmallJson,
        observed: Vec<u8>,
    },
    Increment {
        writer: u8,
        delta: i64,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    merge: u8,
    ops: Vec<FuzzOp>,
    /// Where the second order starts (it runs backwards from there).
    pivot: u16,
}

fn stamp(micros: u8, writer: u8) -> Stamp {
    Stamp {
        micros: u64::from(micros % 8),
        writer: name("w", writer),
    }
}

fn op(op: &FuzzOp) -> Op {
    match op {
        FuzzOp::Set {
            value,
            micros,
            writer,
        } => Op::Set {
            value: value.to_json(),
            stamp: stamp(*micros, *writer),
        },
        FuzzOp::Put {
            key,
            value,
            micros,
            writer,
        } => Op::Put {
            key: name("k", *key),
            value: value.to_json(),
            stamp: stamp(*micros, *writer),
        },
        FuzzOp::Remove {
            key,
            micros,
            writer,
        } => Op::Remove {
            key: name("k", *key),
            stamp: stamp(*micros, *writer),
        },
        FuzzOp::Add { element, tag } => Op::Add {
            element: element.to_json(),
            tag: format!("t{tag}"),
        },
        FuzzOp::Discard { element, observed } => Op::Discard {
            element: element.to_json(),
            observed: observed.iter().map(|t| format!("t{t}")).collect(),
        },
        FuzzOp::Increment { writer, delta } => Op::Increment {
            writer: name("w", *writer),
            delta: *delta,
        },
    }
}

/// Applies `ops`, checking that a refused op leaves the state unchanged;
/// returns which were accepted.
fn apply_all(state: &mut CrdtState, ops: &[&Op]) -> Vec<bool> {
    ops.iter()
        .map(|op| {
            let before = state.clone();
            match state.apply(op) {
                Ok(()) => true,
                Err(e) => {
                    assert_eq!(*state, before, "refused op {op:?} ({e}) changed the state");
                    false
                }
            }
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let merge = [
        MergeType::LwwRegister,
        MergeType::LwwMap,
        MergeType::OrSet,
        MergeType::PnCounter,
    ][usize::from(input.merge % 4)];
    let ops: Vec<Op> = input.ops.iter().map(op).collect();
    let Some(empty) = CrdtState::empty(merge) else {
        unreachable!("merge types have an empty state")
    };

    let forward: Vec<&Op> = ops.iter().collect();
    let mut other: Vec<&Op> = ops.iter().collect();
    if !other.is_empty() {
        let pivot = usize::from(input.pivot) % other.len();
        other.rotate_left(pivot);
        other.reverse();
    }

    let mut a = empty.clone();
    let accepted_a = apply_all(&mut a, &forward);
    let mut b = empty.clone();
    let accepted_b = apply_all(&mut b, &other);

    let counter = merge == MergeType::PnCounter;
    if !counter {
        // Only the op's kind decides acceptance.
        assert!(
            accepted_a
                .iter()
                .zip(&forward)
                .all(|(ok, op)| *ok == op.fits(merge))
        );
        assert!(
            accepted_b
                .iter()
                .zip(&other)
                .all(|(ok, op)| *ok == op.fits(merge))
        );
    }
    if !counter || (accepted_a.iter().all(|ok| *ok) && accepted_b.iter().all(|ok| *ok)) {
        assert_eq!(a, b, "two orders of the same ops disagree");
        assert_eq!(a.materialize(), b.materialize());
    }
    if !counter {
        let mut twice = a.clone();
        apply_all(&mut twice, &forward);
        assert_eq!(twice, a, "applying the ops again changed the state");
    }

    // The state is stored as JSON and read back.
    let stored = serde_json::to_value(&a).expect("state serializes");
    let loaded: CrdtState = serde_json::from_value(stored).expect("stored state loads");
    assert_eq!(loaded, a);
    assert_eq!(loaded.materialize(), a.materialize());
});
