//! Runs sagas durably.
//!
//! Owns the [`engine::Engine`] that advances every saga on the leader and
//! the saga [`metrics`]. The store it advances them in is the port of
//! `statefabric-saga-store` (`SagaStore`, with Postgres and embedded SQLite
//! adapters), which the agents' side (`TaskQueue`) uses without the engine.
//!
//! How a saga moves: a start request or an agent's reply lands in the inbox
//! table; the engine reads it (woken by `NOTIFY`, or in-process in the
//! embedded mode), applies it to the saga's pure state machine
//! (`statefabric-saga`), and commits the new state, the tasks it
//! dispatches, the timers it arms, the history lines and the deletion of
//! the inbox row in one transaction fenced by the leader's epoch. Agents
//! claim their tasks from the tasks table through their sidecar, push the
//! deadline with heartbeats, and answer into the inbox. Deadlines and retry
//! delays are timer rows, so they fire after a restart too.
//!
//! It does not own storage (`statefabric-saga-store`), what the definitions
//! say or how a saga decides its next step (`statefabric-saga`), leader
//! election (`statefabric-leader`), or the APIs in front of it (the control
//! plane's operator API, the sidecar's task API).
#![warn(missing_docs)]

pub mod engine;
pub mod metrics;

pub use engine::{Engine, EngineError, EngineSettings};
