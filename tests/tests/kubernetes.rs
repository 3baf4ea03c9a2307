//! The test Kubernetes API server and the mesh CRDs on it: the server is
//! ready and of the expected version, the CRDs reach Established, the
//! shipped examples are accepted, bad resources are refused by the schema
//! and CEL rules with the field named, a Lease round trip, and RBAC refusing
//! an identity without grants.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams, ValidationDirective};
use kube::{Api, Client};
use serde_json::{Value, json};
use statefabric_mesh::{FabricConfig, ResiliencyPolicy, SagaDefinition, Upstream};
use statefabric_tests::kube::{
    TestNamespace, client, client_as, install_crds, kube_version, kubectl,
};

#[tokio::test]
async fn the_api_server_is_ready_and_kubectl_matches_its_version() -> anyhow::Result<()> {
    let client = client().await?;
    let version = client.apiserver_version().await?;
    assert_eq!(version.git_version, format!("v{}", kube_version()));
    assert_eq!(
        kubectl(&["get", "--raw", "/readyz"], None).await?.trim(),
        "ok"
    );
    let client_version: Value =
        serde_json::from_str(&kubectl(&["version", "--client", "-o", "json"], None).await?)?;
    assert_eq!(
        client_version["clientVersion"]["gitVersion"],
        format!("v{}", kube_version())
    );
    Ok(())
}

/// ValidatingAdmissionPolicy is on (the admission chain the injector's
/// webhook joins): a policy bound to one namespace refuses a ConfigMap
/// there and nowhere else.
#[tokio::test]
async fn an_admission_policy_refuses_what_it_says() -> anyhow::Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client).await?;
    let name = &namespace.name;
    let policy = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [configmaps]}}
  validations:
  - {{expression: "!has(object.data) || !('forbidden' in object.data)", message: "no key named forbidden"}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {name}}}
"#
    );
    kubectl(&["apply", "-f", "-"], Some(&policy)).await?;
    let config_map = |n: u32| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{n}}}\ndata: {{forbidden: x}}\n"
        )
    };
    let mut attempt = 0;
    let refused =
        statefabric_tests::eventually("the policy in force", Duration::from_secs(30), || {
            attempt += 1;
            let document = config_map(attempt);
            async move {
                Ok(kubectl(&["create", "-n", name, "-f", "-"], Some(&document))
                    .await
                    .err()
                    .map(|e| e.to_string()))
            }
        })
        .await?;
    assert!(refused.contains("no key named forbidden"), "{refused}");
    // Another namespace is not bound.
    let other = TestNamespace::create(&client).await?;
    kubectl(
        &["create", "-n", &other.name, "-f", "-"],
        Some(&config_map(0)),
    )
    .await?;
    kubectl(
        &[
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            name,
        ],
        None,
    )
    .await?;
    other.delete().await?;
    namespace.delete().await
}

#[tokio::test]
async fn the_crds_reach_established_and_serve_every_kind() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client).await?;
    let lp = ListParams::default();
    assert!(
        Api::<FabricConfig>::namespaced(client.clone(), &namespace.name)
            .list(&lp)
            .await?
            .items
            .is_empty()
    );
    assert!(
        Api::<ResiliencyPolicy>::namespaced(client.clone(), &namespace.name)
            .list(&lp)
            .await?
            .items
            .is_empty()
    );
    assert!(
        Api::<Upstream>::namespaced(client.clone(), &namespace.name)
            .list(&lp)
            .await?
            .items
            .is_empty()
    );
    assert!(
        Api::<SagaDefinition>::namespaced(client.clone(), &namespace.name)
            .list(&lp)
            .await?
            .items
            .is_empty()
    );
    // kubectl knows them by their category and short names.
    let printed = kubectl(&["get", "statefabric", "-n", &namespace.name], None).await;
    assert!(printed.is_ok(), "{printed:?}");
    namespace.delete().await
}

#[tokio::test]
async fn the_shipped_examples_are_accepted_with_their_printer_columns() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client).await?;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/examples/mesh.yaml");
    kubectl(&["apply", "-n", &namespace.name, "-f", example], None).await?;
    let upstream = Api::<Upstream>::namespaced(client.clone(), &namespace.name)
        .get("openai")
        .await?;
    assert_eq!(upstream.spec.url, "https://api.openai.com/v1");
    let table = kubectl(&["get", "upstreams", "-n", &namespace.name], None).await?;
    assert!(
        table.contains("URL") && table.contains("https://api.openai.com/v1"),
        "{table}"
    );
    let table = kubectl(&["get", "fabcfg", "-n", &namespace.name], None).await?;
    assert!(
        table.contains("DEFAULT") && table.contains("agents"),
        "{table}"
    );
    namespace.delete().await
}

/// Applies a document of `kind` as kubectl does (server-side, strict field
/// validation) and returns the API server's refusal message, failing if it
/// was accepted.
async fn refusal(
    client: &Client,
    namespace: &str,
    kind: &str,
    spec: Value,
) -> anyhow::Result<String> {
    let object = json!({
        "apiVersion": "statefabric.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": spec,
    });
    let plural = match kind {
        "FabricConfig" => "fabricconfigs",
        "ResiliencyPolicy" => "resiliencypolicies",
        "Upstream" => "upstreams",
        _ => "sagadefinitions",
    };
    let gvk = kube::api::GroupVersionKind::gvk("statefabric.io", "v1alpha1", kind);
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource);
    let object: kube::api::DynamicObject = serde_json::from_value(object)?;
    let params = PatchParams::apply("statefabric-tests").validation(ValidationDirective::Strict);
    match api.patch("bad", &params, &Patch::Apply(&object)).await {
        Ok(_) => anyhow::bail!(
            "{kind} {spec} was accepted",
            spec = serde_json::to_string(&object.data)?
        ),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            Ok(status.message)
        }
        Err(other) => Err(other.into()),
    }
}

#[tokio::test]
async fn bad_resources_are_refused_naming_the_field() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client).await?;
    let cases = [
        ("Upstream", json!({"url": "ftp://example.com"}), "spec.url"),
        (
            "Upstream",
            json!({"url": "http://example.com", "tls": {}}),
            "spec.tls applies only to an https:// url",
        ),
        (
            "Upstream",
            json!({"url": "https://x.io", "headers": [{"name": "Authorization", "value": "a", "secretKeyRef": {"name": "s", "key": "k"}}]}),
            "exactly one of value and secretKeyRef",
        ),
        (
            "Upstream",
            json!({"url": "https://x.io", "headers": [{"name": "Host", "value": "a"}]}),
            "the sidecar's to set",
        ),
        (
            "ResiliencyPolicy",
            json!({"targets": [{"upstream": "u", "timeout": "missing"}]}),
            "spec.targets[].timeout names no entry",
        ),
        (
            "ResiliencyPolicy",
            json!({"targets": [{"dependency": "postgres", "upstream": "u"}]}),
            "exactly one of dependency and upstream",
        ),
        (
            "ResiliencyPolicy",
            json!({"retries": {"r": {"maxAttempts": 3, "initialBackoff": "5s", "maxBackoff": "1s"}}}),
            "maxBackoff must be at least initialBackoff",
        ),
        (
            "ResiliencyPolicy",
            json!({"retries": {"r": {"maxAttempts": 0, "initialBackoff": "1s", "maxBackoff": "5s"}}}),
            "spec.retries.r.maxAttempts",
        ),
        (
            "ResiliencyPolicy",
            json!({"timeouts": {"t": {"total": "10 seconds"}}}),
            "spec.timeouts.t.total",
        ),
        (
            "ResiliencyPolicy",
            json!({"circuitBreakers": {"b": {"openFor": "10s"}}}),
            "set consecutiveFailures or failureRatePercent",
        ),
        (
            "ResiliencyPolicy",
            json!({"limits": {"l": {"queue": 10}}}),
            "set maxConcurrency, requestsPerSecond or tokensPerMinute",
        ),
        (
            "FabricConfig",
            json!({"default": true, "selector": {"matchLabels": {"a": "b"}}}),
            "a default FabricConfig selects every pod",
        ),
        (
            "FabricConfig",
            json!({"sessions": {"chat": {"ttl": "1h", "maxTtl": "1m"}}}),
            "maxTtl must be at least ttl",
        ),
        ("FabricConfig", json!({"logLevel": "loud"}), "spec.logLevel"),
        (
            "FabricConfig",
            json!({"buildingBlocks": ["telepathy"]}),
            "spec.buildingBlocks[0]",
        ),
        (
            "SagaDefinition",
            json!({"start": "missing", "steps": {"a": {"agent": "w", "action": "a", "timeout": "1s", "compensation": "none"}}}),
            "spec.start names no step",
        ),
        (
            "SagaDefinition",
            json!({"start": "a", "steps": {}}),
            "spec.steps",
        ),
    ];
    for (kind, spec, expected) in cases {
        let message = refusal(&client, &namespace.name, kind, spec.clone()).await?;
        assert!(
            message.contains(expected),
            "{kind} {spec}: expected {expected:?} in {message:?}"
        );
    }
    // A misspelt field is refused too, not dropped (kubectl validates
    // strictly against the schema).
    let misspelt = "apiVersion: statefabric.io/v1alpha1\nkind: ResiliencyPolicy\n\
                    metadata: {name: misspelt}\nspec: {timeout: {t: {total: 1s}}}\n";
    let refused = kubectl(&["apply", "-n", &namespace.name, "-f", "-"], Some(misspelt))
        .await
        .expect_err("an unknown field is refused");
    assert!(
        refused
            .to_string()
            .contains("unknown field \"spec.timeout\""),
        "{refused}"
    );
    namespace.delete().await
}

#[tokio::test]
async fn a_lease_round_trip_refuses_a_stale_update() -> anyhow::Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace.name);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("smoke".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(5),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease).await?;
    let mut renewed = created.clone();
    if let Some(spec) = renewed.spec.as_mut() {
        spec.holder_identity = Some("b".into());
    }
    let renewed = leases
        .replace("smoke", &PostParams::default(), &renewed)
        .await?;
    assert_eq!(
        renewed
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("b")
    );
    // Writing over the first version again is a conflict: the optimistic
    // concurrency a Lease-based election relies on.
    match leases
        .replace("smoke", &PostParams::default(), &created)
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409, "{status:?}"),
        other => anyhow::bail!("a stale Lease update was not refused: {other:?}"),
    }
    namespace.delete().await
}

#[tokio::test]
async fn rbac_refuses_an_identity_without_grants() -> anyhow::Result<()> {
    let admin = client().await?;
    let namespace = TestNamespace::create(&admin).await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &namespace.name);
    assert!(
        secrets.list(&ListParams::default()).await.is_ok(),
        "the admin may"
    );
    let nobody = client_as(
        &format!("system:serviceaccount:{}:nobody", namespace.name),
        &["system:serviceaccounts", "system:authenticated"],
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(nobody, &namespace.name);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status.message.contains("cannot list resource \"secrets\""),
                "{}",
                status.message
            );
        }
        other => anyhow::bail!("an identity without grants listed secrets: {other:?}"),
    }
    // The controller manager made the namespace's default ServiceAccount.
    statefabric_tests::eventually(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || {
            let admin = admin.clone();
            let namespace = namespace.name.clone();
            async move {
                let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                    Api::namespaced(admin, &namespace);
                Ok(accounts.get_opt("default").await?.map(|_| ()))
            }
        },
    )
    .await?;
    namespace.delete().await
}

/// `kubectl auth can-i` as the control plane's ServiceAccount (it answers
/// `yes`, or `no` with exit code 1). `resource` may end in `/<subresource>`.
async fn control_plane_may(verb: &str, resource: &str, namespace: &str) -> anyhow::Result<bool> {
    account_may("statefabric-control-plane", verb, resource, namespace).await
}

/// `kubectl auth can-i` as a ServiceAccount of `statefabric-system`.
async fn account_may(
    account: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
) -> anyhow::Result<bool> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, sub)) => (resource, Some(sub)),
        None => (resource, None),
    };
    let mut command = tokio::process::Command::new(statefabric_tests::kube::kubectl_path());
    command
        .arg("--kubeconfig")
        .arg(statefabric_tests::kube::kubeconfig_path())
        .args(["auth", "can-i", verb, resource, "-n", namespace])
        .arg("--as")
        .arg(format!(
            "system:serviceaccount:statefabric-system:{account}"
        ));
    if let Some(sub) = subresource {
        command.arg(format!("--subresource={sub}"));
    }
    let output = command.output().await?;
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => anyhow::bail!(
            "kubectl auth can-i {verb} {resource}: {other} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[tokio::test]
async fn the_control_planes_rbac_allows_what_it_needs_and_nothing_else() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    statefabric_tests::kube::install_control_plane_rbac().await?;
    let agents = TestNamespace::create(&client).await?;
    let (home, elsewhere) = ("statefabric-system", agents.name.as_str());
    for (verb, resource, namespace) in [
        ("watch", "fabricconfigs.statefabric.io", elsewhere),
        ("list", "sagadefinitions.statefabric.io", elsewhere),
        ("patch", "upstreams.statefabric.io/status", elsewhere),
        (
            "update",
            "resiliencypolicies.statefabric.io/status",
            elsewhere,
        ),
        ("create", "tokenreviews.authentication.k8s.io", elsewhere),
        ("get", "pods", elsewhere),
        ("create", "events", elsewhere),
        ("update", "leases.coordination.k8s.io", home),
        ("create", "leases.coordination.k8s.io", home),
    ] {
        assert!(
            control_plane_may(verb, resource, namespace).await?,
            "the control plane may not {verb} {resource} in {namespace}"
        );
    }
    for (verb, resource, namespace) in [
        ("get", "secrets", elsewhere),
        ("get", "secrets", home),
        ("patch", "fabricconfigs.statefabric.io", elsewhere),
        ("delete", "sagadefinitions.statefabric.io", elsewhere),
        ("update", "leases.coordination.k8s.io", elsewhere),
        ("list", "pods", elsewhere),
        ("create", "pods", elsewhere),
    ] {
        assert!(
            !control_plane_may(verb, resource, namespace).await?,
            "the control plane may {verb} {resource} in {namespace}"
        );
    }
    // A tenant's namespace grants `get` on its Secrets (those its Upstreams
    // name), and nothing more: no list, no watch, no other namespace.
    let tenant = TestNamespace::create(&client).await?;
    statefabric_tests::kube::grant_egress_secrets(&tenant.name).await?;
    assert!(control_plane_may("get", "secrets", &tenant.name).await?);
    for verb in ["list", "watch", "update", "create"] {
        assert!(
            !control_plane_may(verb, "secrets", &tenant.name).await?,
            "the control plane may {verb} secrets in the tenant's namespace"
        );
    }
    assert!(!control_plane_may("get", "secrets", elsewhere).await?);
    tenant.delete().await?;
    agents.delete().await
}

#[tokio::test]
async fn the_injectors_rbac_allows_what_it_needs_and_nothing_else() -> anyhow::Result<()> {
    let client = client().await?;
    statefabric_tests::kube::install_injector_rbac().await?;
    let agents = TestNamespace::create(&client).await?;
    let elsewhere = agents.name.as_str();
    let may = |verb, resource| account_may("statefabric-injector", verb, resource, elsewhere);
    for (verb, resource) in [
        ("watch", "namespaces"),
        ("list", "namespaces"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            may(verb, resource).await?,
            "the injector may not {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("get", "pods"),
        ("create", "pods"),
        ("patch", "namespaces"),
        ("patch", "deployments.apps"),
        (
            "create",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
        ),
    ] {
        assert!(
            !may(verb, resource).await?,
            "the injector may {verb} {resource}"
        );
    }
    agents.delete().await
}
