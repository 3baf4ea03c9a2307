//! Statefabric's gRPC API: the `.proto` files beside this crate and the
//! code tonic generates from them. Owns the wire types only; conversions to
//! domain types live with the servers and clients that need them. Every
//! message and field is documented in the `.proto` files (prost copies the
//! comments), which is what `missing_docs` checks here.

#![warn(missing_docs)]
#![allow(missing_debug_implementations, clippy::all)]

pub mod codec;

/// The State API: what an agent calls on its sidecar.
pub mod state {
    /// Version 1 (`statefabric.state.v1`).
    pub mod v1 {
        tonic::include_proto!("statefabric.state.v1");
    }
}

/// The control plane's services: saga operations and mesh configuration.
pub mod control {
    /// Version 1 (`statefabric.control.v1`).
    pub mod v1 {
        tonic::include_proto!("statefabric.control.v1");
    }
}

/// The encoded file descriptor set of the State API (`state.v1`), for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("statefabric_descriptor");

/// The same for the control plane's services (`control.v1`).
pub const CONTROL_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("statefabric_control_descriptor");
