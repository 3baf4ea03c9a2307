//! Statefabric's gRPC API: the `.proto` files beside this crate and the
//! code tonic generates from them. Owns the wire types only; conversions to
//! domain types live with the servers and clients that need them.

#![allow(missing_debug_implementations, clippy::all)]

pub mod codec;

pub mod state {
    pub mod v1 {
        tonic::include_proto!("statefabric.state.v1");
    }
}

pub mod control {
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
