//! Mesh configuration from the Kubernetes API to running sidecars, with the
//! real API server, a real control plane and real sidecar processes:
//! - a FabricConfig applied with kubectl changes what a running sidecar
//!   does within seconds, and the resource's status counts it as applied;
//! - a configuration the sidecar refuses shows as a NACK in the status,
//!   and the sidecar keeps its last good configuration;
//! - with the control plane killed, the sidecar keeps serving with its
//!   configuration, a sidecar restarted meanwhile starts from its local
//!   copy, and changes made meanwhile arrive when the control plane returns;
//! - a token of another namespace, another pod, or none gets nothing;
//! - a ResiliencyPolicy applied with kubectl changes a running sidecar's
//!   deadline and circuit breaker on Redis (a real Redis behind a relay
//!   that can stall), and what the sidecar does not apply is named in the
//!   policy's status;
//! - with two control-plane replicas, the leader's status counts the
//!   sidecars subscribed to either;
//! - a sidecar declared as a pod's native sidecar container runs from that
//!   spec alone (the pod runner): its env from the downward API and a
//!   Secret, its config file from a ConfigMap, a projected token bound to
//!   the pod, and it gets its configuration through them.
//!
//! Each test runs its own control plane, and each leads alone and writes
//! the status of every mesh resource it watches (all namespaces): the tests
//! take turns, as two leaders would otherwise overwrite each other's counts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::Signal;
use serde_json::Value;
use statefabric_proto::control::v1::config_distribution_client::ConfigDistributionClient;
use statefabric_proto::control::v1::subscribe_request::Kind;
use statefabric_proto::control::v1::{Ack, Hello, SubscribeRequest};
use statefabric_sdk::StateClient;
use statefabric_tests as env;
use statefabric_tests::kube::{TestNamespace, client, install_crds, kubectl, pki_dir};
use statefabric_tests::process::{self, Service, Storage};

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A namespace with a ServiceAccount and a (Pending) pod that runs as it.
async fn agent_pod(namespace: &str, pod: &str) -> anyhow::Result<()> {
    let manifest = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: agent, namespace: {namespace}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {namespace}
  labels: {{app: agents}}
  annotations: {{statefabric.io/agent-type: coder}}
spec:
  serviceAccountName: agent
  containers: [{{name: agent, image: agent:test}}]
"#
    );
    // The ServiceAccount admission plugin needs the account to exist first.
    env::eventually("the pod admitted", Duration::from_secs(30), || {
        let manifest = manifest.clone();
        async move { Ok(kubectl(&["apply", "-f", "-"], Some(&manifest)).await.ok()) }
    })
    .await?;
    Ok(())
}

/// A projected-style token for the pod (audience `statefabric`, bound to
/// it), written to a file as the kubelet would.
async fn token_file(dir: &Path, namespace: &str, pod: &str) -> anyhow::Result<PathBuf> {
    let token = kubectl(
        &[
            "create",
            "token",
            "agent",
            "-n",
            namespace,
            "--audience",
            "statefabric",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod,
            "--duration",
            "1h",
        ],
        None,
    )
    .await?;
    let path = dir.join(format!("{namespace}-{pod}.token"));
    std::fs::write(&path, token.trim())?;
    Ok(path)
}

/// A kubeconfig as the control plane's own ServiceAccount: the processes
/// under test run with exactly the RBAC of the chart's `templates/control-plane-rbac.yaml`.
async fn control_plane_kubeconfig(dir: &Path) -> anyhow::Result<String> {
    env::kube::install_control_plane_rbac().await?;
    let path = env::kube::kubeconfig_as_service_account(
        dir,
        "statefabric-system",
        "statefabric-control-plane",
    )
    .await?;
    Ok(path.display().to_string())
}

async fn control_plane(port: u16, kubeconfig: &str) -> anyhow::Result<Service> {
    process::mesh_control_plane(port, kubeconfig, &[]).await
}

async fn sidecar(
    port: u16,
    namespace: &str,
    pod: &str,
    token: &Path,
    state: &Path,
) -> anyhow::Result<Service> {
    sidecar_with(port, namespace, pod, token, state, &[]).await
}

async fn sidecar_with(
    port: u16,
    namespace: &str,
    pod: &str,
    token: &Path,
    state: &Path,
    extra: &[(&str, &str)],
) -> anyhow::Result<Service> {
    let control = format!("https://127.0.0.1:{port}");
    let ca = pki_dir().join("ca.crt").display().to_string();
    let (token, state) = (token.display().to_string(), state.display().to_string());
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let mut vars = vec![
        ("STATEFABRIC_MESH__ENABLED", "true"),
        ("STATEFABRIC_MESH__CONTROL_PLANE", control.as_str()),
        ("STATEFABRIC_MESH__CA_FILE", ca.as_str()),
        ("STATEFABRIC_MESH__TOKEN_FILE", token.as_str()),
        ("STATEFABRIC_MESH__NAMESPACE", namespace),
        ("STATEFABRIC_MESH__POD", pod),
        ("STATEFABRIC_MESH__STATE_FILE", state.as_str()),
        ("STATEFABRIC_MESH__RECONNECT_MAX", "500ms"),
    ];
    vars.extend_from_slice(extra);
    process::sidecar(Storage::Sqlite, &tenant, pod, &vars).await
}

fn fabric_config(namespace: &str, sessions: &str) -> String {
    format!(
        "apiVersion: statefabric.io/v1alpha1\nkind: FabricConfig\nmetadata: {{name: agents, namespace: {namespace}}}\n\
         spec: {{default: true, sessions: {sessions}}}\n"
    )
}

/// The session TTL a write in `namespace` gets, or the refusal.
async fn session_ttl(
    sidecar: &Service,
    namespace: &str,
) -> anyhow::Result<Result<Duration, String>> {
    let mut sessions = StateClient::connect(sidecar.grpc.clone()).await?.sessions();
    Ok(sessions
        // A new session each time: an absolute expiry counts from creation.
        .put(
            namespace,
            &uuid::Uuid::new_v4().to_string(),
            b"v".to_vec(),
            None,
        )
        .await
        .map_err(|e| e.to_string()))
}

/// Waits until writes in `namespace` get about `ttl`.
async fn ttl_becomes(sidecar: &Service, namespace: &str, ttl: Duration) -> anyhow::Result<()> {
    env::eventually(
        &format!("{namespace} sessions live {ttl:?}"),
        Duration::from_secs(15),
        || async {
            Ok(match session_ttl(sidecar, namespace).await? {
                Ok(left) if left <= ttl && left + Duration::from_secs(5) >= ttl => Some(()),
                _ => None,
            })
        },
    )
    .await
}

/// The FabricConfig's status, once it satisfies `check`.
async fn status_where(
    namespace: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    resource_status_where("fabricconfig", "agents", namespace, what, check).await
}

/// A mesh resource's status, once it satisfies `check`.
async fn resource_status_where(
    kind: &str,
    name: &str,
    namespace: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    env::eventually(what, Duration::from_secs(15), || async {
        let printed = kubectl(&["get", kind, name, "-n", namespace, "-o", "json"], None).await?;
        let resource: Value = serde_json::from_str(&printed)?;
        Ok(check(&resource["status"]).then(|| resource["status"].clone()))
    })
    .await
}

/// A test namespace with the pod `agent-0`, its token and local-copy
/// path, and the control plane's kubeconfig.
struct Setup {
    namespace: TestNamespace,
    dir: tempfile::TempDir,
    token: PathBuf,
    state: PathBuf,
    kubeconfig: String,
}

impl Setup {
    async fn new() -> anyhow::Result<Self> {
        let admin = client().await?;
        install_crds(&admin).await?;
        let namespace = TestNamespace::create(&admin).await?;
        agent_pod(&namespace.name, "agent-0").await?;
        let dir = tempfile::tempdir()?;
        let token = token_file(dir.path(), &namespace.name, "agent-0").await?;
        let state = dir.path().join("mesh.json");
        let kubeconfig = control_plane_kubeconfig(dir.path()).await?;
        Ok(Self {
            namespace,
            dir,
            token,
            state,
            kubeconfig,
        })
    }
}

#[tokio::test]
async fn configuration_reaches_running_sidecars_and_survives_a_control_plane_outage()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let Setup {
        namespace,
        dir: _dir, // kept: it holds the token and the local copy
        token,
        state,
        kubeconfig,
    } = Setup::new().await?;
    let ns = namespace.name.as_str();
    let port = env::free_port();
    let cp = control_plane(port, &kubeconfig).await?;
    let mut agent = sidecar(port, ns, "agent-0", &token, &state).await?;

    // Not configured yet: the namespace is refused, naming it.
    let refused = session_ttl(&agent, "chat")
        .await?
        .expect_err("no chat namespace yet");
    assert!(refused.contains("chat"), "{refused}");

    // kubectl apply → the running sidecar serves the namespace.
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(ns, "{chat: {ttl: 30m}}")),
    )
    .await?;
    ttl_becomes(&agent, "chat", Duration::from_secs(1800)).await?;
    let status = status_where(ns, "the FabricConfig counted as applied", |s| {
        s["sidecars"]["applied"] == 1
    })
    .await?;
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");

    // A change takes effect without a restart.
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(ns, "{chat: {ttl: 5m}}")),
    )
    .await?;
    ttl_becomes(&agent, "chat", Duration::from_secs(300)).await?;

    // One the sidecar refuses: a NACK in the status, the old policy kept.
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(ns, "{chat: {ttl: 0s}}")),
    )
    .await?;
    let status = status_where(ns, "the NACK in the status", |s| {
        s["sidecars"]["refused"] == 1
    })
    .await?;
    let reason = status["sidecars"]["nacks"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("spec.sessions.chat.ttl must be positive"),
        "{status}"
    );
    assert_eq!(status["sidecars"]["nacks"][0]["pod"], "agent-0");
    ttl_becomes(&agent, "chat", Duration::from_secs(300)).await?;
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(ns, "{chat: {ttl: 5m}}")),
    )
    .await?;
    status_where(ns, "the NACK cleared", |s| {
        s["sidecars"]["refused"] == 0 && s["sidecars"]["applied"] == 1
    })
    .await?;

    // What the API server cannot refuse (a reference to a missing policy)
    // is reported Ready=False naming the field, and reaches no sidecar.
    let broken = format!(
        "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: broken, namespace: {ns}}}\n\
         spec: {{url: 'https://example.com', policy: missing}}\n"
    );
    kubectl(&["apply", "-f", "-"], Some(&broken)).await?;
    let condition = env::eventually(
        "the Upstream's Ready=False",
        Duration::from_secs(15),
        || async {
            let printed =
                kubectl(&["get", "upstream", "broken", "-n", ns, "-o", "json"], None).await?;
            let resource: Value = serde_json::from_str(&printed)?;
            let ready = resource["status"]["conditions"][0].clone();
            Ok((ready["status"] == "False").then_some(ready))
        },
    )
    .await?;
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("spec.policy: ResiliencyPolicy \"missing\""),
        "{condition}"
    );

    // The control plane dies: the sidecar keeps serving its configuration.
    let (_, _) = cp.stop_with(Signal::SIGKILL).await?;
    ttl_becomes(&agent, "chat", Duration::from_secs(300)).await?;
    // A sidecar restarted meanwhile starts from its local copy.
    let (code, _) = agent.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    agent = sidecar(port, ns, "agent-0", &token, &state).await?;
    ttl_becomes(&agent, "chat", Duration::from_secs(300)).await?;
    // A change made while the control plane is down arrives once it is back.
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(ns, "{chat: {ttl: 5m}, notes: {ttl: 1h}}")),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        session_ttl(&agent, "notes").await?.is_err(),
        "no control plane, no change"
    );
    let cp = control_plane(port, &kubeconfig).await?;
    ttl_becomes(&agent, "notes", Duration::from_secs(3600)).await?;

    let (code, _) = agent.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    namespace.delete().await
}

#[tokio::test]
async fn only_the_pods_own_token_gets_its_configuration() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let admin = client().await?;
    install_crds(&admin).await?;
    let ours = TestNamespace::create(&admin).await?;
    let theirs = TestNamespace::create(&admin).await?;
    agent_pod(&ours.name, "agent-0").await?;
    agent_pod(&ours.name, "agent-1").await?;
    agent_pod(&theirs.name, "agent-0").await?;
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(&ours.name, "{chat: {ttl: 30m}}")),
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let port = env::free_port();
    let kubeconfig = control_plane_kubeconfig(dir.path()).await?;
    let cp = control_plane(port, &kubeconfig).await?;
    let ca = std::fs::read(pki_dir().join("ca.crt"))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )?
        .connect()
        .await?;
    let subscribe = |hello: Option<Hello>| {
        let mut client = ConfigDistributionClient::new(channel.clone());
        async move {
            let first = match hello {
                Some(hello) => SubscribeRequest {
                    kind: Some(Kind::Hello(hello)),
                },
                None => SubscribeRequest {
                    kind: Some(Kind::Ack(Ack {
                        version: "x".into(),
                        not_applied: Vec::new(),
                    })),
                },
            };
            let requests = futures::stream::iter([first]).chain(futures::stream::pending());
            let answer = async move {
                client
                    .subscribe(requests)
                    .await?
                    .into_inner()
                    .message()
                    .await
            };
            tokio::time::timeout(Duration::from_secs(20), answer)
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in 20 s")))
        }
    };
    let hello = |namespace: &str, pod: &str, token: String| Hello {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        token,
        ..Hello::default()
    };
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();

    // Its own token: its namespace's configuration.
    let own = read(token_file(dir.path(), &ours.name, "agent-0").await?);
    let snapshot = subscribe(Some(hello(&ours.name, "agent-0", own.clone())))
        .await?
        .expect("a snapshot");
    let config: Value = serde_json::from_str(&snapshot.config_json)?;
    assert_eq!(config["namespace"], ours.name.as_str());
    assert_eq!(config["fabricConfig"]["name"], "agents");

    // Another namespace's token, presented for ours.
    let foreign = read(token_file(dir.path(), &theirs.name, "agent-0").await?);
    let refused = subscribe(Some(hello(&ours.name, "agent-0", foreign)))
        .await
        .expect_err("foreign");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&theirs.name), "{refused:?}");
    // Another pod's token of the same namespace.
    let sibling = read(token_file(dir.path(), &ours.name, "agent-1").await?);
    let refused = subscribe(Some(hello(&ours.name, "agent-0", sibling)))
        .await
        .expect_err("sibling");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // No token, a forged one, no Hello.
    let refused = subscribe(Some(hello(&ours.name, "agent-0", String::new())))
        .await
        .expect_err("none");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = subscribe(Some(hello(&ours.name, "agent-0", format!("{own}x"))))
        .await
        .expect_err("forged");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = subscribe(None).await.expect_err("no hello");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    theirs.delete().await?;
    ours.delete().await
}

async fn saga_control_plane(port: u16, kubeconfig: &str) -> anyhow::Result<Service> {
    let (control, admin) = (env::pg_control_url(), env::pg_admin_url());
    let lease = format!("cp-{}", uuid::Uuid::new_v4().simple());
    let listen = format!("127.0.0.1:{port}");
    let mut service = process::spawn(
        "statefabric-control-plane",
        &[],
        &[
            ("KUBECONFIG", kubeconfig),
            ("STATEFABRIC_LEADER__BACKEND", "postgres"),
            ("STATEFABRIC_LEADER__POSTGRES_URL", control.as_str()),
            ("STATEFABRIC_LEADER__POSTGRES_MIGRATE_URL", admin.as_str()),
            ("STATEFABRIC_LEADER__NAME", lease.as_str()),
            ("STATEFABRIC_API__ALLOW_ANONYMOUS", "true"),
            ("STATEFABRIC_MESH__ENABLED", "true"),
            ("STATEFABRIC_MESH__LISTEN", listen.as_str()),
            ("STATEFABRIC_MESH__STATUS_INTERVAL", "200ms"),
        ],
    )?;
    service.ready().await?;
    Ok(service)
}

fn saga_definition(
    namespace: &str,
    name: &str,
    code_timeout: &str,
    review_goes_to: &str,
) -> String {
    format!(
        r#"apiVersion: statefabric.io/v1alpha1
kind: SagaDefinition
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  start: plan
  steps:
    plan: {{agent: planner, action: plan, timeout: 30s, compensation: none, on_success: code}}
    code: {{agent: coder, action: write, timeout: {code_timeout}, compensation: {{action: revert}}, on_success: review}}
    review: {{agent: critic, action: review, timeout: 30s, compensation: none, on_success: {review_goes_to}}}
"#
    )
}

/// The SagaDefinition's status, once `check` holds.
async fn saga_status(
    namespace: &str,
    name: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    env::eventually(
        &format!("SagaDefinition {name} status"),
        Duration::from_secs(20),
        || async {
            let printed = kubectl(
                &["get", "sagadefinition", name, "-n", namespace, "-o", "json"],
                None,
            )
            .await?;
            let resource: Value = serde_json::from_str(&printed)?;
            Ok(check(&resource["status"]).then(|| resource["status"].clone()))
        },
    )
    .await
}

/// The definition version a saga runs on, from the operator API, once the
/// engine has taken the start the sidecar queued.
async fn saga_version(cp: &Service, saga: &str) -> anyhow::Result<Value> {
    let url = format!("{}/v1/sagas/{saga}", cp.api);
    let body = env::eventually(
        &format!("saga {saga} started"),
        Duration::from_secs(10),
        || async {
            let response = env::http("GET", &url, None, None).await?;
            if response.status == 404 {
                return Ok(None);
            }
            anyhow::ensure!(
                response.status == 200,
                "GET saga: {} {}",
                response.status,
                response.body
            );
            Ok(Some(serde_json::from_str::<Value>(&response.body)?))
        },
    )
    .await?;
    Ok(body["saga"]["instance"]["version"].clone())
}

#[tokio::test]
async fn a_saga_definition_applied_with_kubectl_is_registered_and_started_through_a_sidecar()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let admin = client().await?;
    install_crds(&admin).await?;
    let namespace = TestNamespace::create(&admin).await?;
    let ns = namespace.name.as_str();
    // Definition names are shared by the whole engine (and database).
    let name = format!(
        "feature-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = control_plane_kubeconfig(dir.path()).await?;
    let cp = saga_control_plane(env::free_port(), &kubeconfig).await?;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let agent = process::sidecar(Storage::Postgres, &tenant, "planner-0", &[]).await?;
    let mut tasks = StateClient::connect(agent.grpc.clone()).await?.tasks();

    kubectl(
        &["apply", "-f", "-"],
        Some(&saga_definition(ns, &name, "60s", "DONE")),
    )
    .await?;
    let status = saga_status(ns, &name, |s| s["registeredVersion"] == 1).await?;
    assert_eq!(status["conditions"][0]["status"], "True", "{status}");
    let first = env::eventually("the saga started", Duration::from_secs(10), || async {
        Ok(tasks
            .clone()
            .start_saga(&name, None, &serde_json::json!({"goal": "x"}))
            .await
            .ok())
    })
    .await?;
    assert_eq!(saga_version(&cp, &first).await?, 1);

    // An edit registers a new version; the running saga keeps its own.
    kubectl(
        &["apply", "-f", "-"],
        Some(&saga_definition(ns, &name, "90s", "DONE")),
    )
    .await?;
    saga_status(ns, &name, |s| s["registeredVersion"] == 2).await?;
    let second = tasks
        .start_saga(&name, None, &serde_json::json!({"goal": "y"}))
        .await?;
    assert_eq!(saga_version(&cp, &second).await?, 2);
    assert_eq!(saga_version(&cp, &first).await?, 1);

    // One the validator refuses: Ready=False naming the step; version 2 stays.
    kubectl(
        &["apply", "-f", "-"],
        Some(&saga_definition(ns, &name, "90s", "nowhere")),
    )
    .await?;
    let status = saga_status(ns, &name, |s| s["conditions"][0]["status"] == "False").await?;
    let message = status["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("spec.steps.review:") && message.contains("nowhere"),
        "{status}"
    );
    assert_eq!(status["registeredVersion"], 2);

    let (code, _) = agent.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    namespace.delete().await
}

/// What a session write through the sidecar answers.
async fn session_write(sidecar: &Service) -> anyhow::Result<Result<(), String>> {
    let mut sessions = StateClient::connect(sidecar.grpc.clone()).await?.sessions();
    Ok(sessions
        .put("conversation", "c1", b"v".to_vec(), None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string()))
}

#[tokio::test]
async fn a_resiliency_policy_applied_with_kubectl_changes_a_running_sidecars_deadline_and_breaker()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let Setup {
        namespace,
        dir: _dir, // kept: it holds the token and the local copy
        token,
        state,
        kubeconfig,
    } = Setup::new().await?;
    let ns = namespace.name.as_str();
    let port = env::free_port();
    let cp = control_plane(port, &kubeconfig).await?;
    // Sessions on the real Redis, reached through a relay that can stall.
    let redis = env::redis_url();
    let stall = env::stall::Stall::start(redis.trim_start_matches("redis://")).await?;
    let through = format!("redis://{}", stall.addr());
    let agent = sidecar_with(
        port,
        ns,
        "agent-0",
        &token,
        &state,
        &[
            ("STATEFABRIC_REDIS__MODE", "standalone"),
            ("STATEFABRIC_REDIS__URLS", through.as_str()),
            ("STATEFABRIC_SESSIONS__BACKEND", "redis"),
            ("STATEFABRIC_REDIS__COMMAND_TIMEOUT", "3s"),
            ("STATEFABRIC_REDIS__BREAKER_FAILURES", "100"),
            ("STATEFABRIC_REDIS__BREAKER_OPEN_FOR", "1s"),
        ],
    )
    .await?;
    session_write(&agent)
        .await?
        .map_err(|e| anyhow::anyhow!("healthy Redis: {e}"))?;

    // Its own settings: a stalled Redis costs a write the full 3 s.
    stall.set_stalled(true);
    let slow = session_write(&agent).await?.expect_err("stalled");
    assert!(slow.contains("no answer in 3s"), "{slow}");
    stall.set_stalled(false);
    session_write(&agent)
        .await?
        .map_err(|e| anyhow::anyhow!("Redis back: {e}"))?;

    // kubectl apply: a 200 ms deadline, and two failures open the circuit
    // for a minute. The retry is named as not applied (Redis writes are
    // not safe to repeat).
    let policy = format!(
        r#"apiVersion: statefabric.io/v1alpha1
kind: ResiliencyPolicy
metadata: {{name: deps, namespace: {ns}}}
spec:
  timeouts: {{fast: {{perTry: 200ms}}}}
  retries: {{calm: {{maxAttempts: 3, initialBackoff: 100ms, maxBackoff: 1s}}}}
  circuitBreakers: {{strict: {{consecutiveFailures: 2, openFor: 1m}}}}
  targets: [{{dependency: redis, timeout: fast, circuitBreaker: strict, retry: calm}}]
"#
    );
    kubectl(&["apply", "-f", "-"], Some(&policy)).await?;
    let status = resource_status_where(
        "resiliencypolicy",
        "deps",
        ns,
        "the policy applied, its retry named as not applied",
        |s| s["sidecars"]["applied"] == 1 && s["sidecars"]["notApplied"] == 1,
    )
    .await?;
    let setting = status["sidecars"]["notAppliedSettings"][0]["setting"]
        .as_str()
        .unwrap_or_default();
    assert!(
        setting.starts_with("ResiliencyPolicy deps: spec.targets[0].retry: not applied to Redis"),
        "{status}"
    );
    assert_eq!(
        status["sidecars"]["notAppliedSettings"][0]["pod"],
        "agent-0"
    );

    // The same stall now: cut at 200 ms, twice, then refused at once.
    stall.set_stalled(true);
    for _ in 0..2 {
        let cut = session_write(&agent).await?.expect_err("stalled");
        assert!(cut.contains("no answer in 200ms"), "{cut}");
    }
    let open = session_write(&agent).await?.expect_err("circuit open");
    assert!(open.contains("circuit open"), "{open}");
    // Redis is back, but the circuit stays open for the policy's minute,
    // not the sidecar's own second.
    stall.set_stalled(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = session_write(&agent).await?.expect_err("still open");
    assert!(still.contains("circuit open"), "{still}");

    // The policy deleted: the sidecar's own settings return (open for 1 s
    // from the opening, long past), so the next write probes and succeeds.
    kubectl(&["delete", "resiliencypolicy", "deps", "-n", ns], None).await?;
    env::eventually(
        "writes succeed under the sidecar's own settings",
        Duration::from_secs(15),
        || async { Ok(session_write(&agent).await?.ok()) },
    )
    .await?;

    let (code, _) = agent.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    namespace.delete().await
}

#[tokio::test]
async fn the_status_counts_the_sidecars_of_every_replica() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let admin = client().await?;
    install_crds(&admin).await?;
    let namespace = TestNamespace::create(&admin).await?;
    let ns = namespace.name.as_str();
    agent_pod(ns, "agent-0").await?;
    agent_pod(ns, "agent-1").await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = control_plane_kubeconfig(dir.path()).await?;
    // Two replicas electing on Postgres: one leads and writes the status.
    let lease = format!("mesh-{}", uuid::Uuid::new_v4().simple());
    let (app, migrate) = (env::pg_app_url(), env::pg_admin_url());
    let mut replicas = Vec::new();
    let mut ports = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let port = env::free_port();
        replicas.push(
            process::mesh_control_plane(
                port,
                &kubeconfig,
                &[
                    ("STATEFABRIC_LEADER__BACKEND", "postgres"),
                    ("STATEFABRIC_LEADER__POSTGRES_URL", app.as_str()),
                    ("STATEFABRIC_LEADER__POSTGRES_MIGRATE_URL", migrate.as_str()),
                    ("STATEFABRIC_LEADER__NAME", lease.as_str()),
                    ("STATEFABRIC_LEADER__IDENTITY", identity),
                ],
            )
            .await?,
        );
        ports.push(port);
    }
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(ns, "{chat: {ttl: 30m}}")),
    )
    .await?;
    // One sidecar on each replica.
    let mut agents = Vec::new();
    for (pod, port) in ["agent-0", "agent-1"].into_iter().zip(&ports) {
        let token = token_file(dir.path(), ns, pod).await?;
        let state = dir.path().join(format!("{pod}.json"));
        agents.push(sidecar(*port, ns, pod, &token, &state).await?);
    }
    let status = status_where(ns, "both sidecars counted", |s| {
        s["sidecars"]["applied"] == 2
    })
    .await?;
    let versions = status["sidecars"]["versions"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(versions.len(), 1, "one version: {status}");
    assert_eq!(versions.values().next(), Some(&Value::from(2)), "{status}");

    // One sidecar leaves: the count follows, whichever replica it was on.
    let gone = agents.pop().expect("two agents");
    let (code, _) = gone.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    status_where(ns, "one sidecar counted", |s| s["sidecars"]["applied"] == 1).await?;

    for service in agents.into_iter().chain(replicas) {
        let (code, _) = service.stop_with(Signal::SIGTERM).await?;
        assert_eq!(code, 0);
    }
    namespace.delete().await
}

#[tokio::test]
async fn a_sidecar_runs_from_its_pod_spec_and_gets_its_configuration_with_the_pods_token()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let admin = client().await?;
    install_crds(&admin).await?;
    let namespace = TestNamespace::create(&admin).await?;
    let ns = namespace.name.as_str();
    let dir = tempfile::tempdir()?;
    let kubeconfig = control_plane_kubeconfig(dir.path()).await?;
    let cp_port = env::free_port();
    let cp = control_plane(cp_port, &kubeconfig).await?;
    let [grpc, admin_port] = [env::free_port(), env::free_port()];
    let ca = std::fs::read_to_string(pki_dir().join("ca.crt"))?;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let indent = |text: &str| text.replace('\n', "\n    ");
    let sidecar_toml = format!(
        r#"[admin]
listen = "127.0.0.1:{admin_port}"
[sidecar]
listen = "127.0.0.1:{grpc}"
[storage.sqlite]
path = "/var/lib/statefabric/events.db"
[mesh]
enabled = true
control_plane = "https://127.0.0.1:{cp_port}"
ca_file = "/etc/statefabric/ca.crt"
token_file = "/var/run/secrets/statefabric/token"
state_file = "/var/lib/statefabric/mesh.json"
reconnect_max = "500ms"
"#
    );
    let manifest = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: agent, namespace: {ns}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: sidecar-config, namespace: {ns}}}
data:
  sidecar.toml: |
    {toml}
  ca.crt: |
    {ca}
---
apiVersion: v1
kind: Secret
metadata: {{name: sidecar-tenant, namespace: {ns}}}
stringData: {{tenant: {tenant}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: planner-0
  namespace: {ns}
  annotations: {{statefabric.io/agent-type: planner}}
spec:
  serviceAccountName: agent
  initContainers:
  - name: statefabric-sidecar
    image: ghcr.io/statefabric/sidecar:dev
    restartPolicy: Always
    args: ["--config", "/etc/statefabric/sidecar.toml"]
    env:
    - {{name: STATEFABRIC_SIDECAR__IDENTITY, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: STATEFABRIC_SIDECAR__TENANT, valueFrom: {{secretKeyRef: {{name: sidecar-tenant, key: tenant}}}}}}
    - {{name: STATEFABRIC_MESH__NAMESPACE, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
    - {{name: STATEFABRIC_MESH__POD, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: STATEFABRIC_MESH__AGENT_TYPE, valueFrom: {{fieldRef: {{fieldPath: "metadata.annotations['statefabric.io/agent-type']"}}}}}}
    ports:
    - {{name: grpc, containerPort: {grpc}}}
    - {{name: admin, containerPort: {admin_port}}}
    startupProbe: {{grpc: {{port: {grpc}}}, periodSeconds: 1}}
    readinessProbe: {{httpGet: {{path: /healthz/ready, port: admin}}}}
    volumeMounts:
    - {{name: config, mountPath: /etc/statefabric, readOnly: true}}
    - {{name: mesh-token, mountPath: /var/run/secrets/statefabric, readOnly: true}}
    - {{name: state, mountPath: /var/lib/statefabric}}
  containers: [{{name: agent, image: agent:test}}]
  volumes:
  - {{name: config, configMap: {{name: sidecar-config}}}}
  - name: mesh-token
    projected:
      sources: [{{serviceAccountToken: {{audience: statefabric, expirationSeconds: 3600, path: token}}}}]
  - {{name: state, emptyDir: {{}}}}
"#,
        toml = indent(&sidecar_toml),
        ca = indent(ca.trim()),
    );
    env::eventually("the pod admitted", Duration::from_secs(30), || {
        let manifest = manifest.clone();
        async move { Ok(kubectl(&["apply", "-f", "-"], Some(&manifest)).await.ok()) }
    })
    .await?;
    kubectl(
        &["apply", "-f", "-"],
        Some(&fabric_config(ns, "{chat: {ttl: 30m}}")),
    )
    .await?;

    // The pod as the API server admitted it (its uid binds the token).
    let pod: k8s_openapi::api::core::v1::Pod = kube::Api::namespaced(admin.clone(), ns)
        .get("planner-0")
        .await?;
    let mut sidecar = env::pod_runner::run(&admin, &pod, "statefabric-sidecar").await?;
    sidecar.ready().await?;
    process::session_policy_served(
        &format!("http://127.0.0.1:{grpc}"),
        "chat",
        Duration::from_secs(29 * 60),
    )
    .await?;
    let status = status_where(ns, "the pod's sidecar counted", |s| {
        s["sidecars"]["applied"] == 1
    })
    .await?;
    assert!(status["sidecars"]["nacks"].is_null(), "{status}");
    let state = sidecar
        .mounts
        .get("/var/lib/statefabric")
        .map(|dir| dir.join("mesh.json"))
        .expect("the state mount");
    assert!(state.exists(), "the local copy is in the pod's emptyDir");

    let (code, stderr) = sidecar.stop().await?;
    assert_eq!(code, 0, "{stderr}");
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    namespace.delete().await
}

/// The pod `agent-0`'s sidecar with its egress listener on; and where that
/// listens.
async fn egress_sidecar(
    port: u16,
    ns: &str,
    token: &Path,
    state: &Path,
) -> anyhow::Result<(Service, String)> {
    let egress = format!("127.0.0.1:{}", env::free_port());
    let agent = sidecar_with(
        port,
        ns,
        "agent-0",
        token,
        state,
        &[
            ("STATEFABRIC_EGRESS__ENABLED", "true"),
            ("STATEFABRIC_EGRESS__LISTEN", egress.as_str()),
        ],
    )
    .await?;
    Ok((agent, egress))
}

/// An Upstream applied with kubectl becomes a route on a running sidecar's
/// egress path within seconds, and deleting it takes the route away (404
/// naming the upstreams left).
#[tokio::test]
async fn an_upstream_applied_with_kubectl_is_routed_by_a_running_sidecar() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let Setup {
        namespace,
        dir: _dir, // kept: it holds the token and the local copy
        token,
        state,
        kubeconfig,
    } = Setup::new().await?;
    let ns = namespace.name.as_str();
    let port = env::free_port();
    let cp = control_plane(port, &kubeconfig).await?;
    // A real upstream: the control plane's own admin server answers
    // /healthz/live.
    let upstream = cp.admin.clone();
    let (agent, egress) = egress_sidecar(port, ns, &token, &state).await?;
    let through = format!("http://{egress}/admin/healthz/live");
    let before = env::http("GET", &through, None, None).await?;
    assert_eq!(before.status, 404, "no such upstream yet: {}", before.body);
    let manifest = format!(
        "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: admin, namespace: {ns}}}\nspec: {{url: \"{upstream}\"}}\n"
    );
    kubectl(&["apply", "-f", "-"], Some(&manifest)).await?;
    env::eventually("the upstream routed", Duration::from_secs(15), || {
        let through = through.clone();
        async move {
            let answer = env::http("GET", &through, None, None).await?;
            Ok((answer.status == 200).then_some(()))
        }
    })
    .await?;
    kubectl(&["delete", "upstream", "admin", "-n", ns], None).await?;
    env::eventually("the route gone", Duration::from_secs(15), || {
        let through = through.clone();
        async move {
            let answer = env::http("GET", &through, None, None).await?;
            Ok(
                (answer.status == 404 && answer.body.contains("unknown upstream admin"))
                    .then_some(()),
            )
        }
    })
    .await?;
    let (code, stderr) = agent.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    let (code, _) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    namespace.delete().await
}

/// An upstream that answers with the `Authorization` header it got.
async fn echo_key_upstream() -> anyhow::Result<String> {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let key = request
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from(key),
                        )))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    Ok(format!("http://{address}"))
}

fn egress_secret(ns: &str, name: &str, labelled: bool, token: &str) -> String {
    let labels = if labelled {
        "\n  labels: {statefabric.io/egress: \"true\"}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}{labels}\nstringData: {{token: \"Bearer {token}\"}}\n"
    )
}

/// An Upstream whose `Authorization` comes from a labelled Secret: the
/// running sidecar adds it (the agent never sends or sees it), a rotated
/// value is used within the control plane's refresh, and a Secret without
/// the label is never given — the route answers 503 naming it.
#[tokio::test]
async fn an_upstreams_key_from_a_labelled_secret_reaches_the_upstream_and_rotates()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let Setup {
        namespace,
        dir: _dir,
        token,
        state,
        kubeconfig,
    } = Setup::new().await?;
    let ns = namespace.name.as_str();
    env::kube::grant_egress_secrets(ns).await?;
    let upstream = echo_key_upstream().await?;
    kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "{}---\n{}---\napiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: model, namespace: {ns}}}\n\
             spec:\n  url: \"{upstream}\"\n  headers: [{{name: Authorization, secretKeyRef: {{name: model-key, key: token}}}}]\n---\n\
             apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: sneaky, namespace: {ns}}}\n\
             spec:\n  url: \"{upstream}\"\n  headers: [{{name: Authorization, secretKeyRef: {{name: not-for-egress, key: token}}}}]\n",
            egress_secret(ns, "model-key", true, "sk-one"),
            egress_secret(ns, "not-for-egress", false, "db-password"),
        )),
    )
    .await?;
    let port = env::free_port();
    let cp = process::mesh_control_plane(
        port,
        &kubeconfig,
        &[("STATEFABRIC_MESH__SECRET_REFRESH", "1s")],
    )
    .await?;
    let (agent, egress) = egress_sidecar(port, ns, &token, &state).await?;
    let key_seen = |expected: &'static str| {
        let through = format!("http://{egress}/model/v1/chat");
        env::eventually(expected, Duration::from_secs(20), move || {
            let through = through.clone();
            async move {
                let answer = env::http("GET", &through, None, None).await?;
                Ok((answer.status == 200 && answer.body == expected).then_some(()))
            }
        })
    };
    key_seen("Bearer sk-one").await?;

    // Rotation: the new value, without restarting anything.
    kubectl(
        &["apply", "-f", "-"],
        Some(&egress_secret(ns, "model-key", true, "sk-two")),
    )
    .await?;
    key_seen("Bearer sk-two").await?;

    let sneaky = env::http("GET", &format!("http://{egress}/sneaky/x"), None, None).await?;
    assert_eq!(sneaky.status, 503, "{}", sneaky.body);
    assert!(
        sneaky.body.contains("Secret not-for-egress key token")
            && !sneaky.body.contains("db-password"),
        "{}",
        sneaky.body
    );
    // The Upstream's status names what its sidecars could not apply.
    resource_status_where(
        "upstream",
        "sneaky",
        ns,
        "the Upstream's status naming the Secret",
        |status| status.to_string().contains("not-for-egress"),
    )
    .await?;
    // The local copy of the configuration holds the key: owner-only.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&state)?.permissions().mode() & 0o077, 0);

    let (code, stderr) = agent.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("sk-one") && !stderr.contains("sk-two"));
    let (code, stderr) = cp.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    assert!(!stderr.contains("db-password") && !stderr.contains("sk-two"));
    namespace.delete().await
}
