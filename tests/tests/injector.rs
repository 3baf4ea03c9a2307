//! The injector against the real API server: registered as a mutating
//! webhook (`url:` client config, the cluster CA as caBundle, scoped to the
//! test's namespace by a label), reached over TLS by the API server itself.
//! - an annotated pod comes back with the native sidecar first, the tenant
//!   of its namespace, the app's addresses; so do a Deployment's pods,
//!   created by the ReplicaSet controller, with an `Injected` Event on the
//!   ReplicaSet; a plain pod is untouched;
//! - a bad annotation, a hand-made sidecar and a namespace without a
//!   tenant are denied, each named; a server-side dry run creates nothing;
//! - the injected sidecar, started from the pod as the API server stored
//!   it (the pod runner), subscribes with the pod's own token and serves
//!   the namespace's FabricConfig;
//! - with the injector down, `failurePolicy: Fail` refuses annotated pods;
//! - a tenant onboarded with `fabric tenants onboard` gets sidecars that run
//!   on the real Postgres and Redis as the tenant's own logins, from a
//!   Secret only the sidecar container is given (a pod naming it is
//!   denied);
//! - the webhook answers 415 to a body that is not JSON and 400 to a
//!   malformed review, and picks up a rotated certificate without a
//!   restart.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use nix::sys::signal::Signal;
use serde_json::Value;
use statefabric_tests as env;
use statefabric_tests::kube::{TestNamespace, client, install_crds, kubectl, pki_dir};
use statefabric_tests::process::{self, Service};

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The injector process and its registration.
struct Injector {
    service: Service,
    port: u16,
    webhook: String,
    grpc_port: u16,
    /// Holds its kubeconfig.
    _dir: tempfile::TempDir,
}

async fn start_injector(
    test_id: &str,
    control_plane: u16,
    cert: &std::path::Path,
    key: &std::path::Path,
    extra: &[(&'static str, String)],
) -> anyhow::Result<Injector> {
    let port = env::free_port();
    let [grpc_port, admin_port, egress_port] =
        [env::free_port(), env::free_port(), env::free_port()];
    // With exactly the grants of the chart's templates/injector-rbac.yaml.
    env::kube::install_injector_rbac().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = env::kube::kubeconfig_as_service_account(
        dir.path(),
        "statefabric-system",
        "statefabric-injector",
    )
    .await?
    .display()
    .to_string();
    let mut vars = vec![
        ("KUBECONFIG", kubeconfig),
        ("STATEFABRIC_WEBHOOK__LISTEN", format!("127.0.0.1:{port}")),
        ("STATEFABRIC_WEBHOOK__TLS_CERT", cert.display().to_string()),
        ("STATEFABRIC_WEBHOOK__TLS_KEY", key.display().to_string()),
        (
            "STATEFABRIC_WEBHOOK__TLS_RELOAD_INTERVAL",
            "200ms".to_owned(),
        ),
        (
            "STATEFABRIC_SIDECAR_TEMPLATE__CONTROL_PLANE",
            format!("https://127.0.0.1:{control_plane}"),
        ),
        (
            "STATEFABRIC_SIDECAR_TEMPLATE__GRPC_PORT",
            grpc_port.to_string(),
        ),
        (
            "STATEFABRIC_SIDECAR_TEMPLATE__ADMIN_PORT",
            admin_port.to_string(),
        ),
        (
            "STATEFABRIC_SIDECAR_TEMPLATE__EGRESS_PORT",
            egress_port.to_string(),
        ),
    ];
    vars.extend(extra.iter().cloned());
    let borrowed: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut service = process::spawn("statefabric-injector", &[], &borrowed)?;
    service.ready().await?;
    let ca = std::fs::read(pki_dir().join("ca.crt"))?;
    let webhook = format!("statefabric-injector-{test_id}");
    let registration = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: {webhook}}}
webhooks:
- name: inject.statefabric.io
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  reinvocationPolicy: IfNeeded
  timeoutSeconds: 5
  clientConfig:
    url: https://127.0.0.1:{port}/mutate
    caBundle: {ca}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}]
  namespaceSelector: {{matchLabels: {{statefabric.io/injector-test: {test_id}}}}}
"#,
        ca = base64_encode(&ca),
    );
    kubectl(&["apply", "-f", "-"], Some(&registration)).await?;
    Ok(Injector {
        service,
        port,
        webhook,
        grpc_port,
        _dir: dir,
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A namespace of tenant `tenant` (unless `None`) that the test's webhook
/// registration selects.
async fn namespace(test_id: &str, tenant: Option<&str>) -> anyhow::Result<TestNamespace> {
    let admin = client().await?;
    let namespace = TestNamespace::create(&admin).await?;
    let mut labels = vec![format!("statefabric.io/injector-test={test_id}")];
    if let Some(tenant) = tenant {
        labels.push(format!("statefabric.io/tenant={tenant}"));
    }
    let mut args = vec!["label", "namespace", namespace.name.as_str()];
    args.extend(labels.iter().map(String::as_str));
    kubectl(&args, None).await?;
    Ok(namespace)
}

fn pod_manifest(ns: &str, name: &str, annotations: &str, extra_init: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  annotations: {{{annotations}}}
spec:
  {extra_init}
  containers: [{{name: agent, image: "agent:test"}}]
"#
    )
}

/// `kubectl apply` of a manifest: the created object, or kubectl's error.
async fn apply(manifest: &str, extra: &[&str]) -> anyhow::Result<Result<Value, String>> {
    let mut args = vec!["apply", "-o", "json", "-f", "-"];
    args.extend_from_slice(extra);
    // The ServiceAccount admission plugin needs the namespace's default
    // account, which the controller-manager creates a moment after it.
    for _ in 0..50 {
        match kubectl(&args, Some(manifest)).await {
            Ok(out) => return Ok(Ok(serde_json::from_str(&out)?)),
            Err(err)
                if err
                    .to_string()
                    .contains("serviceaccount \"default\" not found") =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => return Ok(Err(format!("{err:#}"))),
        }
    }
    anyhow::bail!("the namespace's default ServiceAccount never appeared")
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn the_injector_adds_the_sidecar_denies_what_it_must_and_the_sidecar_runs()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let admin = client().await?;
    install_crds(&admin).await?;
    let test_id = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let cp_port = env::free_port();
    let kubeconfig = env::kube::kubeconfig_path().display().to_string();
    let cp = process::mesh_control_plane(cp_port, &kubeconfig, &[]).await?;
    let injector = start_injector(
        &test_id,
        cp_port,
        &pki_dir().join("mesh.crt"),
        &pki_dir().join("mesh.key"),
        &[],
    )
    .await?;
    let namespace = namespace(&test_id, Some(&tenant)).await?;
    let ns = namespace.name.as_str();

    // Annotated: the native sidecar, first, with the namespace's tenant.
    let created = apply(
        &pod_manifest(
            ns,
            "coder-0",
            "statefabric.io/inject: \"true\", statefabric.io/agent-type: coder",
            "",
        ),
        &[],
    )
    .await?
    .map_err(|e| anyhow::anyhow!(e))?;
    let sidecar = &created["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "statefabric-sidecar", "{created}");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["grpc"]["port"], injector.grpc_port);
    assert_eq!(
        env_value(sidecar, "STATEFABRIC_SIDECAR__TENANT"),
        Some(tenant.clone())
    );
    assert_eq!(
        env_value(sidecar, "STATEFABRIC_MESH__AGENT_TYPE").as_deref(),
        Some("coder")
    );
    let app = &created["spec"]["containers"][0];
    assert_eq!(
        env_value(app, "STATEFABRIC_ADDRESS"),
        Some(format!("http://127.0.0.1:{}", injector.grpc_port))
    );
    assert!(
        created["metadata"]["annotations"]["statefabric.io/injected"].is_string(),
        "{created}"
    );

    // A Deployment: the ReplicaSet controller creates the pods, each comes
    // back injected, and the Event is on the ReplicaSet.
    let deployment = env::kube::agent_deployment(ns, "agents", "critic", 2);
    kubectl(&["apply", "-f", "-"], Some(&deployment)).await?;
    env::eventually(
        "two injected pods from the ReplicaSet",
        Duration::from_secs(30),
        || async {
            let listed: Value = serde_json::from_str(
                &kubectl(
                    &["get", "pods", "-n", ns, "-l", "app=agents", "-o", "json"],
                    None,
                )
                .await?,
            )?;
            let items = listed["items"].as_array().cloned().unwrap_or_default();
            let injected = items
                .iter()
                .filter(|p| p["spec"]["initContainers"][0]["name"] == "statefabric-sidecar")
                .count();
            Ok((items.len() == 2 && injected == 2).then_some(()))
        },
    )
    .await?;
    let event_on = |kind: &'static str, reason: &'static str| async move {
        env::eventually(
            &format!("a {reason} Event on a {kind}"),
            Duration::from_secs(15),
            || async {
                let listed: Value = serde_json::from_str(
                    &kubectl(&["get", "events", "-n", ns, "-o", "json"], None).await?,
                )?;
                Ok(listed["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["reason"] == reason && e["involvedObject"]["kind"] == kind)
                    .cloned())
            },
        )
        .await
    };
    let injected_event = event_on("ReplicaSet", "Injected").await?;
    assert_eq!(injected_event["type"], "Normal", "{injected_event}");

    // Not annotated: untouched.
    let plain = apply(&pod_manifest(ns, "plain-0", "", ""), &[])
        .await?
        .map_err(|e| anyhow::anyhow!(e))?;
    assert!(plain["spec"]["initContainers"].is_null(), "{plain}");
    assert_eq!(plain["spec"]["containers"][0]["env"], Value::Null);

    // Denied, each naming why.
    let bad = apply(
        &pod_manifest(
            ns,
            "bad-0",
            "statefabric.io/inject: \"true\", statefabric.io/sidecar-memory: plenty",
            "",
        ),
        &[],
    )
    .await?
    .expect_err("a bad annotation is denied");
    assert!(bad.contains("statefabric.io/sidecar-memory"), "{bad}");
    let denied_event = event_on("Pod", "Denied").await?;
    assert_eq!(denied_event["type"], "Warning", "{denied_event}");
    assert!(
        denied_event["message"]
            .as_str()
            .unwrap_or_default()
            .contains("statefabric.io/sidecar-memory"),
        "{denied_event}"
    );
    let forged = apply(
        &pod_manifest(
            ns,
            "forged-0",
            "",
            "initContainers: [{name: statefabric-sidecar, image: evil, restartPolicy: Always}]",
        ),
        &[],
    )
    .await?
    .expect_err("a hand-made sidecar is denied");
    assert!(
        forged.contains("not the sidecar this injector adds"),
        "{forged}"
    );
    let untenanted = namespace_without_tenant(&test_id).await?;
    let refused = apply(
        &pod_manifest(
            &untenanted.name,
            "orphan-0",
            "statefabric.io/inject: \"true\"",
            "",
        ),
        &[],
    )
    .await?
    .expect_err("no tenant, no sidecar");
    assert!(refused.contains("statefabric.io/tenant"), "{refused}");

    // A server-side dry run shows the injection and creates nothing.
    let dry = apply(
        &pod_manifest(ns, "dry-0", "statefabric.io/inject: \"true\"", ""),
        &["--dry-run=server"],
    )
    .await?
    .map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(
        dry["spec"]["initContainers"][0]["name"],
        "statefabric-sidecar"
    );
    let pods: kube::Api<Pod> = kube::Api::namespaced(admin.clone(), ns);
    assert!(pods.get_opt("dry-0").await?.is_none(), "nothing created");

    // The injected sidecar runs from the stored pod and gets its
    // configuration with the pod's own token.
    kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: statefabric.io/v1alpha1\nkind: FabricConfig\nmetadata: {{name: agents, namespace: {ns}}}\n\
             spec: {{default: true, sessions: {{chat: {{ttl: 30m}}}}}}\n"
        )),
    )
    .await?;
    let stored = pods.get("coder-0").await?;
    let mut running = env::pod_runner::run(&admin, &stored, "statefabric-sidecar").await?;
    running.ready().await?;
    process::session_policy_served(
        &format!("http://127.0.0.1:{}", injector.grpc_port),
        "chat",
        Duration::from_secs(29 * 60),
    )
    .await?;
    let (code, stderr) = running.stop().await?;
    assert_eq!(code, 0, "{stderr}");

    // The injector down: failurePolicy Fail refuses annotated pods.
    let (code, _) = injector.service.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    let down = apply(
        &pod_manifest(ns, "late-0", "statefabric.io/inject: \"true\"", ""),
        &[],
    )
    .await?
    .expect_err("no injector, no pod");
    assert!(down.contains("inject.statefabric.io"), "{down}");

    kubectl(
        &["delete", "mutatingwebhookconfiguration", &injector.webhook],
        None,
    )
    .await?;
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    untenanted.delete().await?;
    namespace.delete().await
}

async fn namespace_without_tenant(test_id: &str) -> anyhow::Result<TestNamespace> {
    namespace(test_id, None).await
}

/// Runs `curl` against the webhook (a client that is not ours).
async fn curl(port: u16, content_type: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            &pki_dir().join("ca.crt").display().to_string(),
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Content-Type: {content_type}"),
            "--data-binary",
            body,
            &format!("https://127.0.0.1:{port}/mutate"),
        ])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse()?, body.to_owned()))
}

#[tokio::test]
async fn bad_requests_get_http_errors_and_a_rotated_certificate_is_served_without_a_restart()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(pki_dir().join("mesh.crt"), &cert)?;
    std::fs::copy(pki_dir().join("mesh.key"), &key)?;
    let test_id = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let injector = start_injector(&test_id, env::free_port(), &cert, &key, &[]).await?;

    let (code, body) = curl(injector.port, "text/plain", "{}").await?;
    assert_eq!(code, 415, "{body}");
    let (code, body) = curl(injector.port, "application/json", "{\"kind\": 7}").await?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not an AdmissionReview"), "{body}");
    let review = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"abc-123","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","namespace":"kube-system","userInfo":{},"object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","annotations":{"statefabric.io/inject":"true"}},"spec":{"containers":[{"name":"a","image":"a"}]}},"dryRun":true}}"#;
    let (code, body) = curl(injector.port, "application/json", review).await?;
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body)?;
    assert_eq!(answer["response"]["uid"], "abc-123", "the uid is echoed");
    assert_eq!(answer["response"]["allowed"], true);
    assert!(
        answer["response"]["patch"].is_null(),
        "kube-system is skipped"
    );

    // Rotation: a new pair in place of the old (here: a fresh key and a
    // certificate for it from the same CA); the next handshake gets it.
    let serial_before = served_serial(injector.port).await?;
    let pki = pki_dir();
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; cd {dir}; \
             openssl req -newkey rsa:2048 -nodes -keyout new.key -subj /CN=rotated -out new.csr 2>/dev/null; \
             printf 'subjectAltName=IP:127.0.0.1\\n' > ext; \
             openssl x509 -req -in new.csr -CA {ca} -CAkey {ca_key} -CAserial serial -CAcreateserial -days 1 -extfile ext -out new.crt 2>/dev/null; \
             mv new.key tls.key; mv new.crt tls.crt",
            dir = dir.path().display(),
            ca = pki.join("ca.crt").display(),
            ca_key = pki.join("ca.key").display(),
        ))
        .status()
        .await?;
    assert!(status.success());
    env::eventually(
        "the rotated certificate served",
        Duration::from_secs(10),
        || async { Ok((served_serial(injector.port).await? != serial_before).then_some(())) },
    )
    .await?;
    let (code, _) = curl(injector.port, "application/json", review).await?;
    assert_eq!(code, 200, "still answering, verified against the CA");

    let (code, _) = injector.service.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    kubectl(
        &["delete", "mutatingwebhookconfiguration", &injector.webhook],
        None,
    )
    .await?;
    Ok(())
}

/// The serial number of the certificate the webhook presents now.
async fn served_serial(port: u16) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername 127.0.0.1 </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test]
async fn an_onboarded_tenants_sidecar_runs_on_postgres_and_redis_as_the_tenants_own_logins()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let admin = client().await?;
    install_crds(&admin).await?;
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    let test_id = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let tenant = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let cp_port = env::free_port();
    let kubeconfig = env::kube::kubeconfig_path().display().to_string();
    let cp = process::mesh_control_plane(cp_port, &kubeconfig, &[]).await?;
    let secret_name = "statefabric-sidecar-credentials";
    let injector = start_injector(
        &test_id,
        cp_port,
        &pki_dir().join("mesh.crt"),
        &pki_dir().join("mesh.key"),
        &[(
            "STATEFABRIC_SIDECAR_TEMPLATE__CREDENTIALS_SECRET",
            secret_name.to_owned(),
        )],
    )
    .await?;
    let namespace = namespace(&test_id, Some(&tenant)).await?;
    let ns = namespace.name.as_str();
    let secret = process::onboard_tenant(&tenant, ns).await?;
    let postgres_url = secret["stringData"]["postgres-url"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let login = url::Url::parse(&postgres_url)?.username().to_owned();
    assert!(
        login.starts_with("sft_"),
        "the tenant's own login (migration 0024), not the shared one: {login}"
    );

    // The pod: only the sidecar container is given the Secret.
    let created = apply(
        &pod_manifest(ns, "coder-0", "statefabric.io/inject: \"true\"", ""),
        &[],
    )
    .await?
    .map_err(|e| anyhow::anyhow!(e))?;
    let sidecar = &created["spec"]["initContainers"][0];
    assert!(sidecar.to_string().contains(secret_name), "{sidecar}");
    assert!(
        !created["spec"]["containers"]
            .to_string()
            .contains(secret_name),
        "{created}"
    );
    // An agent that names the Secret itself is refused.
    let greedy = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: greedy-0, namespace: {ns}, annotations: {{statefabric.io/inject: "true"}}}}
spec:
  containers:
  - name: agent
    image: "agent:test"
    env: [{{name: DB, valueFrom: {{secretKeyRef: {{name: {secret_name}, key: postgres-url}}}}}}]
"#
    );
    let refused = apply(&greedy, &[]).await?.expect_err("denied");
    assert!(
        refused.contains("container agent") && refused.contains(secret_name),
        "{refused}"
    );

    // The sidecar as the API server stored it, on Postgres and Redis.
    let pods: kube::Api<Pod> = kube::Api::namespaced(admin.clone(), ns);
    let stored = pods.get("coder-0").await?;
    let mut running = env::pod_runner::run(&admin, &stored, "statefabric-sidecar").await?;
    running.ready().await?;
    let stream =
        process::append_and_lock(&format!("http://127.0.0.1:{}", injector.grpc_port)).await?;
    // In the shared Postgres, under the tenant, written by its own login.
    let pool = sqlx::PgPool::connect(&env::pg_admin_url()).await?;
    let (owner,): (String,) = sqlx::query_as("SELECT tenant_id FROM streams WHERE stream_id = $1")
        .bind(&stream)
        .fetch_one(&pool)
        .await?;
    assert_eq!(owner, tenant);
    let (sessions,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
            .bind(&login)
            .fetch_one(&pool)
            .await?;
    assert!(sessions > 0, "the sidecar connects as {login}");
    // In Redis, the lock under the tenant's keys, held by its own user.
    let mut redis = redis::Client::open(env::redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{sf:lock:{tenant}:repo}}*"))
        .query_async(&mut redis)
        .await?;
    assert!(!keys.is_empty(), "the lock's keys");
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis)
        .await?;
    assert!(
        clients.contains(&format!("user=sf-tenant-{tenant}")),
        "{clients}"
    );
    let (code, stderr) = running.stop().await?;
    assert_eq!(code, 0, "{stderr}");

    redis::cmd("ACL")
        .arg("DELUSER")
        .arg(format!("sf-tenant-{tenant}"))
        .query_async::<()>(&mut redis)
        .await?;
    kubectl(
        &["delete", "mutatingwebhookconfiguration", &injector.webhook],
        None,
    )
    .await?;
    drop(injector);
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    namespace.delete().await
}
