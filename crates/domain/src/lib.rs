//! Statefabric's domain vocabulary, free of I/O.
//!
//! Owns the types every other crate passes around — validated ids (tenants,
//! agents, streams), events and their metadata, expected versions,
//! checkpoints, snapshots — and the aggregate-root trait, so that a malformed
//! value is refused once, at the edge, with a message that says what is wrong.
//!
//! It does not own storage, wire formats or transport: adapters and API crates
//! depend on this crate, never the other way round.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod clock;
pub mod crdt;
pub mod event;
pub mod id;

pub use aggregate::{Aggregate, SnapshotState};
pub use clock::{Causality, VectorClock};
pub use crdt::{CrdtError, CrdtState, MergeType, Op, Stamp};
pub use event::{Checkpoint, EventMetadata, ExpectedVersion, NewEvent, RecordedEvent, Snapshot};
pub use id::{AgentId, IdError, SagaId, StreamId, TenantId};
