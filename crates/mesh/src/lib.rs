//! Mesh configuration as Kubernetes custom resources (`statefabric.io`,
//! `v1alpha1`).
//!
//! Owns the resource types, generated into CRDs with OpenAPI validation
//! and CEL rules ([`crd`]; the YAML is kept under `k8s/charts/statefabric/crds/`):
//! - [`FabricConfig`]: sidecar settings for the pods it selects;
//! - [`ResiliencyPolicy`]: timeouts, retries, breakers and limits, and the
//!   dependencies and upstreams they apply to;
//! - [`Upstream`]: an external destination agents call through their
//!   sidecar's egress;
//! - [`SagaDefinition`]: a saga definition the control plane registers;
//!
//! and, without I/O beyond reading files, what is built on them: the
//! checks the API server cannot make ([`validate`]), reading the same
//! documents from local YAML ([`local`], for `fabric dev`), and the
//! configuration one sidecar gets ([`effective`]), with the Secret values
//! its Upstreams name ([`secrets`]).
//!
//! It does not own watching the API server, distributing configuration or
//! applying it: those are the control plane's and the sidecar's.
#![warn(missing_docs)]
// kube's `#[kube(printcolumn(...))]` takes one `printcolumn` per column;
// clippy reads the repeated `type_ = "..."` keys as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod crd;
pub mod duration;
pub mod effective;
pub mod fabric_config;
pub mod local;
pub mod resiliency;
pub mod saga_definition;
pub mod secrets;
pub mod status;
pub mod upstream;
pub mod validate;

pub use duration::GoDuration;
pub use effective::{EffectiveConfig, Identity, effective};
pub use fabric_config::{FabricConfig, FabricConfigSpec};
pub use resiliency::{ResiliencyPolicy, ResiliencyPolicySpec};
pub use saga_definition::{SagaDefinition, SagaDefinitionSpec};
pub use upstream::{Upstream, UpstreamSpec};

/// The API group of every mesh resource.
pub const GROUP: &str = "statefabric.io";
/// Their one served version.
pub const VERSION: &str = "v1alpha1";

/// Mesh resources, as read from the API server or from local files.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Every FabricConfig.
    pub fabric_configs: Vec<FabricConfig>,
    /// Every ResiliencyPolicy.
    pub policies: Vec<ResiliencyPolicy>,
    /// Every Upstream.
    pub upstreams: Vec<Upstream>,
    /// Every SagaDefinition.
    pub sagas: Vec<SagaDefinition>,
    /// The Secrets Upstreams name, as far as they are readable (only those
    /// labelled [`secrets::EGRESS_LABEL`] are ever given to a sidecar).
    pub secrets: Vec<k8s_openapi::api::core::v1::Secret>,
}
