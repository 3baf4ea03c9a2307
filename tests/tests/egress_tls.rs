//! The egress path to upstreams that are not plain HTTP/1.1: over TLS with
//! a certificate from the test CA (trusted through `egress.ca_file`),
//! speaking HTTP/2 when the upstream offers it by ALPN; one that resets
//! every connection (retried, then answered 502 naming the upstream); and
//! an upstream whose certificate the sidecar does not trust (refused, not
//! sent); an Upstream's own CA and server name, and its API key, from
//! labelled Secrets (the key reaches the upstream, never the agent; an
//! unlabelled or missing Secret makes the route refuse calls, naming it);
//! the forward-proxy mode with curl as the client: `HTTP_PROXY` requests
//! go through the whole stack (the Upstream's header added), `CONNECT`
//! tunnels reach an Upstream's TLS host end to end, and a host that is no
//! Upstream's is refused with 404 either way.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use statefabric_tests::process::{self, Storage};

/// An HTTPS upstream with the certificate `cert` (and its `key`) offering
/// h2 and http/1.1; it answers with the protocol the request came in.
async fn tls_upstream(cert: &Path, key: &Path) -> anyhow::Result<u16> {
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let mut body = format!("{:?} {}", request.version(), request.uri().path());
                        if let Some(key) = request.headers().get("authorization") {
                            body.push_str(&format!(" auth={}", key.to_str().unwrap_or("?")));
                        }
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(port)
}

/// An upstream that accepts connections and resets them at once.
async fn resetting_upstream() -> anyhow::Result<(u16, Arc<std::sync::atomic::AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Linger 0: closing sends RST, not FIN.
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    Ok((port, accepted))
}

async fn get(url: &str) -> anyhow::Result<(u16, Option<String>, String)> {
    get_with(url, false).await
}

/// As [`get`], over HTTP/1.1 or (`http2`) h2c with prior knowledge, as a
/// gRPC client talks to the egress listener.
async fn get_with(url: &str, http2: bool) -> anyhow::Result<(u16, Option<String>, String)> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http();
    let response = client
        .request(hyper::Request::get(url).body(Empty::<Bytes>::new())?)
        .await?;
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("x-statefabric-egress-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, kind, String::from_utf8_lossy(&body).into_owned()))
}

/// A self-signed certificate for 127.0.0.1 that no trusted CA signed.
async fn self_signed(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("rogue.crt"), dir.join("rogue.key"));
    let made = tokio::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=rogue",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .await?;
    anyhow::ensure!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    Ok((cert, key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http2_and_resetting_upstreams_through_the_egress() -> anyhow::Result<()> {
    let pki = statefabric_tests::kube::pki_dir();
    let tls = tls_upstream(&pki.join("mesh.crt"), &pki.join("mesh.key")).await?;
    let dir = tempfile::tempdir()?;
    let (rogue_cert, rogue_key) = self_signed(dir.path()).await?;
    let rogue = tls_upstream(&rogue_cert, &rogue_key).await?;
    let (resetting, accepted) = resetting_upstream().await?;
    let upstream = |name: &str, spec: String| {
        format!(
            "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n"
        )
    };
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        [
            upstream(
                "secure",
                format!(r#"{{url: "https://localhost:{tls}/api"}}"#),
            ),
            upstream(
                "secure-http1",
                format!(r#"{{url: "https://localhost:{tls}/api", protocol: http1}}"#),
            ),
            upstream(
                "untrusted",
                format!(r#"{{url: "https://127.0.0.1:{rogue}/api"}}"#),
            ),
            upstream(
                "flaky",
                format!(r#"{{url: "http://127.0.0.1:{resetting}"}}"#),
            ),
            "apiVersion: statefabric.io/v1alpha1
kind: ResiliencyPolicy
metadata: {name: retrying}
spec:
  retries:
    thrice: {maxAttempts: 3, initialBackoff: 10ms, maxBackoff: 20ms, retryOn: [connectError]}
  targets:
  - {upstream: flaky, retry: thrice}
"
            .to_owned(),
        ]
        .concat(),
    )?;
    let listen = format!("127.0.0.1:{}", statefabric_tests::free_port());
    let ca = statefabric_tests::kube::pki_dir().join("ca.crt");
    let files = format!("[{:?}]", mesh.display().to_string());
    let ca = ca.display().to_string();
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let vars = [
        ("STATEFABRIC_MESH__FILES", files.as_str()),
        ("STATEFABRIC_EGRESS__ENABLED", "true"),
        ("STATEFABRIC_EGRESS__LISTEN", listen.as_str()),
        ("STATEFABRIC_EGRESS__CA_FILE", ca.as_str()),
    ];
    let sidecar = process::sidecar(Storage::Sqlite, &tenant, "agent-1", &vars).await?;
    let egress = format!("http://{listen}");

    // TLS with the test CA; HTTP/2 by ALPN, or HTTP/1.1 when the Upstream says so.
    let (status, _, body) = get(&format!("{egress}/secure/hello")).await?;
    assert_eq!((status, body.as_str()), (200, "HTTP/2.0 /api/hello"));
    let (status, _, body) = get(&format!("{egress}/secure-http1/hello")).await?;
    assert_eq!((status, body.as_str()), (200, "HTTP/1.1 /api/hello"));
    // The agent speaking h2c: its requests carry the listener's own
    // authority, and the path still names the upstream (not the forward
    // proxy's absolute form, which is HTTP/1's).
    for upstream in ["secure", "secure-http1"] {
        let (status, _, body) = get_with(&format!("{egress}/{upstream}/hello"), true).await?;
        assert_eq!(status, 200, "{upstream} over h2c: {body}");
        assert!(body.ends_with(" /api/hello"), "{body}");
    }

    // A certificate no trusted CA signed: refused, nothing sent.
    let (status, kind, body) = get(&format!("{egress}/untrusted/hello")).await?;
    assert_eq!((status, kind.as_deref()), (502, Some("connect")), "{body}");
    assert!(body.contains("untrusted"), "{body}");

    // Every connection reset: tried three times (the policy), then 502.
    let (status, kind, body) = get(&format!("{egress}/flaky/x")).await?;
    assert_eq!(status, 502, "{body}");
    assert_eq!(kind.as_deref(), Some("connect"));
    assert!(body.contains("flaky"), "{body}");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "the first try and two retries"
    );
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}

/// The Upstream's own CA (a Secret's `ca.crt`) alone verifies it, with its
/// `serverName` when the URL's host is not in the certificate; the API key
/// comes from a Secret. No `egress.ca_file`: the sidecar's own roots do not
/// know the test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_own_ca_server_name_and_key_come_from_secrets() -> anyhow::Result<()> {
    let pki = statefabric_tests::kube::pki_dir();
    let tls = tls_upstream(&pki.join("mesh.crt"), &pki.join("mesh.key")).await?;
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt"))?;
    let indented: String = ca_pem.lines().map(|l| format!("    {l}\n")).collect();
    let upstream = |name: &str, spec: String| {
        format!(
            "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n"
        )
    };
    let key = "sk-test-7f3a9c";
    let secrets = format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: test-ca, labels: {{statefabric.io/egress: "true"}}}}
stringData:
  ca.crt: |
{indented}---
apiVersion: v1
kind: Secret
metadata: {{name: api-key, labels: {{statefabric.io/egress: "true"}}}}
stringData: {{token: "Bearer {key}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: unlabelled}}
stringData: {{token: "Bearer other"}}
---
"#
    );
    // mesh.crt names 127.0.0.1 and localhost, not api.internal.
    let own = |extra: &str| {
        format!(r#"{{url: "https://127.0.0.1:{tls}/api", tls: {{ca: {{name: test-ca}}{extra}}}"#)
    };
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        [
            secrets,
            upstream("own-ca", format!("{}}}", own(""))),
            upstream("by-name", format!("{}}}", own(", serverName: localhost"))),
            upstream("wrong-name", format!("{}}}", own(", serverName: api.internal"))),
            upstream(
                "system-roots",
                format!(r#"{{url: "https://127.0.0.1:{tls}/api"}}"#),
            ),
            upstream(
                "keyed",
                format!(
                    "{}, headers: [{{name: Authorization, secretKeyRef: {{name: api-key, key: token}}}}]}}",
                    own("")
                ),
            ),
            upstream(
                "unlabelled-key",
                format!(
                    "{}, headers: [{{name: Authorization, secretKeyRef: {{name: unlabelled, key: token}}}}]}}",
                    own("")
                ),
            ),
            upstream(
                "missing-ca",
                format!(r#"{{url: "https://127.0.0.1:{tls}/api", tls: {{ca: {{name: absent}}}}}}"#),
            ),
        ]
        .concat(),
    )?;
    let listen = format!("127.0.0.1:{}", statefabric_tests::free_port());
    let files = format!("[{:?}]", mesh.display().to_string());
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let vars = [
        ("STATEFABRIC_MESH__FILES", files.as_str()),
        ("STATEFABRIC_EGRESS__ENABLED", "true"),
        ("STATEFABRIC_EGRESS__LISTEN", listen.as_str()),
    ];
    let sidecar = process::sidecar(Storage::Sqlite, &tenant, "agent-1", &vars).await?;
    let egress = format!("http://{listen}");

    for name in ["own-ca", "by-name"] {
        let (status, _, body) = get(&format!("{egress}/{name}/hello")).await?;
        assert_eq!(
            (status, body.as_str()),
            (200, "HTTP/2.0 /api/hello"),
            "{name}"
        );
    }
    for name in ["wrong-name", "system-roots"] {
        let (status, kind, body) = get(&format!("{egress}/{name}/hello")).await?;
        assert_eq!(
            (status, kind.as_deref()),
            (502, Some("connect")),
            "{name}: {body}"
        );
        assert!(body.contains("certificate"), "{name}: {body}");
    }

    // The key reaches the upstream; the agent's answer holds only what the
    // upstream chose to say (this one echoes it, to show it arrived).
    let (status, _, body) = get(&format!("{egress}/keyed/hello")).await?;
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            format!("HTTP/2.0 /api/hello auth=Bearer {key}").as_str()
        )
    );

    // A Secret without the label, or none at all: the route refuses calls
    // (nothing is sent without its key), naming the Secret.
    for (name, secret) in [("unlabelled-key", "unlabelled"), ("missing-ca", "absent")] {
        let (status, kind, body) = get(&format!("{egress}/{name}/hello")).await?;
        assert_eq!(
            (status, kind.as_deref()),
            (503, Some("upstream_unusable")),
            "{name}: {body}"
        );
        assert!(
            body.contains(&format!("Secret {secret} key")),
            "{name}: {body}"
        );
        assert!(body.contains("statefabric.io/egress=true"), "{body}");
    }
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains(key), "the key is never logged");
    Ok(())
}

/// A plain HTTP upstream answering with the path and the `x-org` header it
/// got.
async fn echo_upstream() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let org = request
                            .headers()
                            .get("x-org")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        let body = format!("{} org={org}", request.uri().path());
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
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

/// `curl` through the sidecar as its proxy: (exit code, status, body).
async fn curl_via(proxy: &str, url: &str, ca: &Path) -> anyhow::Result<(i32, String, String)> {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(["--proxy", proxy, "--cacert"])
        .arg(ca)
        .arg(url)
        // Only the explicit proxy: none from the environment.
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env("NO_PROXY", "")
        .output()
        .await?;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = printed.rsplit_once('\n').unwrap_or(("", printed.as_str()));
    Ok((
        output.status.code().unwrap_or(-1),
        status.trim().to_owned(),
        format!("{body}{}", String::from_utf8_lossy(&output.stderr)),
    ))
}

/// The forward-proxy mode, driven by curl: plain `http://` through the
/// whole stack, `https://` by a `CONNECT` tunnel, only to Upstreams' hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_uses_the_sidecar_as_its_http_and_https_proxy() -> anyhow::Result<()> {
    let pki = statefabric_tests::kube::pki_dir();
    let tls = tls_upstream(&pki.join("mesh.crt"), &pki.join("mesh.key")).await?;
    let plain = echo_upstream().await?;
    let elsewhere = statefabric_tests::free_port();
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: secure}}\n\
             spec: {{url: \"https://localhost:{tls}/api\"}}\n---\n\
             apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: tools}}\n\
             spec: {{url: \"http://127.0.0.1:{plain}/v1\", headers: [{{name: X-Org, value: org-1}}]}}\n"
        ),
    )?;
    let listen = format!("127.0.0.1:{}", statefabric_tests::free_port());
    let files = format!("[{:?}]", mesh.display().to_string());
    let ca = pki.join("ca.crt");
    let ca_file = ca.display().to_string();
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let vars = [
        ("STATEFABRIC_MESH__FILES", files.as_str()),
        ("STATEFABRIC_EGRESS__ENABLED", "true"),
        ("STATEFABRIC_EGRESS__LISTEN", listen.as_str()),
        ("STATEFABRIC_EGRESS__CA_FILE", ca_file.as_str()),
    ];
    let sidecar = process::sidecar(Storage::Sqlite, &tenant, "agent-1", &vars).await?;
    let proxy = format!("http://{listen}");

    // HTTP_PROXY: the whole stack, the Upstream's header added.
    let (code, status, body) =
        curl_via(&proxy, &format!("http://127.0.0.1:{plain}/v1/echo"), &ca).await?;
    assert_eq!((code, status.as_str()), (0, "200"), "{body}");
    assert_eq!(body, "/v1/echo org=org-1");
    // A host no Upstream names: 404 listing the known ones.
    let (_, status, body) =
        curl_via(&proxy, &format!("http://127.0.0.1:{elsewhere}/x"), &ca).await?;
    assert_eq!(status, "404", "{body}");
    assert!(body.contains("secure") && body.contains("tools"), "{body}");

    // HTTPS_PROXY: a CONNECT tunnel, TLS end to end with the upstream.
    let (code, status, body) =
        curl_via(&proxy, &format!("https://localhost:{tls}/api/hello"), &ca).await?;
    assert_eq!((code, status.as_str()), (0, "200"), "{body}");
    assert!(body.ends_with("/api/hello"), "{body}");
    // No tunnel to a host that is no Upstream's.
    let (code, _, body) = curl_via(&proxy, &format!("https://localhost:{elsewhere}/"), &ca).await?;
    assert_ne!(code, 0, "{body}");
    assert!(body.contains("404"), "{body}");

    let metrics = statefabric_tests::http("GET", &format!("{}/metrics", sidecar.admin), None, None)
        .await?
        .body;
    for upstream in ["secure", "tools"] {
        assert!(
            metrics.contains(&format!(
                r#"statefabric_egress_requests_total{{upstream="{upstream}",class="2xx"}}"#
            )),
            "{metrics}"
        );
    }
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}
