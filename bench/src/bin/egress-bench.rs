//! The egress path's added latency: an HTTP upstream called directly,
//! through the sidecar's egress listener, and through nginx (the Debian
//! package) as a reverse proxy to the same upstream — all three in one
//! run, with the same client, at 1, 16 and 64 concurrent clients, small
//! (128 B) and 64 KiB bodies, HTTP/1.1 and HTTP/2 (h2c); then the time to
//! the first byte of a streamed response, direct and through the sidecar;
//! then a fresh sidecar's RSS holding 1,000 idle pooled upstream
//! connections. The sidecar is measured with its default one runtime
//! thread and, beside it, with two (nginx runs a worker per core).
//!
//!   apt-get install nginx
//!   export CARGO_TARGET_DIR=~/.cache/statefabric/target-release
//!   cargo build --profile dist -p statefabric-sidecar   # as it ships
//!   cargo build --release -p statefabric-bench --bin egress-bench
//!   STATEFABRIC_BENCH_BINARIES=$CARGO_TARGET_DIR/dist \
//!     $CARGO_TARGET_DIR/release/egress-bench --seconds 5
//!
//! The sidecar runs with the default egress settings (no policy: timeouts
//! only, no retries, no limits); nginx with `proxy_http_version 1.1` and a
//! keep-alive pool to the upstream, one worker per core. nginx is only
//! measured over HTTP/1.1 (it does not speak h2c to clients without TLS in
//! this setup).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Bytes;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use statefabric_bench::{Latencies, load, release_binary, wait_ready};
use statefabric_tests as env;

#[derive(Parser)]
struct Args {
    /// Seconds per cell.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Only the idle-connections measurement.
    #[arg(long)]
    idle_only: bool,
}

const SMALL: usize = 128;
const LARGE: usize = 64 * 1024;

/// The upstream: `/bytes/<n>` answers n bytes; `/stream` sends a first
/// chunk at once and a second 200 ms later.
async fn upstream() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let path = request.uri().path().to_owned();
                        if path.ends_with("/slow") {
                            // Holds its connection a moment: concurrent
                            // calls each need their own.
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        if path.ends_with("/stream") {
                            let chunks = futures::stream::unfold(0u8, |n| async move {
                                match n {
                                    0 => Some((
                                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(
                                            b"data: first\n\n",
                                        ))),
                                        1,
                                    )),
                                    1 => {
                                        tokio::time::sleep(Duration::from_millis(200)).await;
                                        Some((
                                            Ok(Frame::data(Bytes::from_static(b"data: last\n\n"))),
                                            2,
                                        ))
                                    }
                                    _ => None,
                                }
                            });
                            return Ok::<_, Infallible>(hyper::Response::new(
                                StreamBody::new(chunks).boxed(),
                            ));
                        }
                        let n = path
                            .rsplit('/')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(SMALL);
                        Ok(hyper::Response::new(
                            Full::new(Bytes::from(vec![b'x'; n]))
                                .map_err(|never| match never {})
                                .boxed(),
                        ))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(port)
}

struct Nginx {
    _child: tokio::process::Child,
    port: u16,
    conf: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    /// Stops master and workers (killing the master alone leaves workers).
    fn drop(&mut self) {
        let _ = std::process::Command::new("nginx")
            .arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .arg(self.dir.path())
            .args(["-s", "stop"])
            .status();
    }
}

async fn nginx(upstream: u16) -> anyhow::Result<Nginx> {
    let dir = tempfile::tempdir()?;
    let port = env::free_port();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes auto;\npid {pid};\nerror_log {log} warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n\
               upstream bench {{ server 127.0.0.1:{upstream}; keepalive 128; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                 proxy_pass http://bench;\n      proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
            pid = dir.path().join("nginx.pid").display(),
            log = dir.path().join("error.log").display(),
            tmp = dir.path().display(),
        ),
    )?;
    let child = tokio::process::Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting nginx (apt-get install nginx): {e}"))?;
    env::eventually("nginx listening", Duration::from_secs(10), || async move {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    Ok(Nginx {
        _child: child,
        port,
        conf,
        dir,
    })
}

struct Sidecar {
    child: tokio::process::Child,
    egress: u16,
    _dir: tempfile::TempDir,
}

async fn sidecar(upstream: u16, worker_threads: usize) -> anyhow::Result<Sidecar> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: bench}}\nspec: {{url: \"http://127.0.0.1:{upstream}\", protocol: auto}}\n"
        ),
    )?;
    let (admin, egress) = (env::free_port(), env::free_port());
    let child = tokio::process::Command::new(release_binary("statefabric-sidecar")?)
        .env(
            "STATEFABRIC_SIDECAR__LISTEN",
            format!("127.0.0.1:{}", env::free_port()),
        )
        .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env(
            "STATEFABRIC_STORAGE__SQLITE__PATH",
            dir.path().join("events.db"),
        )
        .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
        .env(
            "STATEFABRIC_MESH__FILES",
            format!("[{:?}]", mesh.display().to_string()),
        )
        .env(
            "STATEFABRIC_SIDECAR__WORKER_THREADS",
            worker_threads.to_string(),
        )
        .env("STATEFABRIC_EGRESS__ENABLED", "true")
        .env("STATEFABRIC_EGRESS__LISTEN", format!("127.0.0.1:{egress}"))
        .kill_on_drop(true)
        .spawn()?;
    wait_ready("sidecar", admin).await?;
    Ok(Sidecar {
        child,
        egress,
        _dir: dir,
    })
}

fn client(http2: bool) -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .pool_max_idle_per_host(256)
        .build(connector)
}

async fn cell(
    base: String,
    size: usize,
    http2: bool,
    clients: usize,
    d: Duration,
) -> anyhow::Result<(f64, Latencies)> {
    let client = client(http2);
    let url: hyper::Uri = format!("{base}/bytes/{size}").parse()?;
    load(clients, d, move |_, _| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = client
                .request(hyper::Request::get(url).body(Empty::new())?)
                .await?;
            anyhow::ensure!(response.status() == 200, "status {}", response.status());
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::ensure!(body.len() == size, "{} bytes", body.len());
            Ok(())
        }
    })
    .await
}

/// Time to the first chunk of `/stream`, median of `n`.
async fn first_byte(base: &str, n: usize) -> anyhow::Result<f64> {
    let client = client(false);
    let mut times = Vec::new();
    for _ in 0..n {
        let began = Instant::now();
        let response = client
            .request(hyper::Request::get(format!("{base}/stream")).body(Empty::new())?)
            .await?;
        let mut body = response.into_body();
        let _first = body.frame().await;
        times.push(began.elapsed().as_secs_f64() * 1000.0);
        while body.frame().await.is_some() {}
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Established TCP connections to `port` on loopback (IPv4), from
/// `/proc/net/tcp`.
fn connections_to(port: u16) -> usize {
    let wanted = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&wanted.as_str()) && fields.get(3) == Some(&"01")
        })
        .count()
}

/// How long after the burst the idle sidecar's RSS is read again.
const SETTLE: Duration = Duration::from_secs(20);

/// A fresh sidecar's RSS, then with `n` pooled connections to the upstream
/// left idle (made by `n` concurrent slow calls; the agent's own
/// connections closed after).
async fn idle_pool_rss(port: u16, n: usize) -> anyhow::Result<(f64, f64, usize, f64, f64)> {
    let side = sidecar(port, 1).await?;
    let pid = side.child.id().unwrap_or(0);
    let fresh = statefabric_bench::rss_kib(pid) / 1024.0;
    let before = connections_to(port);
    let peak;
    {
        let client = client(false);
        let url: hyper::Uri = format!("http://127.0.0.1:{}/bench/slow", side.egress).parse()?;
        let calls = (0..n).map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let response = client
                    .request(hyper::Request::get(url).body(Empty::new())?)
                    .await?;
                anyhow::ensure!(response.status() == 200, "status {}", response.status());
                response.into_body().collect().await?;
                Ok(())
            })
        });
        let all = tokio::spawn(futures::future::join_all(calls));
        // Halfway through the upstream's 2 s: every call in flight.
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = statefabric_bench::rss_kib(pid) / 1024.0;
        for call in all.await? {
            call??;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_side = connections_to(side.egress);
    anyhow::ensure!(agent_side == 0, "{agent_side} agent connections still open");
    let just_after = statefabric_bench::rss_kib(pid) / 1024.0;
    // Settled: the pool's sweep has taken the idle sockets out of the
    // reactor and the process has had its looks at its memory since.
    tokio::time::sleep(SETTLE).await;
    let idle = connections_to(port).saturating_sub(before);
    let settled = statefabric_bench::rss_kib(pid) / 1024.0;
    Ok((fresh, peak, idle, just_after, settled))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let d = Duration::from_secs(args.seconds);
    let port = upstream().await?;
    if args.idle_only {
        return idle_report(port).await;
    }
    let side = sidecar(port, 1).await?;
    // nginx runs a worker per core: the sidecar with as many threads too.
    let side2 = sidecar(port, 2).await?;
    let proxy = nginx(port).await?;
    let direct = format!("http://127.0.0.1:{port}");
    let via_sidecar = format!("http://127.0.0.1:{}/bench", side.egress);
    let via_sidecar2 = format!("http://127.0.0.1:{}/bench", side2.egress);
    let via_nginx = format!("http://127.0.0.1:{}", proxy.port);
    println!(
        "| protocol | body | clients | direct req/s, p50 / p99 (ms) | sidecar req/s, p50 / p99 | sidecar added p50 / p99 | sidecar (2 threads) added p50 / p99 | nginx req/s, p50 / p99 | nginx added p50 / p99 |"
    );
    println!("|---|---|---:|---|---|---|---|---|---|");
    for http2 in [false, true] {
        for size in [SMALL, LARGE] {
            for clients in [1, 16, 64] {
                let direct_run = cell(direct.clone(), size, http2, clients, d).await?;
                let sidecar_run = cell(via_sidecar.clone(), size, http2, clients, d).await?;
                let sidecar2_run = cell(via_sidecar2.clone(), size, http2, clients, d).await?;
                let (t50, _, t99) = sidecar2_run.1.percentiles_ms();
                let nginx_run = if http2 {
                    None
                } else {
                    Some(cell(via_nginx.clone(), size, false, clients, d).await?)
                };
                let (d50, _, d99) = direct_run.1.percentiles_ms();
                let (s50, _, s99) = sidecar_run.1.percentiles_ms();
                let nginx_cells = nginx_run.map_or_else(
                    || "— | —".to_owned(),
                    |(rps, lat)| {
                        let (n50, _, n99) = lat.percentiles_ms();
                        format!(
                            "{rps:.0}, {n50:.3} / {n99:.3} | +{:.3} / +{:.3}",
                            n50 - d50,
                            n99 - d99
                        )
                    },
                );
                println!(
                    "| {} | {} | {clients} | {:.0}, {d50:.3} / {d99:.3} | {:.0}, {s50:.3} / {s99:.3} | +{:.3} / +{:.3} | +{:.3} / +{:.3} | {nginx_cells} |",
                    if http2 { "HTTP/2" } else { "HTTP/1.1" },
                    if size == SMALL { "128 B" } else { "64 KiB" },
                    direct_run.0,
                    sidecar_run.0,
                    s50 - d50,
                    s99 - d99,
                    t50 - d50,
                    t99 - d99,
                );
            }
        }
    }
    println!();
    println!(
        "time to first byte of a stream (median of 20): direct {:.3} ms, sidecar {:.3} ms, nginx {:.3} ms",
        first_byte(&direct, 20).await?,
        first_byte(&via_sidecar, 20).await?,
        first_byte(&via_nginx, 20).await?,
    );
    println!(
        "sidecar RSS after the run: {:.1} MiB",
        side.child
            .id()
            .map_or(0.0, |pid| statefabric_bench::rss_kib(pid) / 1024.0)
    );
    drop(proxy);
    drop(side);
    drop(side2);
    idle_report(port).await
}

async fn idle_report(port: u16) -> anyhow::Result<()> {
    let (fresh, peak, idle, just_after, settled) = idle_pool_rss(port, 1000).await?;
    println!(
        "idle upstream connections: a fresh sidecar {fresh:.1} MiB; with the 1000 calls in flight {peak:.1} MiB; 2 s after, {just_after:.1} MiB; settled ({} s later), with {idle} idle pooled connections to the upstream, {settled:.1} MiB",
        SETTLE.as_secs()
    );
    Ok(())
}
