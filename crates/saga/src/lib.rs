//! Sagas: long workflows across agents, with compensation.
//!
//! Owns what a saga *is* and how it *moves*, without I/O:
//! - [`definition`]: declarative definitions (YAML or JSON, or the Rust
//!   [`definition::Builder`]) made of steps — the agent type and action, the
//!   input mapped from the saga's data and earlier outputs, a timeout, a
//!   retry policy, a compensation, and transitions on success, failure or a
//!   condition on the output;
//! - [`validate`]: the checks run when a definition is loaded (unknown
//!   steps, cycles without a bound, missing compensations, bad durations),
//!   each error naming the definition and the step;
//! - [`registry::Registry`]: versioned definitions — a running instance
//!   finishes on the version it started with;
//! - [`builtin`]: the Planner → Coder → Critic definition;
//! - [`graph`]: a definition or an instance as JSON nodes and edges, Mermaid
//!   and Graphviz DOT (for the visualization endpoints);
//! - [`machine`]: an instance's state and the pure transition function
//!   `apply(input) → effects` (dispatch a task, arm a timer, finish), which
//!   the engine persists in one transaction per transition.
//!
//! It does not own persistence, timers, leader election or transport: those
//! are the control plane's (the saga engine) and the sidecar's (the task
//! API). Keeping the machine pure makes every rule — retries with backoff,
//! late replies ignored, compensation in reverse order, STUCK rather than
//! dropped — testable without a database.
#![warn(missing_docs)]

pub mod backoff;
pub mod builtin;
pub mod definition;
pub mod graph;
pub mod machine;
pub mod registry;
pub mod validate;

pub use definition::{Definition, RetryPolicy, Step, Target};
pub use machine::{Effect, Input, Instance, OperatorAction, SagaError, SagaId, Status, TaskKey};
pub use registry::Registry;
pub use validate::DefinitionError;
