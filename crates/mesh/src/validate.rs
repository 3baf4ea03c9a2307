//! What the API server's schema and CEL rules cannot check, because it
//! spans resources or needs the saga validator: an Upstream naming a
//! missing ResiliencyPolicy, a second default FabricConfig in a namespace,
//! a saga definition the validator refuses. A refused resource gets
//! `Ready=False` naming the field, and reaches no sidecar.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::Catalog;

/// One refused resource and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The resource's kind (`Upstream`, …).
    pub kind: &'static str,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The field at fault, as a path (`spec.policy`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every refused resource of the catalog.
pub fn problems(catalog: &Catalog) -> Vec<Problem> {
    let mut found = Vec::new();
    let problem =
        |kind, namespace: Option<String>, name: String, field: &str, message: String| Problem {
            kind,
            namespace: namespace.unwrap_or_default(),
            name,
            field: field.to_owned(),
            message,
        };
    for upstream in &catalog.upstreams {
        if let Some(policy) = &upstream.spec.policy {
            let exists = catalog
                .policies
                .iter()
                .any(|p| p.namespace() == upstream.namespace() && &p.name_any() == policy);
            if !exists {
                found.push(problem(
                    "Upstream",
                    upstream.namespace(),
                    upstream.name_any(),
                    "spec.policy",
                    format!("ResiliencyPolicy {policy:?} does not exist in this namespace"),
                ));
            }
        }
    }
    // One default per namespace: the first by name is used, the others are
    // refused.
    let mut defaults: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for config in catalog.fabric_configs.iter().filter(|c| c.spec.default) {
        defaults
            .entry(config.namespace().unwrap_or_default())
            .or_default()
            .push(config.name_any());
    }
    for (namespace, mut names) in defaults {
        names.sort();
        let first = names.remove(0);
        for name in names {
            found.push(problem(
                "FabricConfig",
                Some(namespace.clone()),
                name,
                "spec.default",
                format!("FabricConfig {first:?} is already this namespace's default"),
            ));
        }
    }
    for saga in &catalog.sagas {
        if let Err(err) = saga.spec.to_definition(&saga.name_any(), 1) {
            let field = match &err.step {
                Some(step) => format!("spec.steps.{step}"),
                None => "spec".to_owned(),
            };
            found.push(problem(
                "SagaDefinition",
                saga.namespace(),
                saga.name_any(),
                &field,
                err.to_string(),
            ));
        }
    }
    found
}
