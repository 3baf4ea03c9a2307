//! The database every stateful crate shares: the schema's migrations
//! (Postgres and the embedded SQLite), how pools to it are opened, tenant
//! registration and tenant logins, and the pools' gauges.
//!
//! The event store, the saga store, the leader's lease, the relay and the
//! Kafka inbox all keep their tables in one database and open their pools
//! here; none of them applies migrations of its own. This crate does not
//! own what the tables mean: each store owns its statements.
#![warn(missing_docs)]

pub mod pg;
pub mod sqlite;
