//! The aggregate-root pattern: decide with `handle`, evolve with `apply`.
//!
//! An aggregate is a pure state machine: `handle` looks at the current state
//! and a command and returns the events that record the decision (or a
//! rejection); `apply` folds one event into the state. The store's repository
//! does the I/O around it: load (snapshot plus the events after it), handle,
//! append with the loaded version as the expectation.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A consistency boundary whose state is the fold of its events.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// Stream type, e.g. `task`; one per aggregate kind.
    const STREAM_TYPE: &'static str;
    /// Version of the snapshot state shape. Bump it when the state's
    /// serialized form changes so older snapshots are ignored.
    const SNAPSHOT_SCHEMA_VERSION: u32 = 1;

    /// What callers ask the aggregate to do.
    type Command: Send + Sync;
    /// What it records happened (stored as JSON).
    type Event: Serialize + DeserializeOwned + Send + Sync + Clone;
    /// Why it refuses a command.
    type Rejection: std::error::Error + Send + Sync + 'static;

    /// Decides what happens; must not mutate state.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Rejection>;

    /// Evolves the state by one event. Must be deterministic: replay depends
    /// on it.
    fn apply(&mut self, event: &Self::Event);

    /// The event's type name as stored.
    fn event_type(event: &Self::Event) -> &'static str;

    /// Whether a command may simply be re-run against fresh state when another
    /// writer got there first. True for commands whose decision only depends
    /// on the state they are handled against (most); false when the caller
    /// must see the conflict.
    fn retry_on_conflict(_command: &Self::Command) -> bool {
        true
    }
}

/// Snapshot and state serialization, for aggregates whose state is serde.
pub trait SnapshotState: Aggregate + Serialize + DeserializeOwned {}
impl<T: Aggregate + Serialize + DeserializeOwned> SnapshotState for T {}
