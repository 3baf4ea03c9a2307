//! The injector's webhook latency: AdmissionReviews of a typical agent pod
//! (two app containers, an init container, volumes, env) sent over HTTPS
//! to a release-built injector, as the API server sends them (one kept-alive
//! connection per concurrent caller), at 1 and 16 callers, as real reviews
//! (each then records an Event through the API server, after the answer)
//! and as dry runs (no Event); and the size of the patch it answers with. The baseline, in the same run: the same
//! decision made by calling `statefabric_injector::patch::decide` directly
//! (what the webhook adds is TLS, HTTP, parsing and the namespace lookup).
//!
//! Needs the test environment (`testenv/up.sh`: the API server the
//! injector watches namespaces on, and the test CA) and a release build:
//!   cargo build --release -p statefabric-injector -p statefabric-bench --bin injector-bench
//!   "${CARGO_TARGET_DIR:-target}"/release/injector-bench --requests 4000

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use statefabric_bench::{Latencies, report};
use statefabric_injector::config::SidecarTemplate;
use statefabric_injector::patch::{Decision, Injection, NamespaceInfo, decide};
use statefabric_tests as env;
use statefabric_tests::kube::{TestNamespace, kubectl, pki_dir};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
struct Args {
    /// Reviews per scenario.
    #[arg(long, default_value_t = 4000)]
    requests: usize,
}

const POD: &str = r#"{
  "apiVersion": "v1", "kind": "Pod",
  "metadata": {"generateName": "coder-7d9f-", "labels": {"app": "coder"},
    "annotations": {"statefabric.io/inject": "true", "statefabric.io/agent-type": "coder",
                    "statefabric.io/sidecar-memory": "96Mi"},
    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "coder-7d9f",
                         "uid": "6a1c2f1e-1111-4222-8333-944445555666", "controller": true}]},
  "spec": {
    "serviceAccountName": "coder",
    "initContainers": [{"name": "fetch-model", "image": "fetch:1", "args": ["--to", "/models"],
                        "volumeMounts": [{"name": "models", "mountPath": "/models"}]}],
    "containers": [
      {"name": "agent", "image": "agent:1.4", "ports": [{"containerPort": 8080}],
       "env": [{"name": "MODEL", "value": "small"}, {"name": "LOG", "value": "info"}],
       "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
       "volumeMounts": [{"name": "models", "mountPath": "/models"}]},
      {"name": "tools", "image": "tools:2", "env": [{"name": "MODE", "value": "sandbox"}]}
    ],
    "volumes": [{"name": "models", "emptyDir": {}}]
  }
}"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = env::kube::client().await?;
    let namespace = TestNamespace::create(&admin).await?;
    let ns = namespace.name.clone();
    kubectl(
        &["label", "namespace", &ns, "statefabric.io/tenant=bench"],
        None,
    )
    .await?;
    let port = env::free_port();
    let injector = start_injector(port).await?;
    let mut pod: Value = serde_json::from_str(POD)?;
    pod["metadata"]["namespace"] = json!(ns);
    let review = |uid: usize, dry_run: bool| {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": format!("bench-{uid}"),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE", "namespace": ns, "userInfo": {"username": "bench"},
                "object": pod, "dryRun": dry_run
            }
        })
        .to_string()
    };

    // The baseline: the same decision as a direct call.
    let typed: Pod = serde_json::from_value(pod.clone())?;
    let info = NamespaceInfo {
        name: ns.clone(),
        labels: BTreeMap::from([("statefabric.io/tenant".to_owned(), "bench".to_owned())]),
        annotations: BTreeMap::new(),
    };
    let injection = Injection::new(SidecarTemplate::default(), "statefabric-system");
    let mut direct = Latencies::default();
    let started = Instant::now();
    let mut patch_bytes = 0;
    for _ in 0..args.requests {
        let t = Instant::now();
        let decision = decide(&typed, &info, &injection);
        direct.record(t.elapsed());
        if let Ok(Decision::Inject(ops)) = decision {
            patch_bytes = serde_json::to_vec(&ops)?.len();
        }
    }
    let direct_rate = args.requests as f64 / started.elapsed().as_secs_f64();

    println!(
        "injector-bench: {} reviews per scenario, namespace {ns}",
        args.requests
    );
    // A real review (the injector then records an Event through the API
    // server, after answering) and a dry run (no Event).
    for (callers, dry_run) in [(1usize, false), (1, true), (16, false), (16, true)] {
        let per_caller = args.requests / callers;
        let mut tasks = Vec::new();
        let started = Instant::now();
        for caller in 0..callers {
            let bodies: Vec<String> = (0..per_caller)
                .map(|i| review(caller * per_caller + i, dry_run))
                .collect();
            tasks.push(tokio::spawn(caller_loop(port, bodies)));
        }
        let mut all = Latencies::default();
        let mut sizes = 0;
        for task in tasks {
            let (latencies, patch) = task.await??;
            all.merge(&latencies);
            sizes = patch;
        }
        let rate = (per_caller * callers) as f64 / started.elapsed().as_secs_f64();
        report(
            &format!(
                "webhook, {callers} caller(s){}",
                if dry_run { ", dry run" } else { "" }
            ),
            rate,
            "reviews",
            Some(&all),
        );
        if !dry_run {
            println!("  patch: {sizes} bytes of JSON Patch (base64 in the review)");
        }
    }
    report(
        "  baseline: decide() called directly",
        direct_rate,
        "decisions",
        Some(&direct),
    );
    println!("  patch: {patch_bytes} bytes of JSON Patch");
    drop(injector);
    namespace.delete().await
}

async fn start_injector(port: u16) -> anyhow::Result<Child> {
    let binary = std::env::current_exe()?.with_file_name("statefabric-injector");
    anyhow::ensure!(
        binary.is_file(),
        "{} missing: build it with --release first",
        binary.display()
    );
    let admin = env::free_port();
    let pki = pki_dir();
    let child = Command::new(binary)
        .env("KUBECONFIG", env::kube::kubeconfig_path())
        .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("STATEFABRIC_WEBHOOK__LISTEN", format!("127.0.0.1:{port}"))
        .env("STATEFABRIC_WEBHOOK__TLS_CERT", pki.join("mesh.crt"))
        .env("STATEFABRIC_WEBHOOK__TLS_KEY", pki.join("mesh.key"))
        .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()?;
    statefabric_bench::wait_ready("injector", admin).await?;
    // Its namespace watch has seen the bench's namespace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(child)
}

/// One caller: one TLS connection, kept alive, a review at a time.
async fn caller_loop(port: u16, bodies: Vec<String>) -> anyhow::Result<(Latencies, usize)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki_dir().join("ca.crt"))? {
        roots.add(cert?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut latencies = Latencies::default();
    let mut patch = 0;
    for body in bodies {
        let request = hyper::Request::post("/mutate")
            .header("content-type", "application/json")
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::from(body)))?;
        let t = Instant::now();
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        latencies.record(t.elapsed());
        anyhow::ensure!(status == 200, "HTTP {status}");
        let answer: Value = serde_json::from_slice(&bytes)?;
        let encoded = answer["response"]["patch"]
            .as_str()
            .context("no patch: the pod was not injected")?;
        patch = base64_len(encoded);
    }
    Ok((latencies, patch))
}

/// Decoded length of base64 text.
fn base64_len(encoded: &str) -> usize {
    let padding = encoded.bytes().rev().take_while(|b| *b == b'=').count();
    encoded.len() / 4 * 3 - padding
}
