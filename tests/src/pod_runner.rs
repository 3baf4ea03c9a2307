//! The pod runner: the test cluster has no kubelet, so pods stay Pending;
//! where a test must show that a pod spec *runs*, this starts our binary
//! locally as a kubelet would start that container — its command and args,
//! its environment (values, `$(VAR)` references, `fieldRef`, `secretKeyRef`,
//! `configMapKeyRef` (optional ones too), `envFrom`), its mounted files (ConfigMaps, Secrets,
//! `emptyDir`, `downwardAPI`, and projected ServiceAccount tokens requested
//! from the API server bound to the pod, as the kubelet does) and its ports —
//! and decides readiness with the container's own startup or readiness
//! probe (`httpGet`, `grpc`, `tcpSocket`).
//!
//! What differs from a kubelet, and why:
//! - Files cannot be mounted at absolute paths here, so each volume is
//!   written under a temporary directory and every occurrence of a mount
//!   path in the args, the env values and the text of mounted ConfigMap
//!   files is rewritten to its local directory. Nothing else is changed.
//! - There is no pod network namespace: ports are the spec's own on
//!   127.0.0.1 (a port already taken is an error, not a silent move), and
//!   `status.podIP` is `127.0.0.1`.
//! - The process gets the spec's environment only (plus `PATH`), as a
//!   container would; a pod with the standard ServiceAccount mount gets
//!   `KUBERNETES_SERVICE_HOST`/`_PORT` of the test API server, as the
//!   kubelet injects them, and `KUBECONFIG` naming a kubeconfig built from
//!   that same mount, since in-cluster clients read fixed absolute paths.
//! - The image is not pulled: `…/sidecar`, `…/control-plane`,
//!   `…/injector` and `…/fabric` map to our built binaries (a `command`
//!   names one by its file name); any other image is refused.
//!
//! Built here rather than borrowed: the tools that run pods without a
//! cluster (kind, k3s, a real kubelet) need containers and root-level
//! networking this machine class does not offer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, EnvVar, KeyToPath, Pod, Probe, Secret,
    ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use tokio::process::{Child, Command};

/// Where the standard ServiceAccount volume is mounted.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A container of a pod, started locally.
#[derive(Debug)]
pub struct RunningContainer {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    probe: Option<Probe>,
    ports: BTreeMap<String, u16>,
    /// The volumes' local directories, by mount path.
    pub mounts: BTreeMap<String, PathBuf>,
    _root: tempfile::TempDir,
}

/// Starts `container` (an app or init container, native sidecars
/// included) of `pod` as the API server holds it.
pub async fn run(client: &Client, pod: &Pod, container: &str) -> anyhow::Result<RunningContainer> {
    let spec = pod.spec.as_ref().context("the pod has no spec")?;
    let found = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == container)
        .with_context(|| format!("the pod has no container {container}"))?;
    let namespace = pod.namespace().context("the pod has no namespace")?;
    let root = tempfile::tempdir()?;
    let mut mounts = BTreeMap::new();
    for mount in found.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("volumeMounts {}: no such volume", mount.name))?;
        let dir = root.path().join(&volume.name);
        if !dir.exists() {
            materialize(client, pod, &namespace, volume, &dir).await?;
        }
        let local = match &mount.sub_path {
            Some(sub) => dir.join(sub),
            None => dir,
        };
        mounts.insert(mount.mount_path.clone(), local);
    }
    let rewrite = |text: &str| rewrite_paths(text, &mounts);
    // Mounted ConfigMap text refers to other mounts by their paths too.
    for (mount_path, local) in &mounts {
        let from_config_map = found
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| &m.mount_path == mount_path)
            .any(|m| {
                spec.volumes
                    .iter()
                    .flatten()
                    .any(|v| v.name == m.name && v.config_map.is_some())
            });
        if from_config_map && local.is_dir() {
            for entry in std::fs::read_dir(local)? {
                let path = entry?.path();
                if let Ok(text) = std::fs::read_to_string(&path) {
                    std::fs::write(&path, rewrite(&text))?;
                }
            }
        }
    }

    let env = environment(client, pod, &namespace, found).await?;
    let binary = binary_of(found)?;
    let expand = |s: &str| rewrite(&expand_references(s, &env));
    let args: Vec<String> = found
        .command
        .iter()
        .flatten()
        .skip(1)
        .chain(found.args.iter().flatten())
        .map(|a| expand(a))
        .collect();
    let mut ports = BTreeMap::new();
    for port in found.ports.iter().flatten() {
        let number = u16::try_from(port.container_port)?;
        if std::net::TcpListener::bind(("127.0.0.1", number)).is_err() {
            bail!(
                "containerPort {number} of {container} is taken on 127.0.0.1: the pod runner keeps the spec's ports"
            );
        }
        if let Some(name) = &port.name {
            ports.insert(name.clone(), number);
        }
        ports.insert(number.to_string(), number);
    }

    let mut command = Command::new(crate::binary(&binary));
    command
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // Where an instrumented binary writes its coverage (scripts/test.sh).
        .envs(std::env::var_os("LLVM_PROFILE_FILE").map(|path| ("LLVM_PROFILE_FILE", path)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in &env {
        command.env(name, rewrite(value));
    }
    if let Some(local) = mounts.get(SERVICE_ACCOUNT_MOUNT) {
        command
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", crate::setting("KUBE_API_PORT"))
            .env("KUBECONFIG", in_cluster_kubeconfig(root.path(), local)?);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {binary} for container {container}"))?;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    if let Some(mut pipe) = child.stderr.take() {
        let kept = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 8192];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut pipe, &mut buffer).await {
                if n == 0 {
                    break;
                }
                kept.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(&buffer[..n]);
            }
        });
    }
    Ok(RunningContainer {
        child,
        stderr,
        probe: found
            .startup_probe
            .clone()
            .or_else(|| found.readiness_probe.clone()),
        ports,
        mounts,
        _root: root,
    })
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        crate::process::terminate_on_drop(&self.child);
    }
}

impl RunningContainer {
    /// Waits until the container's startup probe (else its readiness probe)
    /// succeeds; fails at once if the process exits.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let probe = self
            .probe
            .clone()
            .context("the container has no startup or readiness probe")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "exited with {status} before its probe succeeded:\n{}",
                    self.stderr()
                );
            }
            if self.probe_once(&probe).await.unwrap_or(false) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("its probe did not succeed within 30 s:\n{}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn port(&self, port: &IntOrString) -> anyhow::Result<u16> {
        let key = match port {
            IntOrString::Int(n) => n.to_string(),
            IntOrString::String(name) => name.clone(),
        };
        match (self.ports.get(&key), port) {
            (Some(n), _) => Ok(*n),
            (None, IntOrString::Int(n)) => Ok(u16::try_from(*n)?),
            (None, IntOrString::String(name)) => bail!("the probe names no port {name}"),
        }
    }

    async fn probe_once(&self, probe: &Probe) -> anyhow::Result<bool> {
        if let Some(get) = &probe.http_get {
            let port = self.port(&get.port)?;
            let path = get.path.clone().unwrap_or_else(|| "/".to_owned());
            let answer =
                crate::http("GET", &format!("http://127.0.0.1:{port}{path}"), None, None).await?;
            return Ok((200..400).contains(&answer.status));
        }
        if let Some(grpc) = &probe.grpc {
            let port = u16::try_from(grpc.port)?;
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
                    .connect()
                    .await?;
            let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: grpc.service.clone().unwrap_or_default(),
                })
                .await?;
            return Ok(answer.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        }
        if let Some(tcp) = &probe.tcp_socket {
            let port = self.port(&tcp.port)?;
            return Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok());
        }
        bail!("the probe has no httpGet, grpc or tcpSocket")
    }

    /// The container's port by name or number.
    pub fn port_of(&self, name: &str) -> Option<u16> {
        self.ports.get(name).copied()
    }

    /// Stops the process as a kubelet does (SIGTERM) and returns its exit
    /// code and what it wrote to stderr.
    pub async fn stop(mut self) -> anyhow::Result<(i32, String)> {
        let pid = self.child.id().context("the process has no pid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid)?),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .context("did not exit within 10 s of SIGTERM")??;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok((status.code().unwrap_or(-1), self.stderr()))
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(
            &self
                .stderr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

/// Which of our binaries a container runs.
fn binary_of(container: &Container) -> anyhow::Result<String> {
    const OURS: [&str; 4] = [
        "statefabric-sidecar",
        "statefabric-control-plane",
        "statefabric-injector",
        "fabric",
    ];
    if let Some(first) = container.command.as_ref().and_then(|c| c.first()) {
        let name = Path::new(first)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        return OURS
            .iter()
            .find(|b| **b == name)
            .map(|b| (*b).to_owned())
            .with_context(|| format!("command {first} is not one of our binaries"));
    }
    let image = container.image.as_deref().unwrap_or_default();
    let repository = image.split(['@', ':']).next().unwrap_or_default();
    let last = repository.rsplit('/').next().unwrap_or_default();
    match last {
        "sidecar" | "control-plane" | "injector" => Ok(format!("statefabric-{last}")),
        "fabric" => Ok("fabric".to_owned()),
        _ => bail!("image {image} is not one of ours"),
    }
}

/// The container's environment in the order Kubernetes builds it: `envFrom`
/// first, then `env`, each `$(VAR)` expanded against what came before.
async fn environment(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    container: &Container,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| {
        env.retain(|(n, _)| n != &name);
        env.push((name, value));
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let data = if let Some(cm) = &source.config_map_ref {
            config_map_data(client, namespace, &cm.name).await?
        } else if let Some(secret) = &source.secret_ref {
            secret_data(client, namespace, &secret.name).await?
        } else {
            BTreeMap::new()
        };
        for (key, value) in data {
            set(&mut env, format!("{prefix}{key}"), value);
        }
    }
    for EnvVar {
        name,
        value,
        value_from,
    } in container.env.iter().flatten()
    {
        let resolved = match (value, value_from) {
            (Some(value), _) => expand_references(value, &env),
            (None, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    field_value(pod, &field.field_path)?
                } else if let Some(key) = &from.config_map_key_ref {
                    let found = config_map_data(client, namespace, &key.name)
                        .await?
                        .remove(&key.key);
                    match found {
                        Some(value) => value,
                        // An optional key that is absent leaves the variable unset.
                        None if key.optional == Some(true) => continue,
                        None => bail!("env {name}: ConfigMap {} has no key {}", key.name, key.key),
                    }
                } else if let Some(key) = &from.secret_key_ref {
                    let found = secret_data(client, namespace, &key.name)
                        .await?
                        .remove(&key.key);
                    match found {
                        Some(value) => value,
                        None if key.optional == Some(true) => continue,
                        None => bail!("env {name}: Secret {} has no key {}", key.name, key.key),
                    }
                } else {
                    bail!("env {name}: resourceFieldRef is not supported by the pod runner")
                }
            }
            (None, None) => String::new(),
        };
        set(&mut env, name.clone(), resolved);
    }
    Ok(env)
}

/// `$(NAME)` replaced by an earlier variable's value; `$$(` stays `$(`;
/// an unknown name is left as written (as Kubernetes does).
fn expand_references(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = escaped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = env.iter().rev().find(|(n, _)| n == &inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Every mount path in `text` (longest first) as its local directory.
fn rewrite_paths(text: &str, mounts: &BTreeMap<String, PathBuf>) -> String {
    let mut by_length: Vec<_> = mounts.iter().collect();
    by_length.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let mut out = text.to_owned();
    for (path, local) in by_length {
        out = out.replace(path.as_str(), &local.display().to_string());
    }
    out
}

/// A downward-API field of the pod.
fn field_value(pod: &Pod, path: &str) -> anyhow::Result<String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(|key| {
                map.as_ref()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    if let Some(value) = keyed("metadata.labels['", &meta.labels) {
        return Ok(value);
    }
    if let Some(value) = keyed("metadata.annotations['", &meta.annotations) {
        return Ok(value);
    }
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "spec.nodeName" => "pod-runner".to_owned(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".to_owned(),
        other => bail!("fieldRef {other} is not supported by the pod runner"),
    })
}

/// Gets a ConfigMap or Secret, waiting (≤ 30 s) while it does not exist
/// yet, as a kubelet keeps a pod's container waiting for its volumes
/// (`kube-root-ca.crt` appears only once the controller-manager has
/// published it to a new namespace).
async fn get_when_present<K>(client: &Client, namespace: &str, name: &str) -> anyhow::Result<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let kind = K::kind(&());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match api.get_opt(name).await {
            Ok(Some(found)) => return Ok(found),
            Ok(None) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(None) => bail!("{kind} {namespace}/{name} does not exist"),
            Err(err) => return Err(err).with_context(|| format!("{kind} {namespace}/{name}")),
        }
    }
}

async fn config_map_data(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let found: ConfigMap = get_when_present(client, namespace, name).await?;
    Ok(found.data.unwrap_or_default())
}

async fn secret_data(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let found: Secret = get_when_present(client, namespace, name).await?;
    let mut data: BTreeMap<String, String> = found.string_data.unwrap_or_default();
    for (key, bytes) in found.data.unwrap_or_default() {
        data.insert(key, String::from_utf8(bytes.0)?);
    }
    Ok(data)
}

/// Writes `items` (or every key) of `data` into `dir`.
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, String>,
    items: Option<&Vec<KeyToPath>>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    match items {
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("no key {}", item.key))?;
                write_file(&dir.join(&item.path), value)?;
            }
        }
        None => {
            for (key, value) in data {
                write_file(&dir.join(key), value)?;
            }
        }
    }
    Ok(())
}

fn write_file(path: &Path, content: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, content)?;
    Ok(())
}

/// A token for the pod's ServiceAccount with this audience, bound to the
/// pod, as the kubelet requests for a projected volume.
async fn pod_token(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> anyhow::Result<String> {
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]),
            expiration_seconds: Some(expiration.unwrap_or(3600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        ..TokenRequest::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("a token for ServiceAccount {namespace}/{account}"))?;
    answer
        .status
        .and_then(|s| s.token)
        .context("the TokenRequest has no token")
}

fn downward_files(pod: &Pod, dir: &Path, items: &[DownwardAPIVolumeFile]) -> anyhow::Result<()> {
    for item in items {
        let field = item
            .field_ref
            .as_ref()
            .with_context(|| format!("downwardAPI {}: only fieldRef is supported", item.path))?;
        write_file(&dir.join(&item.path), &field_value(pod, &field.field_path)?)?;
    }
    Ok(())
}

/// Writes a volume's files into `dir`.
async fn materialize(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    if let Some(source) = &volume.config_map {
        let data = config_map_data(client, namespace, &source.name).await?;
        return write_keys(dir, &data, source.items.as_ref());
    }
    if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        let data = secret_data(client, namespace, &name).await?;
        return write_keys(dir, &data, source.items.as_ref());
    }
    if volume.empty_dir.is_some() {
        return Ok(());
    }
    if let Some(source) = &volume.downward_api {
        return downward_files(pod, dir, source.items.as_deref().unwrap_or_default());
    }
    if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let value = pod_token(
                    client,
                    pod,
                    namespace,
                    token.audience.as_deref(),
                    token.expiration_seconds,
                )
                .await?;
                write_file(&dir.join(&token.path), &value)?;
            } else if let Some(cm) = &source.config_map {
                let data = config_map_data(client, namespace, &cm.name).await?;
                write_keys(dir, &data, cm.items.as_ref())?;
            } else if let Some(secret) = &source.secret {
                let data = secret_data(client, namespace, &secret.name).await?;
                write_keys(dir, &data, secret.items.as_ref())?;
            } else if let Some(downward) = &source.downward_api {
                downward_files(pod, dir, downward.items.as_deref().unwrap_or_default())?;
            }
        }
        return Ok(());
    }
    bail!(
        "volume {}: this kind is not supported by the pod runner",
        volume.name
    )
}

/// A kubeconfig for an in-cluster client: the mounted token (read as a
/// file, so rotation works) and CA, the test API server.
fn in_cluster_kubeconfig(root: &Path, mount: &Path) -> anyhow::Result<PathBuf> {
    let path = root.join("in-cluster.kubeconfig");
    crate::kube::write_kubeconfig(
        &path,
        &mount.join("ca.crt"),
        &format!("tokenFile: {}", mount.join("token").display()),
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_like_kubernetes() {
        let env = vec![
            ("HOST".to_owned(), "db".to_owned()),
            ("PORT".to_owned(), "5432".to_owned()),
        ];
        assert_eq!(
            expand_references("postgres://$(HOST):$(PORT)/x", &env),
            "postgres://db:5432/x"
        );
        assert_eq!(
            expand_references("$$(HOST) $(NOPE) $", &env),
            "$(HOST) $(NOPE) $"
        );
    }

    #[test]
    fn mount_paths_are_rewritten_longest_first() {
        let mounts = BTreeMap::from([
            ("/etc/sf".to_owned(), PathBuf::from("/tmp/a")),
            ("/etc/sf/tls".to_owned(), PathBuf::from("/tmp/b")),
        ]);
        assert_eq!(
            rewrite_paths("--config=/etc/sf/x.toml --ca=/etc/sf/tls/ca.crt", &mounts),
            "--config=/tmp/a/x.toml --ca=/tmp/b/ca.crt"
        );
    }
}
