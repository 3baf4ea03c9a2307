//! The same documents you would `kubectl apply`, read from local YAML files
//! (`fabric dev`, tests): several per file, separated by `---`.

use std::path::Path;

use kube::Resource;
use serde::Deserialize;
use serde_json::Value;

use crate::{Catalog, FabricConfig, ResiliencyPolicy, SagaDefinition, Upstream};

/// Why a file's documents could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    /// The file could not be read.
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    #[error("{origin}, document {index}: {problem}")]
    /// A document is not a mesh resource we can read.
    Document {
        /// The file it is in.
        origin: String,
        /// Its position there, from 1.
        index: usize,
        /// What is wrong with it.
        problem: String,
    },
}

/// Reads every document of every file into one catalog. Documents without
/// a namespace go into `default_namespace`.
pub fn load_files(
    paths: &[impl AsRef<Path>],
    default_namespace: &str,
) -> Result<Catalog, LoadError> {
    let mut catalog = Catalog::default();
    for path in paths {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        add_documents(
            &mut catalog,
            &path.display().to_string(),
            &text,
            default_namespace,
        )?;
    }
    Ok(catalog)
}

/// Adds the documents of one YAML text (`origin` names it in errors).
pub fn add_documents(
    catalog: &mut Catalog,
    origin: &str,
    text: &str,
    default_namespace: &str,
) -> Result<(), LoadError> {
    for (index, document) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let index = index + 1;
        let problem = |problem: String| LoadError::Document {
            origin: origin.to_owned(),
            index,
            problem,
        };
        let value = Value::deserialize(document).map_err(|e| problem(e.to_string()))?;
        if value.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let expected = format!("{}/{}", crate::GROUP, crate::VERSION);
        let secret = (api_version, kind) == ("v1", "Secret");
        if api_version != expected && !secret {
            return Err(problem(format!(
                "apiVersion {api_version:?} is not {expected:?}"
            )));
        }
        if value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(problem("metadata.name is missing".into()));
        }
        if secret {
            // A Secret an Upstream names, as it would be applied.
            catalog.secrets.push(
                parse::<k8s_openapi::api::core::v1::Secret>(value, default_namespace)
                    .map_err(problem)?,
            );
            continue;
        }
        match kind {
            "FabricConfig" => catalog
                .fabric_configs
                .push(parse::<FabricConfig>(value, default_namespace).map_err(problem)?),
            "ResiliencyPolicy" => catalog
                .policies
                .push(parse::<ResiliencyPolicy>(value, default_namespace).map_err(problem)?),
            "Upstream" => catalog
                .upstreams
                .push(parse::<Upstream>(value, default_namespace).map_err(problem)?),
            "SagaDefinition" => catalog
                .sagas
                .push(parse::<SagaDefinition>(value, default_namespace).map_err(problem)?),
            other => {
                return Err(problem(format!(
                    "kind {other:?} is none of FabricConfig, ResiliencyPolicy, Upstream, SagaDefinition (or a v1 Secret)"
                )));
            }
        }
    }
    Ok(())
}

fn parse<K>(value: Value, default_namespace: &str) -> Result<K, String>
where
    K: Resource + for<'de> Deserialize<'de>,
{
    let mut resource: K = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let meta = resource.meta_mut();
    if meta.namespace.is_none() {
        meta.namespace = Some(default_namespace.to_owned());
    }
    Ok(resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENTS: &str = r#"
apiVersion: statefabric.io/v1alpha1
kind: ResiliencyPolicy
metadata: {name: models}
spec:
  timeouts: {fast: {perTry: 2s, total: 10s}}
  targets: [{upstream: openai, timeout: fast}]
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: openai, namespace: agents}
spec: {url: "https://api.openai.com/v1", policy: models}
---
"#;

    #[test]
    fn reads_several_documents_and_defaults_the_namespace() {
        let mut catalog = Catalog::default();
        add_documents(&mut catalog, "inline", DOCUMENTS, "dev").expect("documents");
        assert_eq!(catalog.policies.len(), 1);
        assert_eq!(
            catalog.policies[0].metadata.namespace.as_deref(),
            Some("dev")
        );
        assert_eq!(
            catalog.upstreams[0].metadata.namespace.as_deref(),
            Some("agents")
        );
    }

    #[test]
    fn a_bad_document_is_named_by_its_position_and_problem() {
        let mut catalog = Catalog::default();
        let text =
            "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {name: x}\nspec: {}\n";
        let err = add_documents(&mut catalog, "f.yaml", text, "dev").expect_err("no url");
        let message = err.to_string();
        assert!(message.starts_with("f.yaml, document 1: "), "{message}");
        assert!(message.contains("url"), "{message}");

        let err = add_documents(&mut catalog, "f.yaml", "apiVersion: v1\nkind: Pod\n", "dev")
            .expect_err("foreign kind");
        assert!(err.to_string().contains("apiVersion \"v1\""), "{err}");
        let text = "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nspec: {url: 'http://x'}\n";
        let err = add_documents(&mut catalog, "f.yaml", text, "dev").expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }

    #[test]
    fn a_bad_duration_is_refused_with_its_text() {
        let mut catalog = Catalog::default();
        let text = "apiVersion: statefabric.io/v1alpha1\nkind: ResiliencyPolicy\nmetadata: {name: p}\n\
                    spec: {timeouts: {t: {total: 10 seconds}}}\n";
        let err = add_documents(&mut catalog, "f.yaml", text, "dev").expect_err("bad duration");
        assert!(err.to_string().contains("10 seconds"), "{err}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;
    use crate::validate::problems;

    #[test]
    fn the_shipped_example_loads_and_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../k8s/examples/mesh.yaml");
        let catalog = load_files(&[path], "agents").expect("example");
        assert_eq!(catalog.fabric_configs.len(), 2);
        assert_eq!(catalog.policies.len(), 1);
        assert_eq!(catalog.upstreams.len(), 1);
        assert_eq!(catalog.sagas.len(), 1);
        assert_eq!(problems(&catalog), Vec::new());
    }
}
