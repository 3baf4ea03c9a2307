//! Mesh configuration propagation: the time from a FabricConfig update on
//! the API server to each of N subscribed sidecars holding (and ACKing) the
//! new configuration, and the control plane's memory per subscriber.
//!
//! The subscribers are real gRPC streams of `ConfigDistribution`, one
//! connection each, every one authenticated with its own pod-bound
//! ServiceAccount token (a TokenReview each, as in production). The
//! baseline, measured in the same run for every update, is the API
//! server's own watch: the time until a plain watcher of FabricConfigs sees
//! the update — what any controller needs before it can act. The memory
//! baseline is the transport's own: a tonic server (the sidecar's gRPC
//! health service, release build) holding as many idle server streams
//! (`Health/Watch`), one connection each — what one HTTP/2 connection and
//! stream per subscriber cost before any configuration is kept.
//!
//! Needs the test environment (`testenv/up.sh`) and a release build:
//!   cargo build --release -p statefabric-control-plane -p statefabric-sidecar -p statefabric-bench
//!   "${CARGO_TARGET_DIR:-target}"/release/mesh-bench --subscribers 1,100,1000 --updates 20

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use statefabric_bench::{Latencies, report};
use statefabric_mesh::FabricConfig;
use statefabric_proto::control::v1::config_distribution_client::ConfigDistributionClient;
use statefabric_proto::control::v1::subscribe_request::Kind;
use statefabric_proto::control::v1::{Ack, Hello, SubscribeRequest};
use statefabric_tests as env;
use statefabric_tests::kube::{TestNamespace, install_crds};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, mpsc, watch};

#[derive(Debug, Parser)]
struct Args {
    /// Subscriber counts to measure, one scenario each.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    subscribers: Vec<usize>,
    /// FabricConfig updates per scenario.
    #[arg(long, default_value_t = 20)]
    updates: u32,
}

/// The update round a subscriber has seen, and when.
type Seen = Arc<Mutex<Latencies>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The TTL written in round r is 60 + r seconds, which must never be a
    // whole number of minutes (the configuration writes that as `2m`).
    anyhow::ensure!(args.updates < 60, "--updates must be under 60");
    let client = env::kube::client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client).await?;
    let ns = namespace.name.clone();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("agent".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts.create(&PostParams::default(), &account).await?;
    let configs: Api<FabricConfig> = Api::namespaced(client.clone(), &ns);
    apply_config(&configs, 0).await?;

    let port = env::free_port();
    let cp = start_control_plane(port).await?;
    let mut pods = Vec::new();
    println!("mesh-bench: config propagation, namespace {ns}");
    for &n in &args.subscribers {
        while pods.len() < n {
            let more = (pods.len()..n.min(pods.len() + 50)).map(|i| create_pod(&client, &ns, i));
            for made in futures::future::join_all(more).await {
                pods.push(made?);
            }
        }
        scenario(&configs, &ns, port, &pods[..n], &cp, args.updates).await?;
        transport_floor(n).await?;
    }
    drop(cp);
    namespace.delete().await
}

async fn apply_config(configs: &Api<FabricConfig>, round: u32) -> anyhow::Result<()> {
    let document = serde_json::json!({
        "apiVersion": "statefabric.io/v1alpha1",
        "kind": "FabricConfig",
        "metadata": {"name": "bench"},
        "spec": {"default": true, "sessions": {"chat": {"ttl": format!("{}s", 60 + round)}}},
    });
    configs
        .patch(
            "bench",
            &PatchParams::apply("mesh-bench").force(),
            &Patch::Apply(&document),
        )
        .await?;
    Ok(())
}

async fn start_control_plane(port: u16) -> anyhow::Result<Child> {
    let binary = statefabric_bench::release_binary("statefabric-control-plane")?;
    let admin = env::free_port();
    let child = Command::new(binary)
        .env("KUBECONFIG", env::kube::kubeconfig_path())
        .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env(
            "STATEFABRIC_API__LISTEN",
            format!("127.0.0.1:{}", env::free_port()),
        )
        .env(
            "STATEFABRIC_API__GRPC_LISTEN",
            format!("127.0.0.1:{}", env::free_port()),
        )
        .env("STATEFABRIC_SAGAS__ENABLED", "false")
        .env("STATEFABRIC_MESH__ENABLED", "true")
        .env("STATEFABRIC_MESH__LISTEN", format!("127.0.0.1:{port}"))
        .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()?;
    statefabric_bench::wait_ready("control plane", admin).await?;
    Ok(child)
}

/// A Pending pod and a token bound to it.
async fn create_pod(client: &Client, ns: &str, index: usize) -> anyhow::Result<(String, String)> {
    let name = format!("agent-{index}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some("agent".into()),
            containers: vec![Container {
                name: "agent".into(),
                image: Some("agent:bench".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = pods.create(&PostParams::default(), &pod).await?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["statefabric".into()]),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: Some(name.clone()),
                uid: created.metadata.uid.clone(),
            }),
            expiration_seconds: Some(3600),
        }),
        ..Default::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let token = accounts
        .create_token_request("agent", &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    Ok((name, token))
}

/// RSS per stream of a tonic server holding `n` idle server streams.
async fn transport_floor(n: usize) -> anyhow::Result<()> {
    // The bench's own sidecar, on a private SQLite file: no pool of its own
    // to grow while the streams open.
    let data = tempfile::tempdir()?;
    let path = data.path().join("events.db").display().to_string();
    let server = statefabric_bench::Sidecar::start(
        "bench",
        &[
            ("STATEFABRIC_STORAGE__BACKEND", "sqlite"),
            ("STATEFABRIC_STORAGE__SQLITE__PATH", path.as_str()),
        ],
    )
    .await?;
    let grpc = server.grpc.clone();
    let before = rss_kib(&server.child);
    // Opened a hundred at a time, each waiting for its first message, so a
    // refused connection is an error rather than a missing count.
    let mut streams = Vec::new();
    for start in (0..n).step_by(100) {
        let mut opened = Vec::new();
        for _ in start..n.min(start + 100) {
            let (open_tx, open_rx) = tokio::sync::oneshot::channel::<()>();
            opened.push(open_rx);
            let grpc = grpc.clone();
            streams.push(tokio::spawn(async move {
                let channel = tonic::transport::Endpoint::from_shared(grpc)?
                    .connect()
                    .await?;
                let mut stream = tonic_health::pb::health_client::HealthClient::new(channel)
                    .watch(tonic_health::pb::HealthCheckRequest::default())
                    .await?
                    .into_inner();
                stream.message().await?;
                let _ = open_tx.send(());
                // Held open until the task is aborted.
                while stream.message().await?.is_some() {}
                anyhow::Ok(())
            }));
        }
        for open in opened {
            tokio::time::timeout(Duration::from_secs(30), open)
                .await
                .map_err(|_| anyhow::anyhow!("a health stream did not open within 30 s"))?
                .map_err(|_| anyhow::anyhow!("a health stream failed to open"))?;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(&server.child);
    for stream in &streams {
        stream.abort();
    }
    println!(
        "  baseline: tonic server with {n} idle streams, one connection each: {:.1} KiB per stream",
        (after - before) / n as f64
    );
    Ok(())
}

fn rss_kib(child: &Child) -> f64 {
    child.id().map_or(0.0, statefabric_bench::rss_kib)
}

async fn scenario(
    configs: &Api<FabricConfig>,
    ns: &str,
    port: u16,
    pods: &[(String, String)],
    cp: &Child,
    updates: u32,
) -> anyhow::Result<()> {
    let n = pods.len();
    // The round in flight and when it was written.
    let (round_tx, round_rx) = watch::channel((0u32, Instant::now()));
    let subscribed = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let seen: Seen = Arc::new(Mutex::new(Latencies::default()));
    let rss_before = rss_kib(cp);
    let mut tasks = Vec::new();
    for (pod, token) in pods {
        let hello = Hello {
            namespace: ns.to_owned(),
            pod: pod.clone(),
            token: token.clone(),
            ..Hello::default()
        };
        tasks.push(tokio::spawn(subscriber(
            port,
            hello,
            round_rx.clone(),
            subscribed.clone(),
            received.clone(),
            seen.clone(),
        )));
    }
    wait_until("subscribed", Duration::from_secs(120), || {
        subscribed.load(Ordering::SeqCst) >= n
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(cp);

    // The baseline: a plain watcher of the same resources.
    let watched: Arc<Mutex<Latencies>> = Arc::default();
    let watcher_task = {
        let configs = configs.clone();
        let round_rx = round_rx.clone();
        let watched = watched.clone();
        tokio::spawn(async move {
            let mut events = watcher(configs, watcher::Config::default())
                .applied_objects()
                .boxed();
            let mut last = 0u32;
            while let Some(Ok(config)) = events.next().await {
                let (round, at) = *round_rx.borrow();
                let ttl = config
                    .spec
                    .sessions
                    .get("chat")
                    .map(|p| p.ttl.get().as_secs());
                if round > last && ttl == Some(60 + u64::from(round)) {
                    last = round;
                    watched.lock().await.record(at.elapsed());
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for round in 1..=updates {
        received.store(0, Ordering::SeqCst);
        round_tx.send_replace((round, Instant::now()));
        apply_config(configs, round).await?;
        wait_until("every subscriber updated", Duration::from_secs(60), || {
            received.load(Ordering::SeqCst) >= n
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    watcher_task.abort();
    for task in &tasks {
        task.abort();
    }
    let seen = seen.lock().await.clone();
    let watched = watched.lock().await.clone();
    report(
        &format!("{n} subscribers: update → ACK"),
        f64::from(updates) * n as f64 / elapsed.as_secs_f64(),
        "acks",
        Some(&seen),
    );
    report(
        "  baseline: API server watch event",
        f64::from(updates) / elapsed.as_secs_f64(),
        "events",
        Some(&watched),
    );
    println!(
        "  control plane RSS {:.1} MiB with {n} subscribers, {:.1} MiB before: {:.1} KiB per subscriber",
        rss_after / 1024.0,
        rss_before / 1024.0,
        (rss_after - rss_before) / n as f64
    );
    // Let the control plane see the streams close before the next scenario.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

async fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        anyhow::ensure!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// One sidecar's subscription: ACKs every snapshot and records, for the
/// round in flight, the time from its write to the snapshot's arrival.
async fn subscriber(
    port: u16,
    hello: Hello,
    round: watch::Receiver<(u32, Instant)>,
    subscribed: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
    seen: Seen,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(SubscribeRequest {
        kind: Some(Kind::Hello(hello)),
    })
    .await?;
    let mut stream = ConfigDistributionClient::new(channel)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut first = true;
    let mut last_round = 0;
    while let Some(snapshot) = stream.message().await? {
        tx.send(SubscribeRequest {
            kind: Some(Kind::Ack(Ack {
                version: snapshot.version.clone(),
                not_applied: Vec::new(),
            })),
        })
        .await?;
        if first {
            first = false;
            subscribed.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let (current, at) = *round.borrow();
        if current > last_round
            && snapshot
                .config_json
                .contains(&format!("\"ttl\":\"{}s\"", 60 + current))
        {
            last_round = current;
            seen.lock().await.record(at.elapsed());
            received.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}
