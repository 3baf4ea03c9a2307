//! What one sidecar gets: from every resource of its namespace, the
//! FabricConfig that applies to its pod, and the namespace's valid
//! ResiliencyPolicies and Upstreams — with a version that changes exactly
//! when the content does, so a resubscribing sidecar that has it already
//! applies nothing (no config flap after a control-plane restart).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secrets::SecretValue;
use crate::validate::{Problem, problems};
use crate::{Catalog, FabricConfigSpec, ResiliencyPolicySpec, UpstreamSpec};

/// Who asks: a sidecar's pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// Its agent type (`statefabric.io/agent-type`), if it has one.
    pub agent_type: Option<String>,
    /// Its labels, which FabricConfig selectors match.
    pub labels: BTreeMap<String, String>,
    /// The FabricConfig the pod names (`statefabric.io/config`).
    pub config: Option<String>,
}

/// A resource's spec with its name and generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Named<T> {
    /// The resource's name.
    pub name: String,
    /// Its spec.
    pub spec: T,
}

/// One sidecar's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveConfig {
    /// The pod's namespace (every resource is from it).
    pub namespace: String,
    /// The FabricConfig that applies: the one the pod names, else the
    /// selecting one, else the namespace's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_config: Option<Named<FabricConfigSpec>>,
    /// The namespace's accepted ResiliencyPolicies.
    #[serde(default)]
    pub policies: Vec<Named<ResiliencyPolicySpec>>,
    /// The namespace's accepted Upstreams.
    #[serde(default)]
    pub upstreams: Vec<Named<UpstreamSpec>>,
    /// The Secret values the upstreams name, by `<secret>/<key>`
    /// ([`crate::secrets`]); a rotated value changes the version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretValue>,
}

impl EffectiveConfig {
    /// A digest of the content: equal configs have equal versions.
    pub fn version(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&Sha256::digest(&bytes)[..8])
    }
}

/// Why no configuration can be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error(
        "the pod names FabricConfig {namespace}/{name} (annotation statefabric.io/config), which does not exist or is not valid"
    )]
    /// The pod names a FabricConfig that is absent or refused.
    UnknownConfig {
        /// The pod's namespace.
        namespace: String,
        /// The name the pod gives.
        name: String,
    },
}

/// The configuration for `identity`: resources of its namespace only, and
/// none that [`problems`] refuses.
pub fn effective(catalog: &Catalog, identity: &Identity) -> Result<EffectiveConfig, SelectError> {
    let refused = problems(catalog);
    let configs = usable(&catalog.fabric_configs, &refused, &identity.namespace);
    let chosen =
        match &identity.config {
            Some(name) => Some(configs.iter().find(|c| &c.name_any() == name).ok_or_else(
                || SelectError::UnknownConfig {
                    namespace: identity.namespace.clone(),
                    name: name.clone(),
                },
            )?),
            // A selecting config before the namespace's default; among equals
            // the first by name, so every replica chooses the same.
            None => configs
                .iter()
                .find(|c| {
                    c.spec
                        .selector
                        .as_ref()
                        .is_some_and(|s| selects(s, &identity.labels))
                })
                .or_else(|| configs.iter().find(|c| c.spec.default)),
        };
    let upstreams: Vec<_> = usable(&catalog.upstreams, &refused, &identity.namespace)
        .into_iter()
        .map(|u| named(u, &u.spec))
        .collect();
    Ok(EffectiveConfig {
        namespace: identity.namespace.clone(),
        fabric_config: chosen.map(|c| named(*c, &c.spec)),
        policies: usable(&catalog.policies, &refused, &identity.namespace)
            .into_iter()
            .map(|p| named(p, &p.spec))
            .collect(),
        secrets: crate::secrets::resolve(&catalog.secrets, &identity.namespace, &upstreams),
        upstreams,
    })
}

/// The resources of `namespace` that no [`Problem`] refuses, by name.
fn usable<'a, K>(resources: &'a [K], refused: &[Problem], namespace: &str) -> Vec<&'a K>
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    let mut found: Vec<&K> = resources
        .iter()
        .filter(|r| r.meta().namespace.as_deref() == Some(namespace))
        .filter(|r| {
            !refused.iter().any(|p| {
                p.kind == kind
                    && p.namespace == namespace
                    && Some(&p.name) == r.meta().name.as_ref()
            })
        })
        .collect();
    found.sort_by_key(|r| r.name_any());
    found
}

fn named<K: Resource, T: Clone>(resource: &K, spec: &T) -> Named<T> {
    Named {
        name: resource.name_any(),
        spec: spec.clone(),
    }
}

/// Whether a label selector selects these labels (an empty selector
/// selects everything, as in Kubernetes).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .as_ref()
        .is_none_or(|wanted| wanted.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let expressions_match = selector.match_expressions.as_ref().is_none_or(|all| {
        all.iter().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false, // refused by the API server; select nothing
            }
        })
    });
    labels_match && expressions_match
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;
    use crate::local::add_documents;

    const NAMESPACE: &str = r#"
apiVersion: statefabric.io/v1alpha1
kind: FabricConfig
metadata: {name: fallback, namespace: agents}
spec: {default: true, logLevel: info}
---
apiVersion: statefabric.io/v1alpha1
kind: FabricConfig
metadata: {name: coders, namespace: agents}
spec:
  selector: {matchLabels: {role: coder}}
  logLevel: debug
---
apiVersion: statefabric.io/v1alpha1
kind: FabricConfig
metadata: {name: elsewhere, namespace: other}
spec: {default: true, logLevel: trace}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: openai, namespace: agents}
spec: {url: "https://api.openai.com/v1"}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: broken, namespace: agents}
spec: {url: "https://example.com", policy: missing}
"#;

    fn catalog() -> Catalog {
        let mut catalog = Catalog::default();
        add_documents(&mut catalog, "test", NAMESPACE, "default").expect("documents");
        catalog
    }

    fn pod(labels: &[(&str, &str)], config: Option<&str>) -> Identity {
        Identity {
            namespace: "agents".into(),
            pod: "p".into(),
            agent_type: None,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            config: config.map(Into::into),
        }
    }

    #[test]
    fn a_selecting_config_wins_over_the_default_and_a_named_one_over_both() {
        let catalog = catalog();
        let name = |identity| {
            effective(&catalog, &identity)
                .expect("config")
                .fabric_config
                .map(|c| c.name)
        };
        assert_eq!(
            name(pod(&[("role", "coder")], None)).as_deref(),
            Some("coders")
        );
        assert_eq!(
            name(pod(&[("role", "critic")], None)).as_deref(),
            Some("fallback")
        );
        assert_eq!(
            name(pod(&[("role", "coder")], Some("fallback"))).as_deref(),
            Some("fallback")
        );
        assert_eq!(
            effective(&catalog, &pod(&[], Some("elsewhere"))),
            Err(SelectError::UnknownConfig {
                namespace: "agents".into(),
                name: "elsewhere".into()
            }),
            "another namespace's config is never given"
        );
    }

    #[test]
    fn only_valid_resources_of_the_pods_namespace_are_given() {
        let config = effective(&catalog(), &pod(&[], None)).expect("config");
        let upstreams: Vec<_> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            upstreams,
            ["openai"],
            "the upstream naming a missing policy is held back"
        );
    }

    #[test]
    fn the_version_follows_the_content() {
        let catalog = catalog();
        let a = effective(&catalog, &pod(&[("role", "coder")], None)).expect("config");
        let b = effective(&catalog, &pod(&[("role", "coder")], None)).expect("config");
        let c = effective(&catalog, &pod(&[], None)).expect("config");
        assert_eq!(a.version(), b.version());
        assert_ne!(a.version(), c.version());
    }

    #[test]
    fn selectors_follow_kubernetes_rules() {
        let labels: BTreeMap<String, String> = [("tier".to_owned(), "gold".to_owned())].into();
        let expression = |operator: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: operator.into(),
                values: Some(values.iter().map(|v| (*v).into()).collect()),
            }]),
            match_labels: None,
        };
        assert!(selects(&LabelSelector::default(), &labels));
        assert!(selects(&expression("In", &["gold", "silver"]), &labels));
        assert!(!selects(&expression("NotIn", &["gold"]), &labels));
        assert!(selects(&expression("Exists", &[]), &labels));
        assert!(!selects(&expression("DoesNotExist", &[]), &labels));
        assert!(!selects(&expression("Bogus", &[]), &labels));
    }
}
