//! `SagaDefinition`: a saga definition (the YAML `fabric dev` and the
//! control plane's `[sagas] definitions` files hold) as a resource.

#![allow(
    unreachable_pub,
    reason = "kube's KubeSchema derive (the x_kube validation rules) re-emits these structs in a private module"
)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration::GoDuration;
use crate::status::SagaDefinitionStatus;

/// A saga definition; its name is the resource's. The control plane checks
/// it with the saga validator and registers each new generation as a new
/// immutable version: running sagas keep the version they started on.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "statefabric.io",
    version = "v1alpha1",
    kind = "SagaDefinition",
    namespaced,
    status = "SagaDefinitionStatus",
    shortname = "sagadef",
    category = "statefabric",
    doc = "A saga definition, registered with the saga engine as a new version on every change.",
    printcolumn(name = "Start", type_ = "string", json_path = ".spec.start"),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.registeredVersion"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.start in self.steps").message("spec.start names no step of spec.steps"))]
#[serde(rename_all = "camelCase")]
pub struct SagaDefinitionSpec {
    /// The first step.
    #[schemars(length(min = 1, max = 63))]
    pub start: String,
    /// An instance without a transition for this long is flagged stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck_after: Option<GoDuration>,
    /// Completion expected within this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<GoDuration>,
    /// The steps by name, each as in a definition file (agent, action,
    /// input, timeout, retry, compensation, transitions); checked by the
    /// control plane, which names the step at fault in the status.
    #[schemars(schema_with = "steps_schema")]
    pub steps: serde_json::Map<String, Value>,
}

/// A map of step name to an object whose fields the saga validator checks:
/// typed as a map (not a free object) so CEL can ask `start in steps`.
fn steps_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": 64,
        "additionalProperties": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

impl SagaDefinitionSpec {
    /// The definition as the saga crate reads it, named `name` at `version`.
    pub fn to_definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<statefabric_saga::Definition, statefabric_saga::DefinitionError> {
        let mut document = serde_json::Map::new();
        document.insert("name".into(), name.into());
        document.insert("version".into(), version.into());
        document.insert("start".into(), self.start.clone().into());
        if let Some(after) = self.stuck_after {
            document.insert("stuck_after".into(), after.to_string().into());
        }
        if let Some(sla) = self.sla {
            document.insert("sla".into(), sla.to_string().into());
        }
        document.insert("steps".into(), Value::Object(self.steps.clone()));
        statefabric_saga::Definition::from_value(Value::Object(document))
    }
}
