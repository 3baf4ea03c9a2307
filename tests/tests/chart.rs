//! The Helm chart (`k8s/charts/statefabric`) against the test API server:
//! - rendered with the default values, with every optional part on
//!   (`ci/full-values.yaml`) and with the HPA variant, it passes
//!   `kubectl apply --dry-run=server` with the operators' CRDs installed
//!   (schemas, CEL rules, RBAC, webhooks: everything but running it), and
//!   a bad value is refused naming its field;
//! - the fabric's own part really installs (`helm install`): CRDs, RBAC,
//!   Deployments whose ReplicaSets make pods, the webhook registration with
//!   the CA its certificates are signed by; and uninstalls;
//! - end to end: the control plane and the injector run as the rendered
//!   Deployments' pods say (the pod runner: their ConfigMaps, Secrets,
//!   ServiceAccount tokens, probes), the webhook reached by URL; an
//!   annotated agent Deployment in an onboarded tenant's namespace gets
//!   injected pods, whose sidecar runs on the real Postgres and Redis,
//!   verifies the control plane with the chart's CA and serves the
//!   namespace's default FabricConfig; plain and kube-system pods are
//!   untouched; a forged sidecar and a bad annotation are denied; with the
//!   injector down, failurePolicy Fail refuses annotated pods;
//! - every Grafana dashboard query is valid PromQL and names metrics the
//!   code exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;
use statefabric_tests::chart::{self, NAMESPACE};
use statefabric_tests::kube::{TestNamespace, client, install_crds, kubectl};
use tokio::sync::Mutex;

/// The tests that install or dry-run the chart's cluster-wide objects take
/// turns.
static TURN: Mutex<()> = Mutex::const_new(());

fn documents(manifest: &str) -> usize {
    manifest
        .split("\n---")
        .filter(|doc| doc.lines().any(|l| l.starts_with("kind: ")))
        .count()
}

async fn dry_run(manifest: &str) -> anyhow::Result<()> {
    let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(manifest)).await?;
    let accepted = out
        .lines()
        .filter(|l| l.ends_with("(server dry run)"))
        .count();
    anyhow::ensure!(
        accepted == documents(manifest),
        "{accepted} of {} objects accepted:\n{out}",
        documents(manifest)
    );
    Ok(())
}

#[tokio::test]
async fn the_rendered_chart_passes_server_side_dry_run_with_every_part() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let client = client().await?;
    install_crds(&client).await?;
    chart::install_third_party_crds().await?;
    chart::ensure_namespace().await?;
    // The tenant's namespace must exist for its objects to be dry-run (a
    // dry-run Namespace is not created).
    let tenant_ns = TestNamespace::create(&client).await?;
    let ns = tenant_ns.name.as_str();
    let tenant_sets = [
        format!("tenants[0].namespace={ns}"),
        "tenants[0].createNamespace=false".to_owned(),
        format!("autoscaling.agents[0].namespace={ns}"),
    ];
    let full = chart::chart_dir().join("ci/full-values.yaml");
    let hpa = chart::chart_dir().join("ci/hpa-values.yaml");
    for values in [None, Some(&full), Some(&hpa)] {
        let mut args: Vec<String> = Vec::new();
        if let Some(file) = values {
            args.extend(["-f".to_owned(), file.display().to_string()]);
            for set in &tenant_sets {
                args.extend(["--set".to_owned(), set.clone()]);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let manifest = chart::render(&args).await?;
        dry_run(&manifest)
            .await
            .with_context(|| format!("values {values:?}"))?;
        if values == Some(&full) {
            for kind in [
                "kind: Kafka\n",
                "kind: KafkaNodePool",
                "kind: KafkaConnect",
                "kind: KafkaUser",
                "kind: KafkaTopic",
                "kind: Cluster\n",
                "kind: ScaledObject",
                "kind: ServiceMonitor",
                "kind: PodMonitor",
                "kind: PrometheusRule",
                "kind: Certificate",
                "kind: NetworkPolicy",
                "kind: StatefulSet",
                "kind: FabricConfig",
            ] {
                assert!(
                    manifest.contains(kind),
                    "{kind} missing from the full render"
                );
            }
        }
        if values == Some(&hpa) {
            assert!(manifest.contains("kind: HorizontalPodAutoscaler"));
        }
    }
    // The KafkaUser `fabric tenants onboard --kafka-namespace` prints for a
    // tenant's own Kafka principal is valid for Strimzi's current API.
    let user = statefabric_kafka::acls::kafka_user(
        "acme",
        NAMESPACE,
        "statefabric",
        "sf-tenant-acme-password",
    );
    dry_run(&yaml_serde::to_string(&user)?)
        .await
        .context("the tenant's KafkaUser")?;

    // A bad value is refused by the API server, naming the field.
    let bad = chart::render(&["--set", "injector.failurePolicy=Sometimes"]).await?;
    let err = dry_run(&bad).await.expect_err("an unknown failurePolicy");
    assert!(format!("{err:#}").contains("failurePolicy"), "{err:#}");
    tenant_ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn the_fabric_part_installs_and_uninstalls_on_the_test_cluster() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let client = client().await?;
    chart::ensure_namespace().await?;
    // No kubelet runs the migrations hook here (fabric migrate is tested as
    // a process); Ignore keeps a release a killed test leaves behind from
    // blocking pods elsewhere (testenv/prune-kubernetes.sh removes it).
    install_release(&["injector.failurePolicy=Ignore"], None).await?;
    let result = check_installed(&client).await;
    let uninstalled = chart::helm(&["uninstall", "statefabric", "-n", NAMESPACE, "--wait"]).await;
    result?;
    uninstalled?;
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    assert!(
        hooks.get_opt("statefabric-injector").await?.is_none(),
        "uninstall removes the webhook registration"
    );
    // The CA stays (helm.sh/resource-policy: keep): a reinstall trusts
    // what running sidecars trust.
    let secrets: Api<Secret> = Api::namespaced(client, NAMESPACE);
    assert!(secrets.get_opt("statefabric-ca").await?.is_some());
    Ok(())
}

async fn check_installed(client: &kube::Client) -> anyhow::Result<()> {
    let crds = kubectl(&["get", "crd", "-o", "name"], None).await?;
    for kind in [
        "fabricconfigs",
        "resiliencypolicies",
        "upstreams",
        "sagadefinitions",
    ] {
        assert!(crds.contains(&format!("{kind}.statefabric.io")), "{crds}");
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    for name in ["statefabric-control-plane", "statefabric-injector"] {
        let d = deployments.get(name).await?;
        assert_eq!(d.spec.and_then(|s| s.replicas), Some(2), "{name}");
    }
    // The controller manager turns them into pods (Pending: no kubelet).
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    statefabric_tests::eventually(
        "the Deployments' pods",
        std::time::Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app.kubernetes.io/part-of=statefabric"))
                    .await?;
                Ok((list.items.len() >= 4).then_some(()))
            }
        },
    )
    .await?;
    // The webhook is registered with the CA that signed the injector's
    // certificate.
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let hook = hooks.get("statefabric-injector").await?;
    let webhook = hook
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .next()
        .context("a webhook")?;
    let bundle = webhook.client_config.ca_bundle.context("caBundle")?.0;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let tls = secrets.get("statefabric-injector-tls").await?;
    let ca = tls
        .data
        .and_then(|d| d.get("ca.crt").map(|v| v.0.clone()))
        .context("ca.crt")?;
    assert_eq!(bundle, ca);
    assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(webhook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    for (verb, resource) in [
        ("create", "tokenreviews.authentication.k8s.io"),
        ("watch", "fabricconfigs.statefabric.io"),
    ] {
        let allowed = kubectl(
            &[
                "auth",
                "can-i",
                verb,
                resource,
                "--as",
                &format!("system:serviceaccount:{NAMESPACE}:statefabric-control-plane"),
            ],
            None,
        )
        .await?;
        assert_eq!(allowed.trim(), "yes", "{verb} {resource}");
    }
    Ok(())
}

/// Metric names the code registers: the names given to `register` (and
/// the collectors' descriptors), with the prefixes registries add.
fn exported_metrics() -> anyhow::Result<BTreeSet<String>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = Vec::new();
    for dir in ["crates", "sidecar", "control-plane", "injector", "cli"] {
        rust_files(&root.join(dir), &mut sources)?;
    }
    let inline = regex::Regex::new(r#"register(?:_with_unit)?\(\s*"([a-z][a-z0-9_]*)""#)?;
    let alone = regex::Regex::new(r#"^\s*"([a-z][a-z0-9_]*)",\s*$"#)?;
    let prefix = regex::Regex::new(r#"sub_registry_with_prefix\(\s*"([a-z_]+)""#)?;
    let mut names = BTreeSet::new();
    let mut prefixes = BTreeSet::from([String::new()]);
    for file in sources {
        let text = std::fs::read_to_string(&file)?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            for cap in prefix.captures_iter(line) {
                if &cap[1] != "statefabric" {
                    prefixes.insert(format!("{}_", &cap[1]));
                }
            }
            for cap in inline.captures_iter(line) {
                names.insert(cap[1].to_owned());
            }
            // `register(` then the name on its own line, or a collector's
            // descriptor tuple: the name alone on a line after `(`.
            let before = if i > 0 { lines[i - 1].trim_end() } else { "" };
            if let Some(cap) = alone.captures(line)
                && before.ends_with('(')
            {
                names.insert(cap[1].to_owned());
            }
        }
    }
    let mut exported = BTreeSet::new();
    for name in &names {
        for p in &prefixes {
            let full = format!("statefabric_{p}{name}");
            for suffix in ["", "_total", "_bucket", "_sum", "_count", "_info"] {
                exported.insert(format!("{full}{suffix}"));
            }
        }
    }
    Ok(exported)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "target") {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[test]
fn every_dashboard_query_is_promql_naming_metrics_the_code_exports() -> anyhow::Result<()> {
    let exported = exported_metrics()?;
    assert!(
        exported.contains("statefabric_saga_tasks_open"),
        "the extraction works"
    );
    assert!(!exported.contains("statefabric_no_such_metric"));
    let dir = chart::chart_dir().join("files/dashboards");
    let metric = regex::Regex::new(r"\bstatefabric_[a-z0-9_]+")?;
    let mut rules = String::from("groups:\n- name: dashboards\n  rules:\n");
    let mut dashboards = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| path.display().to_string())?;
        dashboards += 1;
        let panels = dashboard["panels"].as_array().context("panels")?;
        assert!(!panels.is_empty(), "{}", path.display());
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default();
            let targets = panel["targets"].as_array().context("targets")?;
            assert!(!targets.is_empty(), "{title}: no query");
            for target in targets {
                let expr = target["expr"].as_str().context("expr")?;
                let named: Vec<&str> = metric.find_iter(expr).map(|m| m.as_str()).collect();
                assert!(!named.is_empty(), "{title}: {expr} names no metric of ours");
                for name in named {
                    assert!(
                        exported.contains(name),
                        "{}: panel {title:?} queries {name}, which the code does not export",
                        path.display()
                    );
                }
                // Grafana's interval variable, as Prometheus would get it.
                let promql = expr.replace("$__rate_interval", "5m");
                rules.push_str(&format!(
                    "  - record: dashboard:check:{}\n    expr: {}\n",
                    rules.matches("record:").count(),
                    serde_json::to_string(&promql)?
                ));
            }
        }
    }
    assert!(
        dashboards >= 5,
        "sidecars, sagas, outbox and Kafka, Redis, injector"
    );
    // promtool parses every query (as recording rules).
    let file = std::env::temp_dir().join(format!("dashboards-{}.rules.yaml", std::process::id()));
    std::fs::write(&file, rules)?;
    let output = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .context("promtool (testenv/up.sh installs it)")?;
    std::fs::remove_file(&file).ok();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `helm upgrade --install` of the release (taking over what the other
/// suites applied from its templates), migrations off: no kubelet runs the
/// hook here.
async fn install_release(sets: &[&str], set_json: Option<&str>) -> anyhow::Result<()> {
    let chart_dir = chart::chart_dir().display().to_string();
    let mut args = vec![
        "upgrade",
        "--install",
        "statefabric",
        chart_dir.as_str(),
        "-n",
        NAMESPACE,
        "--take-ownership",
        "--timeout",
        "60s",
        "--set",
        "migrations.enabled=false",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    if let Some(json) = set_json {
        args.extend(["--set-json", json]);
    }
    chart::helm(&args).await?;
    Ok(())
}

/// The release for the end-to-end test: one replica each (the pod runner
/// binds the spec's own ports), the webhook and the control plane reached
/// on 127.0.0.1 (no cluster network here), the tenant's namespace given a
/// default FabricConfig with a session policy the test can see served.
async fn install_for_end_to_end(tenant_ns: &str) -> anyhow::Result<()> {
    let tenant = format!("tenants[0].namespace={tenant_ns}");
    install_release(
        &[
            "controlPlane.replicas=1",
            "injector.replicas=1",
            "injector.url=https://127.0.0.1:7602/mutate",
            "injector.controlPlaneAddress=https://127.0.0.1:7504",
            "injector.sidecar.redisMode=standalone",
            "certificates.extraIPs[0]=127.0.0.1",
            "tenants[0].name=unused",
            &tenant,
            "tenants[0].createNamespace=false",
        ],
        Some(r#"defaultFabricConfig={"sessions":{"chat":{"ttl":"30m"}},"logLevel":"info"}"#),
    )
    .await
}

/// The first pod of a Deployment of the release, once its ReplicaSet made it.
async fn pod_of(client: &kube::Client, name: &str) -> anyhow::Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    statefabric_tests::eventually(
        &format!("a pod of {name}"),
        std::time::Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={name}")))
                    .await?;
                Ok(list.items.into_iter().next())
            }
        },
    )
    .await
}

async fn apply_json(manifest: &str) -> anyhow::Result<Result<Value, String>> {
    // The namespace's default ServiceAccount appears a moment after it.
    for _ in 0..50 {
        match kubectl(&["apply", "-o", "json", "-f", "-"], Some(manifest)).await {
            Ok(out) => return Ok(Ok(serde_json::from_str(&out)?)),
            Err(err)
                if err
                    .to_string()
                    .contains("serviceaccount \"default\" not found") =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(err) => return Ok(Err(format!("{err:#}"))),
        }
    }
    anyhow::bail!("the namespace's default ServiceAccount never appeared")
}

fn pod(ns: &str, name: &str, annotations: &str, init: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{{annotations}}}}}\n\
         spec:\n  {init}\n  containers: [{{name: agent, image: \"agent:test\"}}]\n"
    )
}

#[tokio::test]
async fn installed_from_the_chart_the_fabric_injects_and_serves_an_agent_deployment()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let client = client().await?;
    chart::ensure_namespace().await?;
    statefabric_db::pg::migrate(&statefabric_tests::pg_admin_url()).await?;
    // The database Secret the chart expects (values: database.secretName).
    let control_url = statefabric_tests::pg_control_url();
    let database = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "statefabric-database", "namespace": NAMESPACE},
        "stringData": {"control-url": control_url, "owner-url": statefabric_tests::pg_admin_url()},
    });
    kubectl(&["apply", "-f", "-"], Some(&database.to_string())).await?;
    let tenant_ns = TestNamespace::create(&client).await?;
    let ns = tenant_ns.name.clone();
    let tenant = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    kubectl(
        &[
            "label",
            "namespace",
            &ns,
            &format!("statefabric.io/tenant={tenant}"),
        ],
        None,
    )
    .await?;
    install_for_end_to_end(&ns).await?;
    let result = end_to_end(&client, &ns, &tenant).await;
    let uninstalled = chart::helm(&["uninstall", "statefabric", "-n", NAMESPACE, "--wait"]).await;
    let mut redis = redis::Client::open(statefabric_tests::redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd("ACL")
        .arg("DELUSER")
        .arg(format!("sf-tenant-{tenant}"))
        .query_async::<()>(&mut redis)
        .await?;
    result?;
    uninstalled?;
    tenant_ns.delete().await
}

async fn end_to_end(client: &kube::Client, ns: &str, tenant: &str) -> anyhow::Result<()> {
    use statefabric_tests::pod_runner;
    // The control plane and the injector, as their Deployments' pods say.
    let mut control_plane = pod_runner::run(
        client,
        &pod_of(client, "statefabric-control-plane").await?,
        "control-plane",
    )
    .await?;
    control_plane.ready().await?;
    let mut injector = pod_runner::run(
        client,
        &pod_of(client, "statefabric-injector").await?,
        "injector",
    )
    .await?;
    injector.ready().await?;

    // The tenant, onboarded as an operator does.
    statefabric_tests::process::onboard_tenant(tenant, ns).await?;

    // An annotated Deployment: the ReplicaSet's pods come back injected.
    let deployment = statefabric_tests::kube::agent_deployment(ns, "coder", "coder", 1);
    kubectl(&["apply", "-f", "-"], Some(&deployment)).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let agent = statefabric_tests::eventually(
        "an injected pod of the agent Deployment",
        std::time::Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=coder"))
                    .await?;
                Ok(list.items.into_iter().find(|p| {
                    p.spec
                        .as_ref()
                        .and_then(|s| s.init_containers.as_ref())
                        .is_some_and(|c| c[0].name == "statefabric-sidecar")
                }))
            }
        },
    )
    .await?;
    let sidecar_spec = serde_json::to_value(&agent)?;
    let sidecar_env = sidecar_spec["spec"]["initContainers"][0]["env"].to_string();
    assert!(sidecar_env.contains(tenant), "the namespace's tenant");
    assert!(
        sidecar_env.contains("STATEFABRIC_MESH__CA_PEM"),
        "the chart's CA inline"
    );
    // The sidecar runs on Postgres and Redis, verifies the control plane
    // with the chart's CA, and serves the namespace's default FabricConfig.
    let mut sidecar = pod_runner::run(client, &agent, "statefabric-sidecar").await?;
    sidecar.ready().await?;
    statefabric_tests::process::session_policy_served(
        "http://127.0.0.1:7400",
        "chat",
        std::time::Duration::from_secs(29 * 60),
    )
    .await?;
    statefabric_tests::process::append_and_lock("http://127.0.0.1:7400").await?;

    // Untouched: a plain pod, and kube-system (not sent to the webhook).
    let plain = apply_json(&pod(ns, "plain-0", "", ""))
        .await?
        .map_err(anyhow::Error::msg)?;
    assert!(plain["spec"]["initContainers"].is_null(), "{plain}");
    let system_pod = format!("sf-e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let system = apply_json(&pod(
        "kube-system",
        &system_pod,
        "statefabric.io/inject: \"true\"",
        "",
    ))
    .await?
    .map_err(anyhow::Error::msg)?;
    assert!(system["spec"]["initContainers"].is_null(), "{system}");
    kubectl(
        &[
            "delete",
            "pod",
            "-n",
            "kube-system",
            &system_pod,
            "--wait=false",
        ],
        None,
    )
    .await?;
    // Denied, naming why.
    let forged = apply_json(&pod(
        ns,
        "forged-0",
        "",
        "initContainers: [{name: statefabric-sidecar, image: evil, restartPolicy: Always}]",
    ))
    .await?
    .expect_err("a forged sidecar");
    assert!(forged.contains("only the injector may add it"), "{forged}");
    let bad = apply_json(&pod(
        ns,
        "bad-0",
        "statefabric.io/inject: \"true\", statefabric.io/log-level: loud",
        "",
    ))
    .await?
    .expect_err("a bad annotation");
    assert!(bad.contains("statefabric.io/log-level"), "{bad}");

    let (code, stderr) = sidecar.stop().await?;
    assert_eq!(code, 0, "{stderr}");
    // The injector down: failurePolicy Fail (the chart's default) refuses
    // annotated pods in tenant namespaces.
    let (code, stderr) = injector.stop().await?;
    assert_eq!(code, 0, "{stderr}");
    let refused = apply_json(&pod(ns, "late-0", "statefabric.io/inject: \"true\"", ""))
        .await?
        .expect_err("no injector, no annotated pod");
    assert!(refused.contains("inject.statefabric.io"), "{refused}");
    let (code, stderr) = control_plane.stop().await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}
