//! Pod spec in, decision out: skip, leave as is, deny, or a JSON Patch that
//! adds the sidecar. Pure (no I/O), so every pod shape is a unit test.
//!
//! The sidecar goes in as a Kubernetes native sidecar: the first init
//! container, `restartPolicy: Always`, with a startup probe on its gRPC
//! health — the app's containers start only once it serves, it keeps
//! running beside them, and it is stopped after them (so a Job completes
//! and the sidecar drains last). App containers get the addresses they
//! need (`STATEFABRIC_ADDRESS`, `STATEFABRIC_EGRESS_ADDRESS`), never a
//! credential. The tenant comes from the namespace's label, which only
//! cluster admins set; nothing a pod says can choose another.
//!
//! A pod that already carries a container named like ours is left alone
//! only if it is exactly what this injector adds (a re-invocation, with
//! the fields the API server defaults in between); otherwise it is denied,
//! since a hand-made sidecar could claim another tenant's settings.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::annotations::{self, INJECTED, Invalid, Overrides};
use crate::config::SidecarTemplate;

/// The injected container's name.
pub const SIDECAR: &str = "statefabric-sidecar";
/// Volumes the injector adds (names a pod may not use for its own).
pub const TOKEN_VOLUME: &str = "statefabric-token";
/// The control plane's CA, for the sidecar to trust its configuration
/// service.
pub const CA_VOLUME: &str = "statefabric-ca";
/// The sidecar's own state (the last applied mesh configuration).
pub const STATE_VOLUME: &str = "statefabric-state";
/// Where they are mounted in the sidecar.
const TOKEN_DIR: &str = "/var/run/secrets/statefabric/token";
const CA_DIR: &str = "/var/run/secrets/statefabric/ca";
const STATE_DIR: &str = "/var/lib/statefabric";
/// The audience of the sidecar's projected token (the control plane's).
pub const TOKEN_AUDIENCE: &str = "statefabric";
/// Where the ServiceAccount admission plugin mounts the account's token.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Namespaces never injected, whatever they say.
const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The namespace a pod is created in, as the injector sees it.
#[derive(Debug, Clone, Default)]
pub struct NamespaceInfo {
    /// Its name.
    pub name: String,
    /// Its labels (the tenant label among them).
    pub labels: BTreeMap<String, String>,
    /// Its annotations (`statefabric.io/inject` among them).
    pub annotations: BTreeMap<String, String>,
}

/// Why a pod is not injected (a metric label and an Event reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `kube-system`, `kube-public` or `kube-node-lease`.
    SystemNamespace,
    /// The fabric's own namespace (its control plane is not an agent).
    FabricNamespace,
    /// A host-network pod: its loopback is the node's.
    HostNetwork,
    /// The pod says `statefabric.io/inject: "false"`.
    OptedOut,
    /// Neither the pod nor its namespace asks for injection.
    NotAnnotated,
}

impl Skip {
    /// The metric label and Event reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SystemNamespace => "system_namespace",
            Self::FabricNamespace => "fabric_namespace",
            Self::HostNetwork => "host_network",
            Self::OptedOut => "opted_out",
            Self::NotAnnotated => "not_annotated",
        }
    }
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Let the pod through as it is, for this reason.
    Skip(Skip),
    /// Already injected exactly as this injector would: nothing to add.
    Unchanged,
    /// The JSON Patch (RFC 6902) operations that add the sidecar.
    Inject(Vec<Value>),
}

/// Why a pod is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// An annotation of ours with a bad value, or one we do not know.
    #[error(transparent)]
    Annotation(#[from] Invalid),
    /// The namespace does not name its tenant.
    #[error(
        "namespace {namespace} has no label {label} naming its tenant (set by cluster admins); the sidecar cannot be injected"
    )]
    NoTenant {
        /// The namespace.
        namespace: String,
        /// The label it lacks.
        label: String,
    },
    /// The pod already has a container named like ours that is not ours.
    #[error(
        "container {SIDECAR} is not the sidecar this injector adds ({0}); only the injector may add it"
    )]
    Forged(String),
    /// The pod uses a volume name the sidecar needs.
    #[error("volume {0} is reserved for the injected sidecar")]
    ReservedVolume(String),
    /// A container of the pod (named) refers to the tenant's credentials
    /// Secret (named).
    #[error(
        "{0} refers to Secret {1}, which holds the tenant's backend credentials: only the injected sidecar gets them"
    )]
    CredentialsReference(String, String),
    /// The review's object is not a pod with a spec.
    #[error("the pod has no spec")]
    NoSpec,
}

/// What every decision is made against: the sidecar template, the
/// fabric's own namespace, and the template's digest (the
/// `statefabric.io/injected` value), computed once rather than per review.
#[derive(Debug, Clone)]
pub struct Injection {
    template: SidecarTemplate,
    fabric_namespace: String,
    /// The CA of the control plane's certificate, given to sidecars inline
    /// (`None`: the cluster's own CA, `kube-root-ca.crt`, which every
    /// namespace has).
    control_plane_ca: Option<String>,
    digest: String,
}

impl Injection {
    /// Decisions for `template`, with `fabric_namespace` never injected.
    pub fn new(template: SidecarTemplate, fabric_namespace: impl Into<String>) -> Self {
        Self {
            digest: String::new(),
            template,
            fabric_namespace: fabric_namespace.into(),
            control_plane_ca: None,
        }
        .digested()
    }

    /// Sidecars verify the control plane with this CA (PEM) instead of the
    /// cluster's: the chart's own CA, which pods' namespaces hold no copy
    /// of (a CA certificate is public; Linkerd passes its trust anchors the
    /// same way).
    pub fn with_control_plane_ca(self, pem: String) -> Self {
        Self {
            control_plane_ca: Some(pem),
            ..self
        }
        .digested()
    }

    fn digested(mut self) -> Self {
        let bytes =
            serde_json::to_vec(&(&self.template, &self.control_plane_ca)).unwrap_or_default();
        self.digest = hex::encode(&Sha256::digest(&bytes)[..6]);
        self
    }
}

/// Decides for `pod` in `namespace`.
pub fn decide(
    pod: &Pod,
    namespace: &NamespaceInfo,
    injection: &Injection,
) -> Result<Decision, Denial> {
    let template = &injection.template;
    if SYSTEM_NAMESPACES.contains(&namespace.name.as_str()) {
        return Ok(Decision::Skip(Skip::SystemNamespace));
    }
    if namespace.name == injection.fabric_namespace {
        return Ok(Decision::Skip(Skip::FabricNamespace));
    }
    let spec = pod.spec.as_ref().ok_or(Denial::NoSpec)?;
    let pod_annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let overrides = annotations::parse(&pod_annotations)?;
    let namespace_says = match namespace
        .annotations
        .get(annotations::INJECT)
        .map(String::as_str)
    {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(Denial::Annotation(Invalid {
                annotation: format!("{} of namespace {}", annotations::INJECT, namespace.name),
                reason: format!("`{other}` is not \"true\" or \"false\""),
            }));
        }
    };
    let existing = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == SIDECAR);
    let wanted = match overrides.inject {
        Some(choice) => choice,
        None => namespace_says.unwrap_or(false),
    };
    if spec.host_network == Some(true) {
        return match existing {
            Some(_) => Err(Denial::Forged(
                "a hostNetwork pod gets no sidecar".to_owned(),
            )),
            None => Ok(Decision::Skip(Skip::HostNetwork)),
        };
    }
    if !wanted {
        if existing.is_some() {
            return Err(Denial::Forged(
                "the pod did not ask for injection".to_owned(),
            ));
        }
        return Ok(Decision::Skip(if overrides.inject == Some(false) {
            Skip::OptedOut
        } else {
            Skip::NotAnnotated
        }));
    }
    let tenant = namespace
        .labels
        .get(&template.tenant_label)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Denial::NoTenant {
            namespace: namespace.name.clone(),
            label: template.tenant_label.clone(),
        })?;
    let ca = injection.control_plane_ca.as_deref();
    let sidecar = sidecar_container(template, &overrides, tenant, ca);
    if let Some(existing) = existing {
        let mut theirs = serde_json::to_value(existing).unwrap_or(Value::Null);
        // The ServiceAccount admission plugin runs again after a webhook's
        // patch and mounts the account's token into every container, ours
        // included: the platform's, not the pod author's.
        if let Some(mounts) = theirs["volumeMounts"].as_array_mut() {
            mounts.retain(|m| m["mountPath"] != SERVICE_ACCOUNT_MOUNT);
        }
        let first_init = spec
            .init_containers
            .as_ref()
            .and_then(|c| c.first())
            .is_some_and(|c| c.name == SIDECAR);
        if !first_init {
            return Err(Denial::Forged(
                "it is not the first init container".to_owned(),
            ));
        }
        return match difference(&sidecar, &theirs, "") {
            None => Ok(Decision::Unchanged),
            Some(at) => Err(Denial::Forged(format!("it differs at {at}"))),
        };
    }
    for volume in spec.volumes.iter().flatten() {
        if [TOKEN_VOLUME, CA_VOLUME, STATE_VOLUME].contains(&volume.name.as_str()) {
            return Err(Denial::ReservedVolume(volume.name.clone()));
        }
    }
    if !template.credentials_secret.is_empty() {
        check_no_credentials_reference(spec, &template.credentials_secret)?;
    }

    let mut ops = Vec::new();
    match &spec.init_containers {
        Some(list) if !list.is_empty() => ops.push(add("/spec/initContainers/0", sidecar)),
        _ => ops.push(add("/spec/initContainers", json!([sidecar]))),
    }
    let volumes = volumes(ca.is_none());
    match &spec.volumes {
        Some(list) if !list.is_empty() => {
            ops.extend(volumes.into_iter().map(|v| add("/spec/volumes/-", v)));
        }
        _ => ops.push(add("/spec/volumes", Value::Array(volumes))),
    }
    let egress = overrides.egress.unwrap_or(true);
    for (index, container) in spec.containers.iter().enumerate() {
        ops.extend(app_env(index, container, template, egress));
    }
    let digest = injection.digest.clone();
    match &pod.metadata.annotations {
        Some(_) => ops.push(add(
            &format!("/metadata/annotations/{}", INJECTED.replace('/', "~1")),
            Value::String(digest),
        )),
        None => ops.push(add("/metadata/annotations", json!({ INJECTED: digest }))),
    }
    Ok(Decision::Inject(ops))
}

fn add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

fn field(path: &str) -> Value {
    json!({ "fieldRef": { "fieldPath": path } })
}

/// The sidecar container as JSON (the patch's value).
fn sidecar_container(
    template: &SidecarTemplate,
    overrides: &Overrides,
    tenant: &str,
    control_plane_ca: Option<&str>,
) -> Value {
    let log_level = overrides
        .log_level
        .clone()
        .unwrap_or_else(|| template.log_level.clone());
    let cpu = overrides
        .cpu
        .clone()
        .unwrap_or_else(|| template.cpu.clone());
    let memory = overrides
        .memory
        .clone()
        .unwrap_or_else(|| template.memory.clone());
    let mut env = vec![
        json!({"name": "STATEFABRIC_SIDECAR__TENANT", "value": tenant}),
        json!({"name": "STATEFABRIC_SIDECAR__IDENTITY", "valueFrom": field("metadata.name")}),
        // The kubelet's gRPC probe connects to the pod's IP; NetworkPolicy
        // (the chart's) keeps other pods out.
        json!({"name": "STATEFABRIC_SIDECAR__LISTEN", "value": format!("0.0.0.0:{}", template.grpc_port)}),
        json!({"name": "STATEFABRIC_ADMIN__LISTEN", "value": format!("0.0.0.0:{}", template.admin_port)}),
        json!({"name": "STATEFABRIC_TELEMETRY__LOG_LEVEL", "value": log_level}),
        json!({"name": "STATEFABRIC_MESH__ENABLED", "value": "true"}),
        json!({"name": "STATEFABRIC_MESH__CONTROL_PLANE", "value": template.control_plane}),
        json!({"name": "STATEFABRIC_MESH__TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")}),
        json!({"name": "STATEFABRIC_MESH__STATE_FILE", "value": format!("{STATE_DIR}/mesh.json")}),
        json!({"name": "STATEFABRIC_MESH__NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "STATEFABRIC_MESH__POD", "valueFrom": field("metadata.name")}),
    ];
    env.extend(backend_env(template));
    let mut mounts = vec![json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true})];
    match control_plane_ca {
        Some(pem) => env.push(json!({"name": "STATEFABRIC_MESH__CA_PEM", "value": pem})),
        None => {
            env.push(
                json!({"name": "STATEFABRIC_MESH__CA_FILE", "value": format!("{CA_DIR}/ca.crt")}),
            );
            mounts.push(json!({"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": true}));
        }
    }
    mounts.push(json!({"name": STATE_VOLUME, "mountPath": STATE_DIR}));
    if let Some(agent_type) = &overrides.agent_type {
        env.push(json!({"name": "STATEFABRIC_MESH__AGENT_TYPE", "value": agent_type}));
    }
    if let Some(config) = &overrides.config {
        env.push(json!({"name": "STATEFABRIC_MESH__CONFIG_NAME", "value": config}));
    }
    if let Some(blocks) = &overrides.building_blocks {
        env.push(
            json!({"name": "STATEFABRIC_SIDECAR__BUILDING_BLOCKS", "value": blocks.join(",")}),
        );
    }
    if overrides.egress.unwrap_or(true) {
        // On the pod's loopback: the agent's calls, nobody else's.
        env.push(json!({"name": "STATEFABRIC_EGRESS__ENABLED", "value": "true"}));
        env.push(json!({"name": "STATEFABRIC_EGRESS__LISTEN", "value": format!("127.0.0.1:{}", template.egress_port)}));
    }
    let mut ports = vec![
        json!({"name": "sf-grpc", "containerPort": template.grpc_port}),
        json!({"name": "sf-admin", "containerPort": template.admin_port}),
    ];
    if overrides.egress.unwrap_or(true) {
        ports.push(json!({"name": "sf-egress", "containerPort": template.egress_port}));
    }
    json!({
        "name": SIDECAR,
        "image": template.image,
        "restartPolicy": "Always",
        "env": env,
        "ports": ports,
        "startupProbe": {
            "grpc": {"port": template.grpc_port, "service": ""},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": "sf-admin"}},
        "livenessProbe": {"httpGet": {"path": "/healthz/live", "port": "sf-admin"}},
        "resources": {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"memory": memory},
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    })
}

/// Where the sidecar keeps its state: embedded in the pod, or on the
/// tenant's Postgres and Redis with the credentials from the tenant's
/// Secret (as env of this container only).
fn backend_env(template: &SidecarTemplate) -> Vec<Value> {
    if template.credentials_secret.is_empty() {
        return vec![
            json!({"name": "STATEFABRIC_STORAGE__SQLITE__PATH", "value": format!("{STATE_DIR}/events.db")}),
        ];
    }
    let secret =
        |key: &str| json!({"secretKeyRef": {"name": template.credentials_secret, "key": key}});
    let optional_secret = |key: &str| json!({"secretKeyRef": {"name": template.credentials_secret, "key": key, "optional": true}});
    vec![
        json!({"name": "STATEFABRIC_STORAGE__BACKEND", "value": "postgres"}),
        json!({"name": "STATEFABRIC_STORAGE__POSTGRES__URL", "valueFrom": secret("postgres-url")}),
        json!({"name": "STATEFABRIC_REDIS__MODE", "value": template.redis_mode}),
        json!({"name": "STATEFABRIC_REDIS__URLS", "valueFrom": secret("redis-urls")}),
        json!({"name": "STATEFABRIC_LOCKS__BACKEND", "value": "redis"}),
        json!({"name": "STATEFABRIC_SESSIONS__BACKEND", "value": "redis"}),
        json!({"name": "STATEFABRIC_UPDATES__BACKEND", "value": "redis"}),
        // The tenant's own Kafka login, when it was onboarded with one.
        json!({"name": "STATEFABRIC_KAFKA__USERNAME", "valueFrom": optional_secret("kafka-username")}),
        json!({"name": "STATEFABRIC_KAFKA__PASSWORD", "valueFrom": optional_secret("kafka-password")}),
    ]
}

/// Refuses a pod whose own containers or volumes name the credentials
/// Secret: a tenant's credentials go to its sidecars, not its agents.
fn check_no_credentials_reference(spec: &PodSpec, secret: &str) -> Result<(), Denial> {
    let refused = |what: String| Err(Denial::CredentialsReference(what, secret.to_owned()));
    for volume in spec.volumes.iter().flatten() {
        let direct = volume
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            == Some(secret);
        let projected = volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .any(|s| s.secret.as_ref().map(|s| s.name.as_str()) == Some(secret));
        if direct || projected {
            return refused(format!("volume {}", volume.name));
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for container in containers.filter(|c| c.name != SIDECAR) {
        let env = container.env.iter().flatten().any(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .is_some_and(|r| r.name == secret)
        });
        let env_from = container
            .env_from
            .iter()
            .flatten()
            .any(|e| e.secret_ref.as_ref().is_some_and(|r| r.name == secret));
        if env || env_from {
            return refused(format!("container {}", container.name));
        }
    }
    Ok(())
}

/// The sidecar's volumes: its pod-bound token for the control plane, the
/// cluster CA (published to every namespace) to verify it unless the CA is
/// given inline, its state.
fn volumes(cluster_ca: bool) -> Vec<Value> {
    let mut volumes = vec![json!({"name": TOKEN_VOLUME, "projected": {"sources": [
        {"serviceAccountToken": {"audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}})];
    if cluster_ca {
        volumes.push(json!({"name": CA_VOLUME, "configMap": {"name": "kube-root-ca.crt"}}));
    }
    volumes.push(json!({"name": STATE_VOLUME, "emptyDir": {}}));
    volumes
}

/// The env an app container gets: where its sidecar is. Variables it sets
/// itself are left alone.
fn app_env(
    index: usize,
    container: &Container,
    template: &SidecarTemplate,
    egress: bool,
) -> Vec<Value> {
    let mut wanted = vec![(
        "STATEFABRIC_ADDRESS",
        format!("http://127.0.0.1:{}", template.grpc_port),
    )];
    if egress {
        wanted.push((
            "STATEFABRIC_EGRESS_ADDRESS",
            format!("http://127.0.0.1:{}", template.egress_port),
        ));
    }
    let has = |name: &str| container.env.iter().flatten().any(|e| e.name == name);
    let missing: Vec<Value> = wanted
        .into_iter()
        .filter(|(name, _)| !has(name))
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    match &container.env {
        Some(list) if !list.is_empty() => missing
            .into_iter()
            .map(|e| add(&format!("/spec/containers/{index}/env/-"), e))
            .collect(),
        _ if missing.is_empty() => Vec::new(),
        _ => vec![add(
            &format!("/spec/containers/{index}/env"),
            Value::Array(missing),
        )],
    }
}

/// Fields the API server fills in with defaults after a webhook's patch:
/// present on a re-invocation though the injector did not set them.
const DEFAULTED: [&str; 10] = [
    "scheme",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "timeoutSeconds",
    "periodSeconds",
    "successThreshold",
    "failureThreshold",
    "protocol",
    "apiVersion",
];

/// Where `theirs` differs from `ours` plus fields the API server defaults
/// (a JSON pointer), or `None` when it does not.
fn difference(ours: &Value, theirs: &Value, at: &str) -> Option<String> {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(k, v)| {
                let here = format!("{at}/{k}");
                match b.get(k) {
                    Some(w) => difference(v, w, &here),
                    None => Some(here),
                }
            })
            .or_else(|| {
                b.keys()
                    .find(|k| !a.contains_key(*k) && !DEFAULTED.contains(&k.as_str()))
                    .map(|k| format!("{at}/{k}"))
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| difference(v, w, &format!("{at}/{i}"))),
        // Quantities and ports may come back in another spelling of the
        // same value (`1` vs `"1"`).
        (Value::Number(n), Value::String(s)) | (Value::String(s), Value::Number(n))
            if n.to_string() == *s =>
        {
            None
        }
        _ if ours == theirs => None,
        _ => Some(at.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        yaml_serde::from_str(yaml).expect("pod")
    }

    fn namespace(annotated: bool) -> NamespaceInfo {
        NamespaceInfo {
            name: "agents".into(),
            labels: BTreeMap::from([("statefabric.io/tenant".into(), "acme".into())]),
            annotations: if annotated {
                BTreeMap::from([(annotations::INJECT.into(), "true".into())])
            } else {
                BTreeMap::new()
            },
        }
    }

    fn decide_for(pod: &Pod, ns: &NamespaceInfo) -> Result<Decision, Denial> {
        decide(
            pod,
            ns,
            &Injection::new(SidecarTemplate::default(), "statefabric-system"),
        )
    }

    /// Applies the decision's patch to the pod, as the API server would.
    fn applied(pod: &Pod, decision: &Decision) -> Pod {
        let Decision::Inject(ops) = decision else {
            panic!("not injected: {decision:?}");
        };
        let mut value = serde_json::to_value(pod).expect("json");
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(ops.clone())).expect("patch");
        json_patch::patch(&mut value, &patch).expect("applies");
        serde_json::from_value(value).expect("still a pod")
    }

    const ANNOTATED: &str = r#"
metadata: {name: coder-0, annotations: {statefabric.io/inject: "true", statefabric.io/agent-type: coder}}
spec:
  containers: [{name: agent, image: agent:1}]
"#;

    #[test]
    fn with_a_credentials_secret_only_the_sidecar_gets_it_and_a_pod_naming_it_is_denied() {
        let template = SidecarTemplate {
            credentials_secret: "statefabric-sidecar-credentials".into(),
            redis_mode: "cluster".into(),
            ..SidecarTemplate::default()
        };
        let injection = Injection::new(template, "statefabric-system");
        let p = pod(ANNOTATED);
        let decision = decide(&p, &namespace(false), &injection).expect("ok");
        let spec = applied(&p, &decision).spec.expect("spec");
        let sidecar = &spec.init_containers.expect("init")[0];
        let env = sidecar.env.clone().unwrap_or_default();
        let secret_of = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|r| (r.name.clone(), r.key.clone()))
        };
        let secret = "statefabric-sidecar-credentials".to_owned();
        assert_eq!(
            secret_of("STATEFABRIC_STORAGE__POSTGRES__URL"),
            Some((secret.clone(), "postgres-url".into()))
        );
        assert_eq!(
            secret_of("STATEFABRIC_REDIS__URLS"),
            Some((secret.clone(), "redis-urls".into()))
        );
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            value("STATEFABRIC_STORAGE__BACKEND").as_deref(),
            Some("postgres")
        );
        assert_eq!(value("STATEFABRIC_REDIS__MODE").as_deref(), Some("cluster"));
        assert_eq!(
            value("STATEFABRIC_LOCKS__BACKEND").as_deref(),
            Some("redis")
        );
        assert!(value("STATEFABRIC_STORAGE__SQLITE__PATH").is_none());
        let app = serde_json::to_string(&spec.containers).expect("json");
        assert!(!app.contains(&secret), "the app gets no credentials: {app}");

        for (yaml, named) in [
            (
                r#"
metadata: {name: a, annotations: {statefabric.io/inject: "true"}}
spec:
  containers: [{name: agent, image: a, env: [{name: DB, valueFrom: {secretKeyRef: {name: statefabric-sidecar-credentials, key: postgres-url}}}]}]
"#,
                "container agent",
            ),
            (
                r#"
metadata: {name: a, annotations: {statefabric.io/inject: "true"}}
spec:
  containers: [{name: agent, image: a, envFrom: [{secretRef: {name: statefabric-sidecar-credentials}}]}]
"#,
                "container agent",
            ),
            (
                r#"
metadata: {name: a, annotations: {statefabric.io/inject: "true"}}
spec:
  containers: [{name: agent, image: a}]
  volumes: [{name: creds, secret: {secretName: statefabric-sidecar-credentials}}]
"#,
                "volume creds",
            ),
        ] {
            let err = decide(&pod(yaml), &namespace(false), &injection).expect_err("denied");
            assert!(
                matches!(&err, Denial::CredentialsReference(what, _) if what == named),
                "{err}"
            );
        }
    }

    #[test]
    fn a_control_plane_ca_goes_inline_and_the_cluster_ca_volume_is_left_out() {
        let p = pod(ANNOTATED);
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let plain = Injection::new(SidecarTemplate::default(), "statefabric-system");
        let with_ca = Injection::new(SidecarTemplate::default(), "statefabric-system")
            .with_control_plane_ca(pem.to_owned());
        assert_ne!(plain.digest, with_ca.digest, "a new CA is a new template");
        let decision = decide(&p, &namespace(false), &with_ca).expect("ok");
        let spec = applied(&p, &decision).spec.expect("spec");
        let sidecar = &spec.init_containers.expect("init")[0];
        let env = sidecar.env.clone().unwrap_or_default();
        let ca = env.iter().find(|e| e.name == "STATEFABRIC_MESH__CA_PEM");
        assert_eq!(ca.and_then(|e| e.value.as_deref()), Some(pem));
        assert!(!env.iter().any(|e| e.name == "STATEFABRIC_MESH__CA_FILE"));
        let volumes = spec.volumes.unwrap_or_default();
        assert!(!volumes.iter().any(|v| v.name == CA_VOLUME), "{volumes:?}");
        assert!(
            !sidecar
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == CA_VOLUME),
            "mounts name only volumes that exist"
        );
    }

    #[test]
    fn an_annotated_pod_gets_a_native_sidecar_first_and_its_apps_the_addresses() {
        let p = pod(ANNOTATED);
        let injected = applied(&p, &decide_for(&p, &namespace(false)).expect("ok"));
        let spec = injected.spec.expect("spec");
        let inits = spec.init_containers.expect("init containers");
        assert_eq!(inits[0].name, SIDECAR);
        assert_eq!(inits[0].restart_policy.as_deref(), Some("Always"));
        assert!(
            inits[0]
                .startup_probe
                .as_ref()
                .and_then(|p| p.grpc.as_ref())
                .is_some()
        );
        let env = inits[0].env.clone().unwrap_or_default();
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            value("STATEFABRIC_SIDECAR__TENANT").as_deref(),
            Some("acme")
        );
        assert_eq!(
            value("STATEFABRIC_MESH__AGENT_TYPE").as_deref(),
            Some("coder")
        );
        let app_env = spec.containers[0].env.clone().unwrap_or_default();
        assert!(app_env.iter().any(|e| e.name == "STATEFABRIC_ADDRESS"));
        assert!(
            !app_env
                .iter()
                .any(|e| e.name.contains("TENANT") || e.value_from.is_some()),
            "the app gets addresses only"
        );
        assert_eq!(spec.volumes.map(|v| v.len()), Some(3));
        assert!(
            injected
                .metadata
                .annotations
                .is_some_and(|a| a.contains_key(INJECTED))
        );
    }

    #[test]
    fn existing_init_containers_volumes_and_env_are_kept() {
        let p = pod(r#"
metadata: {name: job-0, annotations: {statefabric.io/inject: "true"}}
spec:
  initContainers: [{name: migrate, image: m:1}]
  containers:
  - {name: agent, image: agent:1, env: [{name: STATEFABRIC_ADDRESS, value: "http://custom:1"}, {name: X, value: "1"}]}
  - {name: helper, image: h:1}
  volumes: [{name: data, emptyDir: {}}]
"#);
        let injected = applied(&p, &decide_for(&p, &namespace(false)).expect("ok"));
        let spec = injected.spec.expect("spec");
        let inits = spec.init_containers.expect("inits");
        assert_eq!(
            inits.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            [SIDECAR, "migrate"]
        );
        assert_eq!(spec.volumes.map(|v| v.len()), Some(4));
        let agent_env = spec.containers[0].env.clone().unwrap_or_default();
        assert_eq!(agent_env.len(), 3, "its own address kept, egress added");
        assert_eq!(
            agent_env[0].value.as_deref(),
            Some("http://custom:1"),
            "the app's own value wins"
        );
        assert_eq!(spec.containers[1].env.clone().unwrap_or_default().len(), 2);
    }

    #[test]
    fn the_namespace_opts_in_and_a_pod_can_opt_out() {
        let plain = pod("metadata: {name: p}\nspec: {containers: [{name: a, image: a}]}");
        assert!(matches!(
            decide_for(&plain, &namespace(true)),
            Ok(Decision::Inject(_))
        ));
        assert_eq!(
            decide_for(&plain, &namespace(false)),
            Ok(Decision::Skip(Skip::NotAnnotated))
        );
        let out = pod(
            "metadata: {name: p, annotations: {statefabric.io/inject: \"false\"}}\nspec: {containers: [{name: a, image: a}]}",
        );
        assert_eq!(
            decide_for(&out, &namespace(true)),
            Ok(Decision::Skip(Skip::OptedOut))
        );
    }

    #[test]
    fn system_fabric_and_host_network_pods_are_skipped() {
        let p = pod(ANNOTATED);
        for (name, skip) in [
            ("kube-system", Skip::SystemNamespace),
            ("statefabric-system", Skip::FabricNamespace),
        ] {
            let ns = NamespaceInfo {
                name: name.into(),
                ..namespace(true)
            };
            assert_eq!(decide_for(&p, &ns), Ok(Decision::Skip(skip)));
        }
        let host = pod(
            "metadata: {name: h, annotations: {statefabric.io/inject: \"true\"}}\nspec: {hostNetwork: true, containers: [{name: a, image: a}]}",
        );
        assert_eq!(
            decide_for(&host, &namespace(true)),
            Ok(Decision::Skip(Skip::HostNetwork))
        );
    }

    #[test]
    fn no_tenant_label_a_bad_annotation_or_a_reserved_volume_is_denied() {
        let p = pod(ANNOTATED);
        let untenanted = NamespaceInfo {
            labels: BTreeMap::new(),
            ..namespace(false)
        };
        assert!(matches!(
            decide_for(&p, &untenanted),
            Err(Denial::NoTenant { .. })
        ));
        let bad = pod(
            "metadata: {name: b, annotations: {statefabric.io/inject: \"true\", statefabric.io/log-level: loud}}\nspec: {containers: [{name: a, image: a}]}",
        );
        let err = decide_for(&bad, &namespace(false)).expect_err("denied");
        assert!(
            err.to_string().contains("statefabric.io/log-level"),
            "{err}"
        );
        let reserved = pod(
            "metadata: {name: r, annotations: {statefabric.io/inject: \"true\"}}\nspec: {containers: [{name: a, image: a}], volumes: [{name: statefabric-state, emptyDir: {}}]}",
        );
        assert_eq!(
            decide_for(&reserved, &namespace(false)),
            Err(Denial::ReservedVolume(STATE_VOLUME.into()))
        );
    }

    #[test]
    fn a_reinvocation_changes_nothing_even_after_defaulting() {
        let p = pod(ANNOTATED);
        let once = applied(&p, &decide_for(&p, &namespace(false)).expect("ok"));
        assert_eq!(
            decide_for(&once, &namespace(false)),
            Ok(Decision::Unchanged)
        );
        // As the API server returns it: defaults filled in.
        let mut value = serde_json::to_value(&once).expect("json");
        let sidecar = &mut value["spec"]["initContainers"][0];
        sidecar["terminationMessagePath"] = json!("/dev/termination-log");
        sidecar["imagePullPolicy"] = json!("IfNotPresent");
        sidecar["readinessProbe"]["timeoutSeconds"] = json!(1);
        sidecar["env"][1]["valueFrom"]["fieldRef"]["apiVersion"] = json!("v1");
        sidecar["ports"][0]["protocol"] = json!("TCP");
        // The ServiceAccount plugin, run again after the patch.
        sidecar["volumeMounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({
                "name": "kube-api-access-x1y2z",
                "mountPath": SERVICE_ACCOUNT_MOUNT,
                "readOnly": true,
            }));
        let defaulted: Pod = serde_json::from_value(value).expect("pod");
        assert_eq!(
            decide_for(&defaulted, &namespace(false)),
            Ok(Decision::Unchanged)
        );
    }

    #[test]
    fn a_hand_made_sidecar_is_denied() {
        let p = pod(ANNOTATED);
        let once = applied(&p, &decide_for(&p, &namespace(false)).expect("ok"));
        // Another tenant in the env.
        let mut value = serde_json::to_value(&once).expect("json");
        value["spec"]["initContainers"][0]["env"][0]["value"] = json!("victim");
        let forged: Pod = serde_json::from_value(value).expect("pod");
        assert_eq!(
            decide_for(&forged, &namespace(false)),
            Err(Denial::Forged("it differs at /env/0/value".to_owned()))
        );
        // A command of its own.
        let mut value = serde_json::to_value(&once).expect("json");
        value["spec"]["initContainers"][0]["command"] = json!(["sh", "-c", "steal"]);
        let forged: Pod = serde_json::from_value(value).expect("pod");
        assert_eq!(
            decide_for(&forged, &namespace(false)),
            Err(Denial::Forged("it differs at /command".to_owned()))
        );
        // In a pod that did not ask for injection.
        let sneaky = pod(
            "metadata: {name: s}\nspec: {containers: [{name: statefabric-sidecar, image: evil}]}",
        );
        assert!(matches!(
            decide_for(&sneaky, &namespace(false)),
            Err(Denial::Forged(_))
        ));
    }
}
