//! Process scaffolding shared by every Statefabric binary.
//!
//! Owns what each process needs before it does any real work: the layered,
//! validated configuration ([`config`]), logging and trace export
//! ([`telemetry`]) with W3C trace context across hops ([`trace_context`]),
//! the admin HTTP endpoints for probes and Prometheus
//! ([`admin`]), signal-driven graceful shutdown with a drain deadline
//! ([`shutdown`]), and giving a burst's freed heap back to the OS
//! ([`memory`]). [`service::run`] ties them together so a binary's `main` is
//! a few lines.
//!
//! It does not own any domain logic, storage, or the public gRPC/HTTP APIs:
//! those live in the crates that serve them and only borrow the readiness,
//! metrics registry and shutdown handles from here.
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod issues;
pub mod memory;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;

pub use admin::{AdminConfig, Readiness, ReadinessCheck};
pub use config::{BaseConfig, ConfigArgs, ConfigError, ConfigIssue, Issues, ServiceConfig};
pub use service::{EXIT_BAD_CONFIG, MetricsRegistry, ServiceContext, main, run};
pub use shutdown::{Shutdown, ShutdownConfig};
pub use telemetry::{LogFilter, LogFormat, TelemetryConfig};
