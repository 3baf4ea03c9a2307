//! The Statefabric sidecar: an agent's state over localhost gRPC.
//!
//! Owns the State API's server side — the `Events` service (append, read,
//! live subscriptions) and the `SharedContext` service (documents with
//! version vectors, CRDT merges, compressed deltas, watches) behind a local
//! cache (`cache`), with health checking and reflection — the
//! mapping of store errors to gRPC statuses (`status`), the conversions
//! between wire and domain types (`convert`) and the process assembly
//! (`server`). Storage itself is `statefabric-store`; process scaffolding
//! is `statefabric-runtime`.
//!
//! The `Locks` service (`locks`) serves leases with fencing tokens from
//! `statefabric-lock`; appends and context writes may carry a fence. The
//! `Sessions` service (`sessions`) serves session state with per-namespace
//! TTLs from `statefabric-session`. Context changes are announced and
//! followed through `statefabric-updates` (`follow`): pub/sub drops stale
//! cache entries, an update stream feeds `WatchContext`. Each of these runs
//! in-process (embedded) or on Redis, by configuration. The `Tasks` service
//! (`tasks`) is the agents' side of sagas: start one, take, heartbeat and
//! answer the tasks of an agent type (`statefabric-saga-store`). With
//! `[mesh] enabled`, the sidecar subscribes to its configuration from the
//! control plane and applies what is hot (`mesh.rs`). Lock and session
//! mutations are audited into the store's `audit_log` (`audit`).
#![warn(missing_docs)]

mod audit;
mod backends;
mod cache;
mod call;
pub mod config;
mod context;
mod convert;
mod egress;
mod events;
mod follow;
mod jobs;
mod locks;
mod mesh;
mod rpc_metrics;
mod server;
mod services;
mod sessions;
mod status;
mod tasks;
pub mod tenancy;

pub use config::SidecarConfig;
pub use server::{Storage, open_storage, serve, serve_with};
