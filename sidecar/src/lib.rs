//! The Statefabric sidecar: an agent's state over localhost gRPC.
//!
//! Owns the State API's server side — the `Events` service today (append,
//! read, live subscriptions), with health checking and reflection — the
//! mapping of store errors to gRPC statuses ([`status`]), the conversions
//! between wire and domain types ([`convert`]) and the process assembly
//! ([`server`]). Storage itself is `statefabric-store`; process scaffolding
//! is `statefabric-runtime`.
//!
//! Not yet here (see the sidecar issue): context documents with version
//! vectors and CRDT merges, compressed deltas, the local cache.

pub mod config;
pub mod convert;
pub mod events;
pub mod server;
pub mod status;

pub use config::SidecarConfig;
pub use server::serve;
