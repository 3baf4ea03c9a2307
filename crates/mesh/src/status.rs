//! The status every mesh resource reports: conditions in the Kubernetes
//! convention (`Ready` with a reason naming the field at fault), and how
//! the sidecars took the configuration it is part of.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `Ready` condition's type.
pub const READY: &str = "Ready";

/// Status of a FabricConfig, ResiliencyPolicy or Upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (accepted, or refused with the field named) and its kin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// Sidecars whose configuration includes this resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarCounts>,
}

/// How the sidecars that use a resource took their configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarCounts {
    /// Sidecars that acknowledged the newest configuration.
    pub applied: u32,
    /// Sidecars that refused a configuration (a NACK).
    pub refused: u32,
    /// Sidecars that run the newest configuration without some of this
    /// resource's settings (they take effect at a restart, or the sidecar
    /// does not act on them).
    #[serde(default)]
    pub not_applied: u32,
    /// Sidecars per configuration version they run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub versions: BTreeMap<String, u32>,
    /// The newest refusals, one per sidecar.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub nacks: Vec<Nack>,
    /// The settings not applied, per sidecar (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub not_applied_settings: Vec<NotApplied>,
}

/// A setting a sidecar runs without.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotApplied {
    /// The sidecar's pod.
    pub pod: String,
    /// The resource, the field, and why.
    pub setting: String,
}

/// A sidecar's refusal of a configuration version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    /// The sidecar's pod.
    pub pod: String,
    /// The configuration version it refused.
    pub version: String,
    /// Its reason, naming the field.
    pub reason: String,
}

/// Status of a SagaDefinition: the engine version its current generation
/// was registered as, or why it was not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaDefinitionStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: registered with the engine, or refused with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// The version the engine runs new sagas of this definition on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_version: Option<u32>,
}
