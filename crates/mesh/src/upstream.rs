//! `Upstream`: an external HTTP or gRPC destination agents call through
//! their sidecar's egress listener.

#![allow(
    unreachable_pub,
    reason = "kube's KubeSchema derive (the x_kube validation rules) re-emits these structs in a private module"
)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fabric_config::SecretRef;
use crate::status::MeshStatus;

/// An external destination: agents call `http://127.0.0.1:<egress>/<name>/…`
/// and the sidecar calls `url` with the headers and policy given here, so
/// the agent never holds the key.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "statefabric.io",
    version = "v1alpha1",
    kind = "Upstream",
    namespaced,
    status = "MeshStatus",
    shortname = "ups",
    category = "statefabric",
    doc = "An external HTTP or gRPC destination agents call through their sidecar.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.policy"),
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
#[x_kube(validation = Rule::new("!has(self.tls) || self.url.startsWith('https://')").message("spec.tls applies only to an https:// url"))]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Base URL; the agent's path is appended to it.
    #[schemars(
        length(min = 8, max = 2048),
        regex(pattern = r"^https?://[^/?#\s]+(/[^?#\s]*)?$")
    )]
    pub url: String,
    /// Which HTTP version the sidecar speaks to the upstream.
    #[serde(default)]
    pub protocol: Protocol,
    /// How an https:// upstream is verified (default: by the system's and
    /// webpki's roots, for the URL's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Headers the sidecar adds (API keys from Secrets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub headers: Vec<UpstreamHeader>,
    /// The ResiliencyPolicy (same namespace) whose targets name this
    /// upstream; without one, only the sidecar's defaults apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub policy: Option<String>,
}

/// The HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// HTTP/2 where the upstream offers it (ALPN), else HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only (h2c on http://, ALPN h2 on https://).
    Http2,
}

/// How the sidecar verifies the upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// A Secret whose `ca.crt` is the only trusted root (else the system's
    /// and webpki's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<SecretRef>,
    /// The name to verify, when it differs from the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
}

/// One header: a literal value or a key of a Secret.
#[derive(KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.value) != has(self.secretKeyRef)").message("a header has exactly one of value and secretKeyRef"))]
#[x_kube(validation = Rule::new("!(self.name.lowerAscii() in ['host', 'content-length', 'transfer-encoding', 'connection'])").message("this header is the sidecar's to set"))]
#[serde(rename_all = "camelCase")]
pub struct UpstreamHeader {
    /// The header's name.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    )]
    pub name: String,
    /// A literal value (not for secrets: anyone who reads the Upstream
    /// sees it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub value: Option<String>,
    /// The value from a Secret's key, read by the control plane and sent
    /// to the sidecar alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the resource's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in its data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}
