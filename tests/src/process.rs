//! Running the real binaries as child processes.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// A started service binary with its admin endpoint.
#[derive(Debug)]
pub struct Service {
    pub child: Child,
    /// `http://127.0.0.1:<admin port>`.
    pub admin: String,
    /// Where the sidecar's State API listens (ignored by other binaries).
    pub grpc: String,
    /// The control plane's operator API (ignored by other binaries).
    pub api: String,
    /// Its gRPC form.
    pub api_grpc: String,
    /// Everything written to stderr so far (the last `STDERR_KEEP` bytes),
    /// read as it comes: a child must never block on a full pipe.
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Holds the embedded store's files for the process's lifetime.
    _data: tempfile::TempDir,
}

/// How much of a child's stderr is kept.
const STDERR_KEEP: usize = 256 * 1024;

/// Drains `pipe` into `into`, keeping the tail.
fn drain(
    mut pipe: tokio::process::ChildStderr,
    into: Arc<Mutex<Vec<u8>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            let mut kept = into
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            kept.extend_from_slice(&chunk[..n]);
            if kept.len() > STDERR_KEEP {
                let cut = kept.len() - STDERR_KEEP;
                kept.drain(..cut);
            }
        }
    })
}

/// Starts `binary` with free admin and gRPC ports, a private data directory
/// and a 5 s drain deadline, plus `extra_env`.
pub fn spawn(binary: &str, args: &[&str], extra_env: &[(&str, &str)]) -> anyhow::Result<Service> {
    let [admin_port, grpc_port, api_port, api_grpc_port] = crate::free_ports();
    let data = tempfile::tempdir()?;
    let mut command = Command::new(crate::binary(binary));
    command
        .args(args)
        .env(
            "STATEFABRIC_ADMIN__LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env(
            "STATEFABRIC_SIDECAR__LISTEN",
            format!("127.0.0.1:{grpc_port}"),
        )
        .env(
            "STATEFABRIC_STORAGE__SQLITE__PATH",
            data.path().join("events.db"),
        )
        .env("STATEFABRIC_API__LISTEN", format!("127.0.0.1:{api_port}"))
        .env(
            "STATEFABRIC_API__GRPC_LISTEN",
            format!("127.0.0.1:{api_grpc_port}"),
        )
        .env(
            "STATEFABRIC_SAGAS__SQLITE_PATH",
            data.path().join("events.db"),
        )
        .env("STATEFABRIC_SHUTDOWN__DRAIN_DEADLINE", "5s")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {binary}"))?;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let reader = child.stderr.take().map(|pipe| drain(pipe, stderr.clone()));
    Ok(Service {
        child,
        stderr,
        reader,
        admin: format!("http://127.0.0.1:{admin_port}"),
        grpc: format!("http://127.0.0.1:{grpc_port}"),
        api: format!("http://127.0.0.1:{api_port}"),
        api_grpc: format!("http://127.0.0.1:{api_grpc_port}"),
        _data: data,
    })
}

impl Drop for Service {
    fn drop(&mut self) {
        terminate_on_drop(&self.child);
    }
}

/// Lets a child that is being dropped stop by itself: SIGTERM (and SIGCONT,
/// should a test have paused it), then up to 2 s for it to exit before
/// `kill_on_drop`'s SIGKILL. A process that exits writes its coverage
/// profile (`scripts/test.sh` measures coverage from them; a killed one
/// leaves none), and the graceful path it takes is the one users run.
pub fn terminate_on_drop(child: &Child) {
    // None once the child was waited for: nothing left to stop.
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return;
    };
    let pid = Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let _ = kill(pid, Signal::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline && !exited(pid) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True once `pid` is gone or a zombie (exited, not yet reaped).
fn exited(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

impl Service {
    /// Where the process keeps its embedded store (`events.db`).
    pub fn data_dir(&self) -> &std::path::Path {
        self._data.path()
    }

    /// Waits for `/healthz/ready` to answer 200.
    ///
    /// The answer must be this process's: a free port handed out to two
    /// processes at once lets another one answer on the admin port while
    /// this one fails to bind and exits, so the process is checked to be
    /// still running a moment after it answered.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/healthz/ready", self.admin);
        let result = crate::eventually("readiness", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                Ok(crate::http("GET", &url, None, None)
                    .await?
                    .status
                    .eq(&200)
                    .then_some(()))
            }
        })
        .await;
        if result.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            let stderr = self.stderr().await;
            anyhow::bail!("exited with {status} before becoming ready:\n{stderr}");
        }
        result
    }

    /// Sends `signal` and waits (at most the drain deadline plus 2 s) for the
    /// exit; returns the exit code and everything written to stderr.
    pub async fn stop_with(mut self, signal: Signal) -> anyhow::Result<(i32, String)> {
        let pid = self.child.id().context("child has no pid")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        let status = tokio::time::timeout(Duration::from_secs(7), self.child.wait())
            .await
            .context("did not exit within its drain deadline")??;
        let stderr = self.stderr().await;
        Ok((status.code().unwrap_or(-1), stderr))
    }

    /// Sends `signal` (e.g. SIGSTOP / SIGCONT) without waiting.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("child has no pid")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// What the process wrote to stderr (all of it once it has exited).
    async fn stderr(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
        let kept = self
            .stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&kept).into_owned()
    }
}

/// Where a test sidecar keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// The shared test Postgres (migrated and the tenant registered at start).
    Postgres,
    /// A private SQLite file.
    Sqlite,
}

/// Environment that puts a sidecar's locks, sessions and change updates on
/// the real Redis Cluster (`cluster`) or the standalone Redis at `url`.
pub fn redis_vars(cluster: bool) -> Vec<(&'static str, String)> {
    let (mode, urls) = if cluster {
        ("cluster", crate::redis_cluster_urls().join(","))
    } else {
        ("standalone", crate::redis_url())
    };
    redis_vars_at(mode, &urls)
}

/// As [`redis_vars`], for any Redis (e.g. a private one a test kills).
pub fn redis_vars_at(mode: &str, urls: &str) -> Vec<(&'static str, String)> {
    vec![
        ("STATEFABRIC_REDIS__MODE", mode.to_owned()),
        ("STATEFABRIC_REDIS__URLS", urls.to_owned()),
        ("STATEFABRIC_LOCKS__BACKEND", "redis".to_owned()),
        ("STATEFABRIC_SESSIONS__BACKEND", "redis".to_owned()),
        ("STATEFABRIC_UPDATES__BACKEND", "redis".to_owned()),
    ]
}

/// Environment of a control plane leading on Postgres under `lease` with
/// the outbox relay on (transactional id `txid`, single-broker topics),
/// logged in to Kafka as the control plane.
pub fn relay_vars(lease: &str, txid: &str) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        ("STATEFABRIC_LEADER__BACKEND", "postgres".to_owned()),
        ("STATEFABRIC_LEADER__POSTGRES_URL", crate::pg_control_url()),
        (
            "STATEFABRIC_LEADER__POSTGRES_MIGRATE_URL",
            crate::pg_admin_url(),
        ),
        ("STATEFABRIC_LEADER__NAME", lease.to_owned()),
        ("STATEFABRIC_RELAY__ENABLED", "true".to_owned()),
        (
            "STATEFABRIC_RELAY__KAFKA_BOOTSTRAP",
            crate::kafka_bootstrap(),
        ),
        ("STATEFABRIC_RELAY__REGISTRY_URL", crate::registry_url()),
        ("STATEFABRIC_RELAY__TRANSACTIONAL_ID", txid.to_owned()),
        ("STATEFABRIC_RELAY__TOPICS__REPLICATION", "1".to_owned()),
        (
            "STATEFABRIC_RELAY__TOPICS__MIN_INSYNC_REPLICAS",
            "1".to_owned(),
        ),
    ];
    vars.extend(crate::kafka::Principal::ControlPlane.process_env());
    vars
}

/// Borrows owned variables for [`sidecar`]'s `extra`.
pub fn borrowed<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Starts a `statefabric-sidecar` for `tenant` as `identity` and waits until
/// it is ready; `extra` environment variables come last and win.
pub async fn sidecar(
    storage: Storage,
    tenant: &str,
    identity: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Service> {
    let (admin_url, app_url) = (crate::pg_admin_url(), crate::pg_app_url());
    let mut vars: Vec<(&str, &str)> = vec![
        ("STATEFABRIC_SIDECAR__TENANT", tenant),
        ("STATEFABRIC_SIDECAR__IDENTITY", identity),
    ];
    if storage == Storage::Postgres {
        vars.extend([
            ("STATEFABRIC_STORAGE__BACKEND", "postgres"),
            ("STATEFABRIC_STORAGE__POSTGRES__URL", app_url.as_str()),
            (
                "STATEFABRIC_STORAGE__POSTGRES_MIGRATE_URL",
                admin_url.as_str(),
            ),
        ]);
    }
    vars.extend_from_slice(extra);
    // Ports are picked free, then bound by the child: another process may
    // take one in between. Such a start is tried again on fresh ports.
    let mut attempt = 1;
    loop {
        let mut service = spawn("statefabric-sidecar", &[], &vars)?;
        // Ports are free when picked, then bound by the child: another
        // process may take one in between (its failure to bind says so), or
        // answer the readiness probe on the admin port while this child's
        // State API is not there (a refused connection after "ready": seen
        // once in CI). Either start is tried again on fresh ports.
        let (err, retry) = match service.ready().await {
            Ok(()) => match wait_listening(&service.grpc).await {
                Ok(()) => return Ok(service),
                Err(err) => (
                    anyhow::anyhow!(
                        "ready, but the State API refuses connections: {err:#}\n{}",
                        service.stderr().await
                    ),
                    true,
                ),
            },
            Err(err) => {
                let taken = format!("{err:#}").contains("Address already in use");
                (err, taken)
            }
        };
        if !retry || attempt >= 3 {
            return Err(err);
        }
        attempt += 1;
    }
}

/// A control plane serving mesh configuration on `127.0.0.1:port` over TLS
/// (the test cluster's `mesh.crt`), watching the API server as
/// `kubeconfig`, writing status every 200 ms, saga engine off; `extra`
/// environment on top.
pub async fn mesh_control_plane(
    port: u16,
    kubeconfig: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Service> {
    let pki = crate::kube::pki_dir();
    let (cert, key) = (
        pki.join("mesh.crt").display().to_string(),
        pki.join("mesh.key").display().to_string(),
    );
    let listen = format!("127.0.0.1:{port}");
    let mut vars = vec![
        ("KUBECONFIG", kubeconfig),
        ("STATEFABRIC_SAGAS__ENABLED", "false"),
        ("STATEFABRIC_MESH__ENABLED", "true"),
        ("STATEFABRIC_MESH__LISTEN", listen.as_str()),
        ("STATEFABRIC_MESH__TLS_CERT", cert.as_str()),
        ("STATEFABRIC_MESH__TLS_KEY", key.as_str()),
        ("STATEFABRIC_MESH__STATUS_INTERVAL", "200ms"),
    ];
    vars.extend_from_slice(extra);
    let mut service = spawn("statefabric-control-plane", &[], &vars)?;
    service.ready().await?;
    Ok(service)
}

/// Whether `grpc` (`http://host:port`) accepts a TCP connection within a
/// few seconds.
async fn wait_listening(grpc: &str) -> anyhow::Result<()> {
    let address = grpc.trim_start_matches("http://").to_owned();
    crate::eventually("the State API listening", Duration::from_secs(3), || {
        let address = address.clone();
        async move {
            Ok(tokio::net::TcpStream::connect(&address)
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await
}

/// Waits until the sidecar at `address` gives sessions in `namespace` a
/// TTL of at least `at_least`: its mesh configuration (a FabricConfig's
/// session policy) has arrived.
pub async fn session_policy_served(
    address: &str,
    namespace: &str,
    at_least: std::time::Duration,
) -> anyhow::Result<()> {
    crate::eventually(
        &format!("sessions in {namespace} served for at least {at_least:?}"),
        std::time::Duration::from_secs(15),
        || async {
            let mut sessions = statefabric_sdk::StateClient::connect(address.to_owned())
                .await?
                .sessions();
            Ok(sessions
                .put(namespace, "probe", b"v".to_vec(), None)
                .await
                .ok()
                .filter(|ttl| *ttl >= at_least)
                .map(|_| ()))
        },
    )
    .await
}

/// `fabric tenants onboard` as an operator runs it (the test Postgres and
/// standalone Redis), its output applied; returns the sidecars' Secret.
pub async fn onboard_tenant(tenant: &str, namespace: &str) -> anyhow::Result<serde_json::Value> {
    let output = tokio::process::Command::new(crate::binary("fabric"))
        .args(["tenants", "onboard", tenant, "--namespace", namespace])
        .env("STATEFABRIC_OWNER_DATABASE_URL", crate::pg_admin_url())
        .env("STATEFABRIC_REDIS_ADMIN_URLS", crate::redis_url())
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "fabric tenants onboard: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list = String::from_utf8(output.stdout)?;
    crate::kube::kubectl(&["apply", "-f", "-"], Some(&list)).await?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    list["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|i| i["metadata"]["name"] == "statefabric-sidecar-credentials")
        })
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no sidecar Secret in: {list}"))
}

/// Through the State API at `address`: appends a new stream's first event
/// and takes (then releases) the lock `repo`. Returns the stream id.
pub async fn append_and_lock(address: &str) -> anyhow::Result<String> {
    let mut state = statefabric_sdk::StateClient::connect(address.to_owned()).await?;
    let stream = format!("task-{}", uuid::Uuid::new_v4().simple());
    state
        .append(
            &stream,
            "task",
            statefabric_sdk::Expected::NoStream,
            vec![statefabric_sdk::NewEvent::json(
                "Created",
                &serde_json::json!({"n": 1}),
            )?],
        )
        .await?;
    let lock = state
        .locks()
        .acquire(
            "repo",
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(1),
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("the lock repo is taken"))?;
    lock.release().await?;
    Ok(stream)
}
