//! The event store: Statefabric's system of record.
//!
//! Owns the [`EventStore`] port — optimistic-concurrency appends, stream and
//! global reads, a commit-ordered feed that never skips an event, snapshots,
//! idempotency keys and the audit trail — with two adapters behind it:
//! [`pg`] (Postgres, production: Row-Level Security per tenant, outbox filled
//! by trigger) and [`sqlite`] (the embedded default: one file, tenant scoping
//! in code). On top of the port sit the live feed ([`feed::subscribe_all`])
//! and the aggregate [`repository`].
//!
//! It does not own transport (gRPC, Kafka), caching or locks; those crates
//! call this one.
#![warn(missing_docs)]

pub mod audit;
pub mod context;
pub mod error;
mod event_row;
pub mod feed;
pub mod janitor;
pub mod limits;
pub mod pg;
pub mod port;
pub mod replay;
pub mod repository;
pub mod sqlite;

pub use error::{InvalidInput, Result, StoreError};
pub use feed::{FeedOptions, replay, subscribe_all};
pub use janitor::run_idempotency_janitor;
pub use limits::Limits;
pub use port::{
    AppendOutcome, AppendRequest, AppendResult, EventStore, Fence, Idempotency, Scope, StreamInfo,
};
pub use repository::{Loaded, Repository, RepositoryError, SnapshotPolicy};
