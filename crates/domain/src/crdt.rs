//! Merge types for shared context documents whose concurrent writes must
//! merge instead of conflict: last-writer-wins register and map,
//! observed-remove set, PN-counter.
//!
//! Each is operation-based: a write becomes an [`Op`] stamped by its writer
//! (timestamp, writer id, unique tag, observed tags), and applying ops is
//! commutative and associative, so every replica that applies the same ops
//! ends in the same state whatever the order. Register, map and set ops are
//! also idempotent; counter increments are not, so the store applies each
//! accepted write's ops exactly once (fuzz/fuzz_targets/crdt_ops checks all
//! of this, and that the state survives its JSON column). Hand-written rather
//! than taken from the `crdts` crate: the state must live in a JSON column
//! and materialize to plain JSON, and the ops must carry JSON values, which
//! that crate's generic types would need adapters for on every side.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The merge type of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeType {
    /// No merging: concurrent writes conflict (version vectors decide).
    None,
    /// One value; the write with the latest stamp wins.
    LwwRegister,
    /// A JSON object; each key's latest write wins.
    LwwMap,
    /// A set where an add concurrent with a remove survives.
    OrSet,
    /// A counter of increments and decrements that never conflict.
    PnCounter,
}

impl MergeType {
    /// The merge type named `s` (`none`, `lww_register`, …).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "lww_register" => Self::LwwRegister,
            "lww_map" => Self::LwwMap,
            "or_set" => Self::OrSet,
            "pn_counter" => Self::PnCounter,
            _ => return None,
        })
    }

    /// Its name, as [`MergeType::parse`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::LwwRegister => "lww_register",
            Self::LwwMap => "lww_map",
            Self::OrSet => "or_set",
            Self::PnCounter => "pn_counter",
        }
    }
}

/// A last-writer-wins stamp: timestamp, then writer id breaks ties, so any
/// two stamps are ordered the same way everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Microseconds since the epoch, on the writer's clock.
    pub micros: u64,
    /// The writer's id.
    pub writer: String,
}

/// One update to a merge-typed document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// LWW register: replace the value.
    Set {
        /// The new value.
        value: Value,
        /// When and by whom.
        stamp: Stamp,
    },
    /// LWW map: set one key; a null value removes it.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Value,
        /// When and by whom.
        stamp: Stamp,
    },
    /// LWW map: remove one key.
    Remove {
        /// The key.
        key: String,
        /// When and by whom.
        stamp: Stamp,
    },
    /// OR-set: add an element under a tag unique to this add.
    Add {
        /// The element.
        element: Value,
        /// This add's unique tag.
        tag: String,
    },
    /// OR-set: remove the tags of `element` the writer had observed. Adds it
    /// had not seen survive (add wins).
    Discard {
        /// The element.
        element: Value,
        /// The tags of its adds the writer had seen.
        observed: BTreeSet<String>,
    },
    /// PN-counter: add `delta` (may be negative) on behalf of `writer`.
    Increment {
        /// Whose share of the counter changes.
        writer: String,
        /// The change.
        delta: i64,
    },
}

impl Op {
    /// Whether this op belongs to `merge` documents.
    pub fn fits(&self, merge: MergeType) -> bool {
        matches!(
            (self, merge),
            (Op::Set { .. }, MergeType::LwwRegister)
                | (Op::Put { .. } | Op::Remove { .. }, MergeType::LwwMap)
                | (Op::Add { .. } | Op::Discard { .. }, MergeType::OrSet)
                | (Op::Increment { .. }, MergeType::PnCounter)
        )
    }
}

/// The replicated state of a merge-typed document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CrdtState {
    /// A register's value and the stamp of the write that set it.
    LwwRegister {
        /// The value (null before any write).
        value: Value,
        /// The winning write's stamp (none before any write).
        stamp: Option<Stamp>,
    },
    /// A map's entries, removals kept with their stamps.
    LwwMap {
        /// key -> (value, or `None` for a removal, and its stamp).
        entries: BTreeMap<String, (Option<Value>, Stamp)>,
    },
    /// A set's elements with the tags of their adds.
    OrSet {
        /// Canonical JSON of an element -> its live and removed tags.
        adds: BTreeMap<String, BTreeSet<String>>,
        /// Tags removed (an element is present while it has a live tag).
        removed: BTreeSet<String>,
    },
    /// A counter: each writer's total increments and decrements.
    PnCounter {
        /// Increments by writer.
        increments: BTreeMap<String, u64>,
        /// Decrements by writer (as positive numbers).
        decrements: BTreeMap<String, u64>,
    },
}

/// Why an op cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {op} operation does not apply to a {merge} document")]
pub struct WrongOp {
    /// The op's name.
    pub op: &'static str,
    /// The document's merge type.
    pub merge: &'static str,
}

/// Why an op was refused (the state is left as it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// The op belongs to another merge type.
    #[error(transparent)]
    WrongOp(#[from] WrongOp),
    /// A PN-counter increment that would take the counter's value outside
    /// a signed 64-bit integer, or one writer's increments or decrements
    /// past what they can count. Refused rather than wrapped or clamped: a
    /// counter that silently stops counting is worse than an error.
    #[error(
        "incrementing by {delta} would take the counter outside the range of a signed 64-bit integer"
    )]
    OutOfRange {
        /// The increment refused.
        delta: i64,
    },
}

impl CrdtState {
    /// The state of a new document of `merge` (none for `MergeType::None`).
    pub fn empty(merge: MergeType) -> Option<Self> {
        Some(match merge {
            MergeType::None => return None,
            MergeType::LwwRegister => Self::LwwRegister {
                value: Value::Null,
                stamp: None,
            },
            MergeType::LwwMap => Self::LwwMap {
                entries: BTreeMap::new(),
            },
            MergeType::OrSet => Self::OrSet {
                adds: BTreeMap::new(),
                removed: BTreeSet::new(),
            },
            MergeType::PnCounter => Self::PnCounter {
                increments: BTreeMap::new(),
                decrements: BTreeMap::new(),
            },
        })
    }

    /// The merge type this state is of.
    pub fn merge_type(&self) -> MergeType {
        match self {
            Self::LwwRegister { .. } => MergeType::LwwRegister,
            Self::LwwMap { .. } => MergeType::LwwMap,
            Self::OrSet { .. } => MergeType::OrSet,
            Self::PnCounter { .. } => MergeType::PnCounter,
        }
    }

    /// Applies `op`; the same ops in any order give the same state
    /// (counter increments are not idempotent: each counts). A refused op
    /// leaves the state as it was.
    pub fn apply(&mut self, op: &Op) -> Result<(), CrdtError> {
        match (self, op) {
            (Self::LwwRegister { value, stamp }, Op::Set { value: v, stamp: s }) => {
                let wins = match stamp.as_ref() {
                    None => true,
                    Some(current) => (s, canonical(v)) > (current, canonical(value)),
                };
                if wins {
                    *value = v.clone();
                    *stamp = Some(s.clone());
                }
            }
            (Self::LwwMap { entries }, Op::Put { key, value, stamp }) => {
                // A null value removes the key (as in JSON Merge Patch). The
                // state's JSON form could not tell a null value from a
                // removal anyway, so a replica that reloaded it would have
                // disagreed with one that had not (found by
                // fuzz/fuzz_targets/crdt_ops).
                let value = Some(value.clone()).filter(|v| !v.is_null());
                lww_put(entries, key, value, stamp);
            }
            (Self::LwwMap { entries }, Op::Remove { key, stamp }) => {
                lww_put(entries, key, None, stamp);
            }
            (Self::OrSet { adds, .. }, Op::Add { element, tag }) => {
                adds.entry(canonical(element))
                    .or_default()
                    .insert(tag.clone());
            }
            (Self::OrSet { removed, .. }, Op::Discard { observed, .. }) => {
                removed.extend(observed.iter().cloned());
            }
            (
                Self::PnCounter {
                    increments,
                    decrements,
                },
                Op::Increment { writer, delta },
            ) => {
                let total = |side: &BTreeMap<String, u64>| -> i128 {
                    side.values().map(|v| i128::from(*v)).sum()
                };
                let value = total(increments) - total(decrements) + i128::from(*delta);
                let side = if *delta >= 0 { increments } else { decrements };
                let current = side.get(writer).copied().unwrap_or(0);
                match current.checked_add(delta.unsigned_abs()) {
                    Some(next) if i64::try_from(value).is_ok() => {
                        side.insert(writer.clone(), next);
                    }
                    _ => return Err(CrdtError::OutOfRange { delta: *delta }),
                }
            }
            (state, op) => {
                return Err(WrongOp {
                    op: op_name(op),
                    merge: state.merge_type().as_str(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The document as plain JSON.
    pub fn materialize(&self) -> Value {
        match self {
            Self::LwwRegister { value, .. } => value.clone(),
            Self::LwwMap { entries } => Value::Object(
                entries
                    .iter()
                    .filter_map(|(k, (v, _))| v.clone().map(|v| (k.clone(), v)))
                    .collect(),
            ),
            Self::OrSet { adds, removed } => Value::Array(
                adds.iter()
                    .filter(|(_, tags)| tags.iter().any(|t| !removed.contains(t)))
                    .filter_map(|(element, _)| serde_json::from_str(element).ok())
                    .collect(),
            ),
            Self::PnCounter {
                increments,
                decrements,
            } => {
                let up: i128 = increments.values().map(|v| i128::from(*v)).sum();
                let down: i128 = decrements.values().map(|v| i128::from(*v)).sum();
                Value::from(i64::try_from(up - down).unwrap_or(if up > down {
                    i64::MAX
                } else {
                    i64::MIN
                }))
            }
        }
    }

    /// The live tags of `element` (what a remove must name to remove it).
    pub fn observed_tags(&self, element: &Value) -> BTreeSet<String> {
        match self {
            Self::OrSet { adds, removed } => adds
                .get(&canonical(element))
                .map(|tags| tags.difference(removed).cloned().collect())
                .unwrap_or_default(),
            _ => BTreeSet::new(),
        }
    }
}

fn lww_put(
    entries: &mut BTreeMap<String, (Option<Value>, Stamp)>,
    key: &str,
    value: Option<Value>,
    stamp: &Stamp,
) {
    // Equal stamps (two writes by one writer in the same microsecond, which
    // its clock prevents, or a replay) are ordered by value so replicas agree.
    let rank = |v: &Option<Value>| v.as_ref().map(canonical).unwrap_or_default();
    let wins = match entries.get(key) {
        None => true,
        Some((current_value, current)) => (stamp, rank(&value)) > (current, rank(current_value)),
    };
    if wins {
        entries.insert(key.to_owned(), (value, stamp.clone()));
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Set { .. } => "set",
        Op::Put { .. } => "put",
        Op::Remove { .. } => "remove",
        Op::Add { .. } => "add",
        Op::Discard { .. } => "discard",
        Op::Increment { .. } => "increment",
    }
}

/// JSON with object keys sorted (serde_json's map is ordered), so equal
/// values compare equal as set elements.
fn canonical(value: &Value) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn a_null_put_removes_the_key_and_the_state_reloads_the_same() {
        let mut state = CrdtState::empty(MergeType::LwwMap).expect("crdt");
        let stamp = |micros| Stamp {
            micros,
            writer: "w".into(),
        };
        let put = |value: Value, micros| Op::Put {
            key: "k".into(),
            value,
            stamp: stamp(micros),
        };
        state.apply(&put(json!(1), 1)).expect("put");
        state.apply(&put(Value::Null, 2)).expect("put null");
        assert_eq!(state.materialize(), json!({}));
        let reloaded: CrdtState =
            serde_json::from_value(serde_json::to_value(&state).expect("json")).expect("loads");
        assert_eq!(reloaded, state);
        // Ordered against a later removal exactly as a removal would be.
        let mut removed = CrdtState::empty(MergeType::LwwMap).expect("crdt");
        removed.apply(&put(json!(1), 1)).expect("put");
        removed
            .apply(&Op::Remove {
                key: "k".into(),
                stamp: stamp(2),
            })
            .expect("remove");
        assert_eq!(removed, state);
    }

    #[test]
    fn a_counter_refuses_to_leave_the_i64_range_and_keeps_its_value() {
        let mut state = CrdtState::empty(MergeType::PnCounter).expect("crdt");
        let add = |delta: i64| Op::Increment {
            writer: "w".into(),
            delta,
        };
        state.apply(&add(i64::MAX)).expect("fits");
        assert_eq!(
            state.apply(&add(i64::MAX)),
            Err(CrdtError::OutOfRange { delta: i64::MAX })
        );
        assert_eq!(
            state.apply(&add(1)),
            Err(CrdtError::OutOfRange { delta: 1 })
        );
        assert_eq!(state.materialize(), json!(i64::MAX), "unchanged");
        state.apply(&add(i64::MIN)).expect("back to -1");
        assert_eq!(state.materialize(), json!(-1));
        // Down to the bottom, and not one further.
        let mut low = CrdtState::empty(MergeType::PnCounter).expect("crdt");
        low.apply(&add(i64::MIN)).expect("fits");
        assert!(low.apply(&add(-1)).is_err());
        assert_eq!(low.materialize(), json!(i64::MIN));
        // One writer's totals cannot wrap even while the value stays small.
        let mut churn = CrdtState::empty(MergeType::PnCounter).expect("crdt");
        for _ in 0..2 {
            churn.apply(&add(i64::MAX)).expect("up");
            churn.apply(&add(-i64::MAX)).expect("down");
        }
        assert_eq!(
            churn.apply(&add(i64::MAX)),
            Err(CrdtError::OutOfRange { delta: i64::MAX }),
            "the writer's increments would pass u64"
        );
        assert_eq!(churn.materialize(), json!(0));
    }

    fn stamp(micros: u64, writer: &str) -> Stamp {
        Stamp {
            micros,
            writer: writer.to_owned(),
        }
    }

    #[test]
    fn or_set_add_wins_over_an_unobserved_add() {
        let mut state = CrdtState::empty(MergeType::OrSet).expect("crdt");
        state
            .apply(&Op::Add {
                element: json!("file.rs"),
                tag: "a1".into(),
            })
            .expect("op");
        let observed = state.observed_tags(&json!("file.rs"));
        // Concurrently: one writer re-adds, another removes what it saw.
        state
            .apply(&Op::Add {
                element: json!("file.rs"),
                tag: "b1".into(),
            })
            .expect("op");
        state
            .apply(&Op::Discard {
                element: json!("file.rs"),
                observed,
            })
            .expect("op");
        assert_eq!(state.materialize(), json!(["file.rs"]));
        let observed = state.observed_tags(&json!("file.rs"));
        state
            .apply(&Op::Discard {
                element: json!("file.rs"),
                observed,
            })
            .expect("op");
        assert_eq!(state.materialize(), json!([]));
    }

    #[test]
    fn wrong_ops_are_refused() {
        let mut state = CrdtState::empty(MergeType::PnCounter).expect("crdt");
        let err = state
            .apply(&Op::Set {
                value: json!(1),
                stamp: stamp(1, "a"),
            })
            .expect_err("wrong");
        assert_eq!(
            err.to_string(),
            "a set operation does not apply to a pn_counter document"
        );
        assert!(CrdtState::empty(MergeType::None).is_none());
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            "[a-c]{1,2}".prop_map(Value::from),
            Just(json!({"k": [1, 2]})),
        ]
    }

    fn arb_op(merge: MergeType) -> BoxedStrategy<Op> {
        let writer = prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_owned);
        let st = (0u64..5, writer.clone()).prop_map(|(m, w)| Stamp {
            micros: m,
            writer: w,
        });
        match merge {
            MergeType::LwwRegister => (arb_value(), st)
                .prop_map(|(value, stamp)| Op::Set { value, stamp })
                .boxed(),
            MergeType::LwwMap => prop_oneof![
                ("[xy]", arb_value(), st.clone()).prop_map(|(key, value, stamp)| Op::Put {
                    key,
                    value,
                    stamp
                }),
                ("[xy]", st).prop_map(|(key, stamp)| Op::Remove { key, stamp }),
            ]
            .boxed(),
            MergeType::OrSet => prop_oneof![
                (arb_value(), "[a-z]{4}").prop_map(|(element, tag)| Op::Add { element, tag }),
                (
                    arb_value(),
                    proptest::collection::btree_set("[a-z]{4}", 0..3)
                )
                    .prop_map(|(element, observed)| Op::Discard { element, observed }),
            ]
            .boxed(),
            MergeType::PnCounter => (writer, -100i64..100)
                .prop_map(|(writer, delta)| Op::Increment { writer, delta })
                .boxed(),
            MergeType::None => Just(Op::Increment {
                writer: "a".into(),
                delta: 0,
            })
            .boxed(),
        }
    }

    fn apply_all(merge: MergeType, ops: &[Op]) -> Value {
        let mut state = CrdtState::empty(merge).expect("crdt");
        for op in ops {
            state.apply(op).expect("op fits");
        }
        state.materialize()
    }

    fn merge_and_ops() -> impl Strategy<Value = (MergeType, Vec<Op>, Vec<usize>)> {
        prop_oneof![
            Just(MergeType::LwwRegister),
            Just(MergeType::LwwMap),
            Just(MergeType::OrSet),
            Just(MergeType::PnCounter),
        ]
        .prop_flat_map(|merge| {
            proptest::collection::vec(arb_op(merge), 0..12).prop_flat_map(move |ops| {
                let n = ops.len();
                (
                    Just(merge),
                    Just(ops),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            })
        })
    }

    proptest! {
        /// Any order of the same updates yields the same document.
        #[test]
        fn order_does_not_matter((merge, ops, order) in merge_and_ops()) {
            let shuffled: Vec<Op> = order.iter().map(|&i| ops[i].clone()).collect();
            prop_assert_eq!(apply_all(merge, &ops), apply_all(merge, &shuffled));
        }

        /// Applying an update twice changes nothing (redelivery is harmless),
        /// except counters, whose increments are deduplicated upstream by
        /// idempotency keys.
        #[test]
        fn reapplying_is_harmless((merge, ops, _order) in merge_and_ops()) {
            prop_assume!(merge != MergeType::PnCounter);
            let doubled: Vec<Op> = ops.iter().flat_map(|op| [op.clone(), op.clone()]).collect();
            prop_assert_eq!(apply_all(merge, &ops), apply_all(merge, &doubled));
        }
    }
}
