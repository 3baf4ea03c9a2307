//! Statefabric's domain vocabulary, free of I/O.
//!
//! Owns the identifiers every other crate passes around (tenants, agents,
//! streams) and the rules that make one valid, so a malformed id is refused
//! once, at the edge, with a message that says what is wrong.
//!
//! It does not own storage, wire formats or transport: adapters and API crates
//! depend on this crate, never the other way round.

#![forbid(unsafe_code)]

pub mod id;

pub use id::{AgentId, IdError, StreamId, TenantId};
