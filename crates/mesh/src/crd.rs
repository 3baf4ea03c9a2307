//! The CustomResourceDefinitions, generated from the Rust types, and the
//! YAML kept under `k8s/charts/statefabric/crds/` (a test fails when the two differ; rewrite
//! the files with `STATEFABRIC_UPDATE_CRDS=1 cargo test -p statefabric-mesh`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{FabricConfig, ResiliencyPolicy, SagaDefinition, Upstream};

/// Every CRD of the `statefabric.io` group.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    [
        FabricConfig::crd(),
        ResiliencyPolicy::crd(),
        Upstream::crd(),
        SagaDefinition::crd(),
    ]
    .into_iter()
    .map(without_unsigned_formats)
    .collect()
}

/// schemars marks unsigned integers `format: uint32`/`uint64`, which the
/// API server does not know (it warns on every apply); their `minimum: 0`
/// says the same, so the format goes.
fn without_unsigned_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if map
                    .get("format")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|f| f.starts_with("uint"))
                {
                    map.remove("format");
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    strip(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

/// The file a CRD is kept in under `k8s/charts/statefabric/crds/`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// A CRD as committed: a header saying where it comes from, then the YAML.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, yaml_serde::Error> {
    Ok(format!(
        "# Generated from crates/mesh (statefabric-mesh): do not edit by hand.\n\
         # Rewrite with: STATEFABRIC_UPDATE_CRDS=1 cargo test -p statefabric-mesh\n{}",
        yaml_serde::to_string(crd)?
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn crds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../k8s/charts/statefabric/crds")
    }

    #[test]
    fn the_committed_crds_are_the_generated_ones() {
        let update = std::env::var_os("STATEFABRIC_UPDATE_CRDS").is_some();
        let mut stale = Vec::new();
        for crd in definitions() {
            let path = crds_dir().join(file_name(&crd));
            let rendered = render(&crd).expect("render");
            if update {
                std::fs::create_dir_all(crds_dir()).expect("mkdir");
                std::fs::write(&path, &rendered).expect("write");
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(rendered.as_str()) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "these CRD files differ from the Rust types: {stale:?}; rewrite them with \
             STATEFABRIC_UPDATE_CRDS=1 cargo test -p statefabric-mesh"
        );
    }

    #[test]
    fn every_crd_is_namespaced_with_a_status_subresource_in_one_group() {
        for crd in definitions() {
            assert_eq!(crd.spec.group, crate::GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, crate::VERSION);
            assert!(
                version
                    .subresources
                    .as_ref()
                    .is_some_and(|s| s.status.is_some()),
                "{} has no status subresource",
                crd.spec.names.kind
            );
            let printer = version
                .additional_printer_columns
                .as_deref()
                .unwrap_or_default();
            assert!(
                printer.iter().any(|c| c.name == "Ready"),
                "{} prints no Ready column",
                crd.spec.names.kind
            );
        }
    }
}
