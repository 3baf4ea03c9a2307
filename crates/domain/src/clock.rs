//! Vector clocks: one counter per writer, so causality between any two events
//! or document versions can be answered — one happened before the other, or
//! they were concurrent.
//!
//! Hand-written rather than taken from a crate: it is a map and four
//! comparisons, and it must serialize as a plain JSON object of counters
//! (the form stored in event metadata) without adapters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How two clocks relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// The same clock.
    Equal,
    /// Left happened before right.
    Before,
    /// Left happened after right.
    After,
    /// Neither saw the other.
    Concurrent,
}

/// A vector clock: one counter per writer; serialized as a JSON object of
/// writer to counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VectorClock(BTreeMap<String, u64>);

impl VectorClock {
    /// The empty clock (every counter 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// `writer`'s counter (0 if it never wrote).
    pub fn get(&self, writer: &str) -> u64 {
        self.0.get(writer).copied().unwrap_or(0)
    }

    /// Advances `writer`'s counter to at least `at_least`, by one at minimum.
    pub fn tick(&mut self, writer: &str, at_least: u64) -> u64 {
        let entry = self.0.entry(writer.to_owned()).or_insert(0);
        *entry = (*entry + 1).max(at_least);
        *entry
    }

    /// Pointwise maximum: the clock of a state that has seen both.
    pub fn merge(&mut self, other: &VectorClock) {
        for (writer, &count) in &other.0 {
            let entry = self.0.entry(writer.clone()).or_insert(0);
            *entry = (*entry).max(count);
        }
    }

    /// True if every counter of `self` is <= the same counter of `other`.
    pub fn dominated_by(&self, other: &VectorClock) -> bool {
        self.0.iter().all(|(w, &c)| c <= other.get(w))
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &VectorClock) -> Causality {
        match (self.dominated_by(other), other.dominated_by(self)) {
            (true, true) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (false, false) => Causality::Concurrent,
        }
    }

    /// The counters by writer.
    pub fn as_map(&self) -> &BTreeMap<String, u64> {
        &self.0
    }

    /// The counters by writer, taken out.
    pub fn into_map(self) -> BTreeMap<String, u64> {
        self.0
    }
}

impl From<BTreeMap<String, u64>> for VectorClock {
    fn from(map: BTreeMap<String, u64>) -> Self {
        // Zero counters carry no information; dropping them keeps equality
        // meaningful ({a:0} == {}).
        Self(map.into_iter().filter(|(_, c)| *c > 0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(pairs: &[(&str, u64)]) -> VectorClock {
        pairs
            .iter()
            .map(|(w, c)| ((*w).to_owned(), *c))
            .collect::<BTreeMap<_, _>>()
            .into()
    }

    #[test]
    fn causality_is_answered() {
        let a = clock(&[("planner", 1)]);
        let b = clock(&[("planner", 1), ("coder", 1)]);
        let c = clock(&[("planner", 2)]);
        assert_eq!(a.compare(&b), Causality::Before);
        assert_eq!(b.compare(&a), Causality::After);
        assert_eq!(b.compare(&c), Causality::Concurrent);
        assert_eq!(a.compare(&a.clone()), Causality::Equal);
        assert_eq!(
            clock(&[("x", 0)]).compare(&VectorClock::new()),
            Causality::Equal
        );
    }

    #[test]
    fn merge_then_tick_dominates_both() {
        let mut a = clock(&[("planner", 3), ("coder", 1)]);
        let b = clock(&[("coder", 4), ("critic", 2)]);
        a.merge(&b);
        a.tick("planner", 0);
        assert_eq!(b.compare(&a), Causality::Before);
        assert_eq!(a.get("planner"), 4);
        assert_eq!(a.tick("critic", 10), 10);
    }
}
