//! The Secret values an Upstream names — header values
//! (`spec.headers[].secretKeyRef`) and a CA (`spec.tls.ca`, key `ca.crt`) —
//! resolved for one sidecar, so the sidecar adds the key and the agent
//! container never holds it.
//!
//! Only a Secret labelled `statefabric.io/egress: "true"` is ever given:
//! whoever may write an Upstream in a namespace could otherwise send any of
//! its Secrets (a database password, a ServiceAccount token) to a host of
//! their choosing. A value is given as text (UTF-8), and only to sidecars
//! of the Secret's own namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use serde::{Deserialize, Serialize};

use crate::effective::Named;
use crate::upstream::UpstreamSpec;

/// The label a Secret needs before any of its keys reach a sidecar.
pub const EGRESS_LABEL: &str = "statefabric.io/egress";
/// The key of a CA Secret (`spec.tls.ca`) that holds the PEM roots.
pub const CA_KEY: &str = "ca.crt";

/// A secret's value: given to the sidecar, never printed (`Debug` shows no
/// part of it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(String);

impl SecretValue {
    /// Wraps a value read from a Secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// The name under which a value is given: `<secret>/<key>`.
pub fn reference(secret: &str, key: &str) -> String {
    format!("{secret}/{key}")
}

/// Whether a Secret may be given to sidecars at all.
pub fn labelled(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(EGRESS_LABEL))
        .is_some_and(|v| v == "true")
}

/// Every (Secret, key) these upstreams name.
pub fn referenced<'a>(
    upstreams: impl IntoIterator<Item = &'a UpstreamSpec>,
) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for spec in upstreams {
        for header in &spec.headers {
            if let Some(r) = &header.secret_key_ref {
                found.push((r.name.clone(), r.key.clone()));
            }
        }
        if let Some(ca) = spec.tls.as_ref().and_then(|t| t.ca.as_ref()) {
            found.push((ca.name.clone(), CA_KEY.to_owned()));
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The values `upstreams` (of `namespace`) name, from the labelled Secrets
/// of that namespace; what is missing is left out (the sidecar names it).
pub(crate) fn resolve(
    secrets: &[Secret],
    namespace: &str,
    upstreams: &[Named<UpstreamSpec>],
) -> BTreeMap<String, SecretValue> {
    let mut values = BTreeMap::new();
    for (name, key) in referenced(upstreams.iter().map(|u| &u.spec)) {
        let secret = secrets.iter().find(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name.as_str())
                && labelled(s)
        });
        if let Some(value) = secret.and_then(|s| value_of(s, &key)) {
            values.insert(reference(&name, &key), SecretValue(value));
        }
    }
    values
}

/// A key's text: `stringData` (as written in a local file) before `data`.
fn value_of(secret: &Secret, key: &str) -> Option<String> {
    if let Some(text) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(text.clone());
    }
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_never_printed() {
        let value = SecretValue::new("sk-very-secret");
        assert!(!format!("{value:?}").contains("sk-"));
        assert_eq!(value.expose(), "sk-very-secret");
        assert_eq!(
            serde_json::to_string(&value).expect("json"),
            "\"sk-very-secret\""
        );
    }

    #[test]
    fn only_labelled_secrets_of_the_namespace_are_resolved() {
        let secret = |namespace: &str, name: &str, label: Option<&str>| {
            let mut s = Secret::default();
            s.metadata.namespace = Some(namespace.into());
            s.metadata.name = Some(name.into());
            s.metadata.labels = label.map(|v| {
                [(EGRESS_LABEL.to_owned(), v.to_owned())]
                    .into_iter()
                    .collect()
            });
            s.data = Some(
                [
                    (
                        "token".to_owned(),
                        k8s_openapi::ByteString(b"Bearer k".to_vec()),
                    ),
                    (
                        "binary".to_owned(),
                        k8s_openapi::ByteString(vec![0xff, 0xfe]),
                    ),
                ]
                .into_iter()
                .collect(),
            );
            s
        };
        let secrets = [
            secret("agents", "good", Some("true")),
            secret("agents", "unlabelled", None),
            secret("agents", "off", Some("false")),
            secret("other", "elsewhere", Some("true")),
        ];
        let upstream: UpstreamSpec = serde_json::from_value(serde_json::json!({
            "url": "https://x.io",
            "headers": [
                {"name": "A", "secretKeyRef": {"name": "good", "key": "token"}},
                {"name": "B", "secretKeyRef": {"name": "good", "key": "binary"}},
                {"name": "C", "secretKeyRef": {"name": "good", "key": "absent"}},
                {"name": "D", "secretKeyRef": {"name": "unlabelled", "key": "token"}},
                {"name": "E", "secretKeyRef": {"name": "off", "key": "token"}},
                {"name": "F", "secretKeyRef": {"name": "elsewhere", "key": "token"}},
            ],
        }))
        .expect("spec");
        let upstreams = [Named {
            name: "u".into(),
            spec: upstream,
        }];
        let resolved = resolve(&secrets, "agents", &upstreams);
        let names: Vec<&str> = resolved.keys().map(String::as_str).collect();
        assert_eq!(names, ["good/token"]);
        assert_eq!(resolved["good/token"].expose(), "Bearer k");
    }
}
