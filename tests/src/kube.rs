//! The test Kubernetes API server (`testenv/kubernetes.sh`): a client as
//! the admin or as another identity (impersonation), `kubectl` of the
//! server's version, the mesh CRDs installed from `k8s/charts/statefabric/crds/`, and a
//! namespace per test.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{START_HINT, overridable, setting};

fn env_dir() -> PathBuf {
    std::env::var_os("STATEFABRIC_ENV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/statefabric-env"))
}

/// The admin kubeconfig `testenv/up.sh` writes.
pub fn kubeconfig_path() -> PathBuf {
    PathBuf::from(overridable("STATEFABRIC_TEST_KUBECONFIG", || {
        env_dir()
            .join("kube/admin.kubeconfig")
            .display()
            .to_string()
    }))
}

/// The test cluster's certificates (`ca.crt`, and `mesh.crt`/`mesh.key`
/// for a control plane's configuration service on 127.0.0.1).
pub fn pki_dir() -> PathBuf {
    kubeconfig_path()
        .parent()
        .map(|kube| kube.join("pki"))
        .unwrap_or_default()
}

/// `kubectl` built with the API server, of its version.
pub fn kubectl_path() -> PathBuf {
    PathBuf::from(overridable("STATEFABRIC_TEST_KUBECTL", || {
        let tools = std::env::var("STATEFABRIC_TOOLS_DIR").unwrap_or_else(|_| {
            format!(
                "{}/.cache/statefabric/tools",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        format!("{tools}/kubernetes-v{}/kubectl", setting("KUBE_VERSION"))
    }))
}

/// The Kubernetes version the test environment runs (`1.36.3`).
pub fn kube_version() -> String {
    setting("KUBE_VERSION")
}

async fn config() -> anyhow::Result<Config> {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .with_context(|| format!("reading {} ({START_HINT})", path.display()))?;
    Ok(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
}

/// A client as the cluster admin.
pub async fn client() -> anyhow::Result<Client> {
    Ok(Client::try_from(config().await?)?)
}

/// A client acting as `user` in `groups` (the admin impersonating them), so
/// RBAC judges that identity.
pub async fn client_as(user: &str, groups: &[&str]) -> anyhow::Result<Client> {
    let mut config = config().await?;
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| (*g).to_owned()).collect());
    Ok(Client::try_from(config)?)
}

/// Runs `kubectl` against the test API server; returns its stdout, or its
/// stderr as the error.
pub async fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} ({START_HINT})", kubectl_path().display()))?;
    if let Some(mut pipe) = child.stdin.take() {
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).await?;
        }
        drop(pipe);
    }
    let output = child.wait_with_output().await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(stdout)
}

/// The committed CRD files (`k8s/charts/statefabric/crds/`).
pub fn crd_files() -> anyhow::Result<Vec<PathBuf>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../k8s/charts/statefabric/crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Applies the mesh CRDs (server-side, so concurrent tests and earlier runs
/// converge on the same objects) and waits until each is Established.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("statefabric-tests").force();
    let mut names = Vec::new();
    for path in crd_files()? {
        let text = std::fs::read_to_string(&path)?;
        let crd: CustomResourceDefinition =
            yaml_serde::from_str(&text).with_context(|| path.display().to_string())?;
        let name = crd.metadata.name.clone().context("a CRD without a name")?;
        crds.patch(&name, &params, &Patch::Apply(&crd)).await?;
        names.push(name);
    }
    for name in names {
        crate::eventually(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move { Ok(established(&crds.get(&name).await?).then_some(())) }
            },
        )
        .await?;
    }
    Ok(())
}

/// Whether a CRD's `Established` condition is true.
pub fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// A namespace of its own for one test (`t-<hex>`, which
/// `testenv/prune-kubernetes.sh` deletes if the test does not).
#[derive(Clone)]
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish()
    }
}

impl TestNamespace {
    pub async fn create(client: &Client) -> anyhow::Result<Self> {
        let name = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(Self {
            name,
            client: client.clone(),
        })
    }

    /// Deletes it (its objects go with it, by the namespace controller).
    pub async fn delete(self) -> anyhow::Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client);
        namespaces
            .delete(&self.name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

/// Applies the control plane's ServiceAccount and RBAC, as the chart
/// renders them (`templates/control-plane-rbac.yaml`).
pub async fn install_control_plane_rbac() -> anyhow::Result<()> {
    crate::chart::apply_template("templates/control-plane-rbac.yaml").await
}

/// Lets the control plane read the Secrets Upstreams name in `namespace`,
/// as the chart grants it in a tenant's namespace
/// (`templates/egress-secrets-rbac.yaml`).
pub async fn grant_egress_secrets(namespace: &str) -> anyhow::Result<()> {
    crate::chart::ensure_namespace().await?;
    let tenant = format!("tenants[0].name=t,tenants[0].namespace={namespace}");
    let manifest = crate::chart::render(&[
        "--set",
        &tenant,
        "--show-only",
        "templates/egress-secrets-rbac.yaml",
    ])
    .await?;
    kubectl(&["apply", "-f", "-"], Some(&manifest)).await?;
    Ok(())
}

/// Applies the injector's ServiceAccount and grants, as the chart renders
/// them (`templates/injector-rbac.yaml`).
pub async fn install_injector_rbac() -> anyhow::Result<()> {
    crate::chart::apply_template("templates/injector-rbac.yaml").await
}

/// A kubeconfig in `dir` that authenticates as a ServiceAccount with a
/// fresh token, so a process runs with exactly that account's RBAC.
pub async fn kubeconfig_as_service_account(
    dir: &std::path::Path,
    namespace: &str,
    account: &str,
) -> anyhow::Result<PathBuf> {
    let token = kubectl(
        &[
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--duration",
            "1h",
        ],
        None,
    )
    .await?;
    let path = dir.join(format!("{namespace}-{account}.kubeconfig"));
    write_kubeconfig(
        &path,
        &pki_dir().join("ca.crt"),
        &format!("token: {}", token.trim()),
    )?;
    Ok(path)
}

/// Writes a kubeconfig for the test API server, trusting `ca`, with
/// `credential` as the user's one line (`token: …` or `tokenFile: …`).
pub(crate) fn write_kubeconfig(
    path: &std::path::Path,
    ca: &std::path::Path,
    credential: &str,
) -> anyhow::Result<()> {
    let server = format!("https://127.0.0.1:{}", setting("KUBE_API_PORT"));
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
             certificate-authority: {}\nusers:\n- name: user\n  user:\n    {credential}\ncontexts:\n\
             - name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n",
            ca.display(),
        ),
    )?;
    Ok(())
}

/// A Deployment of `replicas` agent pods of `agent_type` in `namespace`,
/// annotated for injection.
pub fn agent_deployment(namespace: &str, name: &str, agent_type: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {{statefabric.io/inject: "true", statefabric.io/agent-type: {agent_type}}}
    spec:
      containers: [{{name: agent, image: "agent:test"}}]
"#
    )
}
