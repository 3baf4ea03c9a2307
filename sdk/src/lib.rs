//! The Rust client for a Statefabric sidecar.
//!
//! An agent talks to the sidecar in its pod over localhost gRPC. This crate
//! wraps the generated client in typed calls: append events with an expected
//! version (and, when asked, an idempotency key), read them back, follow the
//! tenant's feed, and tell whether two events are causally related.
//!
//! ```no_run
//! use statefabric_sdk::{Expected, NewEvent, StateClient};
//!
//! # async fn run() -> Result<(), statefabric_sdk::Error> {
//! let mut client = StateClient::connect("http://127.0.0.1:7400").await?;
//! let written = client
//!     .append("task-42", "task", Expected::NoStream, vec![
//!         NewEvent::json("TaskCreated", &serde_json::json!({"title": "fix the build"}))?,
//!     ])
//!     .await?;
//! let events = client.read_stream("task-42", 1, 100).await?;
//! assert_eq!(events.len() as u64, written.last_version);
//! # Ok(()) }
//! ```
//!
//! Context documents go through [`ContextClient`] (from
//! [`StateClient::context`]): version-vector writes, CRDT updates
//! ([`Crdt`]), compressed deltas ([`ContextClient::refresh`]), watches, and
//! read-modify-write with retry ([`ContextClient::update`]).
//!
//! Locks go through [`LockClient`] (from [`StateClient::locks`]): a
//! [`HeldLock`] renews itself and says at once when it is lost.
//!
//! Session state goes through [`SessionClient`] (from
//! [`StateClient::sessions`]): values per namespace that expire by the
//! namespace's absolute or sliding TTL. Context writes can be fenced by a
//! lock's token ([`ContextClient::fenced`]).
//!
//! Sagas go through [`TaskClient`] (from [`StateClient::tasks`]): start a
//! saga, and take and answer an agent type's tasks — [`TaskClient::work`]
//! runs a handler per task with heartbeats.
//!
//! See `examples/quickstart.rs` for a runnable tour, and `examples/agent.rs`
//! for agents on the task API running a saga.
#![warn(missing_docs)]

mod client;
pub mod context;
mod error;
mod event;
pub mod locks;
mod repository;
pub mod sessions;
pub mod tasks;

pub use client::{Appended, StateClient};
pub use context::{ContextClient, Crdt, Document, MergeType, Written};
pub use error::Error;
pub use event::{Event, Expected, NewEvent, causality};
pub use locks::{HeldLock, LockClient, LockHolder};
pub use repository::{Repository, RepositoryError};
pub use sessions::{Session, SessionClient};
pub use statefabric_domain::Aggregate;
pub use statefabric_domain::{Causality, Checkpoint, VectorClock};
pub use tasks::{Task, TaskClient};
