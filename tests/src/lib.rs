//! Support for the integration tests in `tests/tests/`: where the real
//! services are, how to find and drive the built binaries, and small helpers
//! (HTTP, waiting) that the tests share.
//!
//! Services are the ones `testenv/up.sh` starts. Their addresses default to
//! `testenv/services.env` (compiled in, so there is one source of ports) and
//! can be overridden with the `STATEFABRIC_TEST_*` variables that `up.sh`
//! writes to its `env.sh`. Nothing here fakes a service: when one is not
//! running, the test fails and says to run `testenv/up.sh`.

pub mod agents;
pub mod chart;
pub mod kafka;
pub mod kube;
pub mod lock_contract;
pub mod otlp;
pub mod pod_runner;
pub mod process;
pub mod saga_contract;
pub mod session_contract;
pub mod stall;
pub mod store_contract;
pub mod updates_contract;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SERVICES_ENV: &str = include_str!("../../testenv/services.env");

fn services() -> &'static HashMap<String, String> {
    static PARSED: OnceLock<HashMap<String, String>> = OnceLock::new();
    PARSED.get_or_init(|| {
        SERVICES_ENV
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

pub(crate) fn setting(key: &str) -> String {
    services()
        .get(key)
        .cloned()
        .unwrap_or_else(|| panic!("testenv/services.env has no {key}"))
}

fn overridable(var: &str, default: impl FnOnce() -> String) -> String {
    std::env::var(var).unwrap_or_else(|_| default())
}

/// Postgres as the migration/superuser role.
pub fn pg_admin_url() -> String {
    overridable("STATEFABRIC_TEST_PG_ADMIN_URL", || {
        pg_url(&setting("PG_ADMIN_USER"), &setting("PG_ADMIN_PASSWORD"))
    })
}

/// Postgres as the application role (not an owner: Row-Level Security applies).
pub fn pg_app_url() -> String {
    overridable("STATEFABRIC_TEST_PG_APP_URL", || {
        pg_url(&setting("PG_APP_USER"), &setting("PG_APP_PASSWORD"))
    })
}

/// Postgres as the control plane (the app role's grants plus the outbox
/// relay's cross-tenant functions).
pub fn pg_control_url() -> String {
    overridable("STATEFABRIC_TEST_PG_CONTROL_URL", || {
        pg_url(&setting("PG_CONTROL_USER"), &setting("PG_CONTROL_PASSWORD"))
    })
}

/// The test database as `user` (e.g. a tenant's own login).
pub fn pg_url(user: &str, password: &str) -> String {
    format!(
        "postgres://{user}:{password}@127.0.0.1:{}/{}",
        setting("PG_PORT"),
        setting("PG_DATABASE")
    )
}

/// The standalone Redis.
pub fn redis_url() -> String {
    overridable("STATEFABRIC_TEST_REDIS_URL", || {
        format!("redis://127.0.0.1:{}", setting("REDIS_PORT"))
    })
}

/// The 6-node Redis cluster's seed URLs.
pub fn redis_cluster_urls() -> Vec<String> {
    overridable("STATEFABRIC_TEST_REDIS_CLUSTER", || {
        setting("REDIS_CLUSTER_PORTS")
            .split(',')
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    })
    .split(',')
    .map(str::to_owned)
    .collect()
}

pub fn kafka_bootstrap() -> String {
    overridable("STATEFABRIC_TEST_KAFKA_BOOTSTRAP", || {
        format!("127.0.0.1:{}", setting("KAFKA_PORT"))
    })
}

/// Kafka Connect's REST API.
pub fn connect_url() -> String {
    overridable("STATEFABRIC_TEST_CONNECT_URL", || {
        format!("http://127.0.0.1:{}", setting("CONNECT_PORT"))
    })
}

/// The registry's Confluent-compatible API root.
pub fn registry_url() -> String {
    overridable("STATEFABRIC_TEST_REGISTRY_URL", || {
        format!(
            "http://127.0.0.1:{}/apis/ccompat/v7",
            setting("REGISTRY_PORT")
        )
    })
}

/// Hint appended to connection failures.
/// The real standalone Redis through the production connection code
/// (deadline, breaker, metrics).
/// Two fresh tenants on the migrated test Postgres and the event store as
/// the application role (row-level security on): for the store's ports'
/// contracts.
pub async fn pg_app_store_with_two_tenants() -> anyhow::Result<(
    statefabric_store::pg::PgEventStore,
    statefabric_domain::TenantId,
    statefabric_domain::TenantId,
)> {
    statefabric_db::pg::migrate(&pg_admin_url()).await?;
    let fresh =
        || statefabric_domain::TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple()));
    let (ours, theirs) = (fresh()?, fresh()?);
    for t in [&ours, &theirs] {
        statefabric_db::pg::create_tenant(&pg_admin_url(), t, "test").await?;
    }
    let store = statefabric_store::pg::PgEventStore::connect(statefabric_store::pg::PgConfig {
        url: pg_app_url(),
        ..statefabric_store::pg::PgConfig::default()
    })
    .await?;
    Ok((store, ours, theirs))
}

/// The embedded event store in a fresh file under `dir`.
pub async fn sqlite_store(
    dir: &std::path::Path,
) -> anyhow::Result<statefabric_store::sqlite::SqliteEventStore> {
    Ok(
        statefabric_store::sqlite::SqliteEventStore::open(
            statefabric_store::sqlite::SqliteConfig {
                path: dir.join("events.db"),
                ..statefabric_store::sqlite::SqliteConfig::default()
            },
        )
        .await?,
    )
}

pub async fn redis_standalone() -> statefabric_redis::Redis {
    redis_with(statefabric_redis::RedisMode::Standalone, redis_url()).await
}

/// The real 6-node cluster through the production connection code.
pub async fn redis_cluster() -> statefabric_redis::Redis {
    redis_with(
        statefabric_redis::RedisMode::Cluster,
        redis_cluster_urls().join(","),
    )
    .await
}

async fn redis_with(mode: statefabric_redis::RedisMode, urls: String) -> statefabric_redis::Redis {
    let config = statefabric_redis::RedisConfig {
        mode,
        urls,
        ..statefabric_redis::RedisConfig::default()
    };
    statefabric_redis::Redis::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("{e} ({START_HINT})"))
}

pub const START_HINT: &str = "is the test environment running? start it with testenv/up.sh";

/// Path of a workspace binary built next to this test executable
/// (`cargo build --workspace --bins` puts it there; `scripts/test.sh` runs that).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A TCP port free at the time of the call, for a child process to bind.
/// Runs one of the SDK's examples (`examples/<name>`) against `endpoint`
/// and returns what it printed; fails with its output if it fails.
pub async fn run_example(name: &str, endpoint: &str) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(binary(&format!("examples/{name}")))
        .arg(endpoint)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "example {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// `N` different free ports: all bound at once, then released, so two of
/// them can never be the same port.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .map(|a| a.port())
            .expect("a bound port")
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `check` until it returns `Ok(Some(_))` or `timeout` passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_err = Some(err),
        }
        if start.elapsed() >= timeout {
            match last_err {
                Some(err) => bail!("{what}: not reached within {timeout:?}; last error: {err:#}"),
                None => bail!("{what}: not reached within {timeout:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("response is not JSON: {}", self.body))
    }
}

/// One HTTP/1.1 request over plain TCP; enough for local REST APIs.
pub async fn http(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: Option<String>,
) -> anyhow::Result<HttpResponse> {
    let headers: Vec<(&str, &str)> = content_type
        .map(|ct| ("content-type", ct))
        .into_iter()
        .collect();
    http_with(method, url, &headers, body).await
}

/// [`http`] with any request headers.
pub async fn http_with(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> anyhow::Result<HttpResponse> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("building request")?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .with_context(|| format!("{method} {url} timed out"))?
        .with_context(|| format!("{method} {url} failed ({START_HINT})"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading response body")?
        .to_bytes();
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
