//! The egress path through a real sidecar process, against real HTTP
//! upstreams the test starts (hyper), routed by Upstreams from the mesh
//! files with their ResiliencyPolicies:
//! - the agent's path and query reach the upstream under its base path,
//!   with the Upstream's header added; an unknown upstream gets 404 naming
//!   the known ones;
//! - 503s are retried for an idempotent call and for a POST with an
//!   `Idempotency-Key`, never for a plain POST; a 429's `retry-after-ms` is
//!   waited; an unreachable upstream is retried, then 502;
//! - the circuit breaker opens after repeated failures and then fails fast
//!   with 503 without calling the upstream;
//! - a tokens-per-minute limit takes what answers (JSON or a stream)
//!   report used off the upstream's balance, and sheds with 429 and
//!   `Retry-After` while it is in debt;
//! - a slow but steady stream arrives chunk by chunk (the first before the
//!   upstream has finished), and a stalled one is cut after the idle
//!   timeout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use statefabric_tests as env;
use statefabric_tests::process::{self, Storage};

type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// When each path was called, as the upstream saw it.
#[derive(Default)]
struct Seen {
    calls: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Seen {
    fn record(&self, path: &str) -> usize {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = calls.entry(path.to_owned()).or_default();
        list.push(Instant::now());
        list.len()
    }

    fn times(&self, path: &str) -> Vec<Instant> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

fn full(status: u16, body: &str) -> Response<UpstreamBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    response
}

/// Chunks `data: <i>` every `every`, `count` of them; `stall_after`: hang
/// after that many instead.
fn stream(count: usize, every: Duration, stall_after: Option<usize>) -> Response<UpstreamBody> {
    let frames = futures::stream::unfold(0usize, move |i| async move {
        if i == count {
            return None;
        }
        if i > 0 {
            if stall_after.is_some_and(|s| i >= s) {
                futures::future::pending::<()>().await;
            }
            tokio::time::sleep(every).await;
        }
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {i}\n\n")))),
            i + 1,
        ))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed());
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().expect("value"));
    response
}

/// The upstream's behaviour by path (below `/base`).
async fn upstream(seen: Arc<Seen>, mut request: Request<Incoming>) -> Response<UpstreamBody> {
    let path = request.uri().path().to_owned();
    let n = seen.record(&path);
    match path.as_str() {
        // A protocol upgrade: 101, then every byte echoed back.
        "/base/ws" if request.headers().contains_key("upgrade") => {
            let upgrading = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrading.await {
                    let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
            });
            let mut r = full(101, "");
            r.headers_mut()
                .insert("upgrade", "websocket".parse().expect("value"));
            r.headers_mut()
                .insert("connection", "upgrade".parse().expect("value"));
            r
        }
        "/base/echo" => {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            full(
                200,
                &serde_json::json!({
                    "path": path,
                    "query": request.uri().query(),
                    "org": header("x-org"),
                    "agent": header("x-agent"),
                })
                .to_string(),
            )
        }
        // Fails twice, then answers.
        p if p.starts_with("/base/flaky") => {
            if n <= 2 {
                full(503, "busy")
            } else {
                full(200, "ok")
            }
        }
        "/base/limited" => {
            if n == 1 {
                let mut r = full(429, "slow down");
                r.headers_mut()
                    .insert("retry-after-ms", "300".parse().expect("value"));
                r
            } else {
                full(200, "ok")
            }
        }
        "/base/broken" => full(500, "broken"),
        "/base/storm" => full(503, "overloaded"),
        p if p.starts_with("/base/counted") => full(200, &format!("{{\"n\": {n}}}")),
        "/base/slow" => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            full(200, "slow ok")
        }
        "/base/v1/chat/completions" => chat(request).await,
        "/base/stream" => stream(5, Duration::from_millis(300), None),
        "/base/stall" => stream(5, Duration::from_millis(50), Some(1)),
        _ => full(404, "no such path"),
    }
}

/// A model API in the chat-completions shape, streaming or not, that
/// answers only with the key the sidecar adds.
async fn chat(request: Request<Incoming>) -> Response<UpstreamBody> {
    let authorized = request
        .headers()
        .get("authorization")
        .is_some_and(|v| v == "Bearer sk-upstream");
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return full(400, "unreadable body"),
    };
    if !authorized {
        return full(401, r#"{"error": {"message": "missing or wrong key"}}"#);
    }
    let asked: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = asked["model"].as_str().unwrap_or("m").to_owned();
    if asked["stream"] != true {
        let mut answer = full(
            200,
            &serde_json::json!({
                "id": "c1", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hello from upstream"}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200},
            })
            .to_string(),
        );
        answer
            .headers_mut()
            .insert("content-type", "application/json".parse().expect("value"));
        return answer;
    }
    let mut events: Vec<String> = ["hel", "lo ", "stream"]
        .iter()
        .map(|piece| {
            serde_json::json!({
                "id": "c2", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}],
            })
            .to_string()
        })
        .collect();
    if asked["stream_options"]["include_usage"] == true {
        events.push(
            serde_json::json!({
                "id": "c2", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [],
                "usage": {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200},
            })
            .to_string(),
        );
    }
    events.push("[DONE]".to_owned());
    let frames = futures::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {e}\n\n"))))),
    );
    let mut response = Response::new(StreamBody::new(frames).boxed());
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().expect("value"));
    response
}

async fn start_upstream(seen: Arc<Seen>) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(upstream(seen, request).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(port)
}

fn mesh(port: u16, closed: u16) -> String {
    // The model API, as three upstreams: plain, and two under a token limit.
    let models: String = ["model", "metered", "metered-stream"]
        .iter()
        .map(|name| {
            format!(
                "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\nspec:\n  \
                 url: http://127.0.0.1:{port}/base/v1\n  headers: [{{name: Authorization, value: Bearer sk-upstream}}]\n---\n"
            )
        })
        .collect();
    format!(
        r#"apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {{name: up}}
spec:
  url: http://127.0.0.1:{port}/base
  headers: [{{name: X-Org, value: org-1}}]
---
{models}apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {{name: stormy}}
spec: {{url: "http://127.0.0.1:{port}/base"}}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {{name: narrow}}
spec: {{url: "http://127.0.0.1:{port}/base"}}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {{name: ratey}}
spec: {{url: "http://127.0.0.1:{port}/base"}}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {{name: fragile}}
spec: {{url: "http://127.0.0.1:{port}/base"}}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {{name: nowhere}}
spec: {{url: "http://127.0.0.1:{closed}"}}
---
apiVersion: statefabric.io/v1alpha1
kind: ResiliencyPolicy
metadata: {{name: calls}}
spec:
  timeouts:
    quick: {{connect: 1s, total: 10s, idle: 1s}}
  retries:
    some: {{maxAttempts: 3, initialBackoff: 50ms, maxBackoff: 200ms, retryOn: [connectError, tooManyRequests, unavailable]}}
    eager: {{maxAttempts: 5, initialBackoff: 10ms, maxBackoff: 20ms, budgetPercent: 20, minRetriesPerSecond: 1, retryOn: [unavailable]}}
  circuitBreakers:
    strict: {{consecutiveFailures: 2, openFor: 1m}}
  limits:
    two: {{maxConcurrency: 2, queue: 2, queueTimeout: 5s}}
    slowly: {{requestsPerSecond: 2}}
    tokens: {{tokensPerMinute: 120}}
  targets:
  - {{upstream: metered, limit: tokens}}
  - {{upstream: metered-stream, limit: tokens}}
  - {{upstream: up, timeout: quick, retry: some}}
  - {{upstream: nowhere, timeout: quick, retry: some}}
  - {{upstream: fragile, timeout: quick, circuitBreaker: strict}}
  - {{upstream: stormy, timeout: quick, retry: eager}}
  - {{upstream: narrow, timeout: quick, limit: two}}
  - {{upstream: ratey, timeout: quick, limit: slowly}}
"#
    )
}

struct Answer {
    status: u16,
    sidecar_error: Option<String>,
    retry_after: Option<String>,
    replayed: bool,
    body: String,
}

async fn call(
    egress: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Answer> {
    call_with(egress, method, path, headers, "{}").await
}

async fn call_with(
    egress: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Answer> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{egress}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(body.to_owned())))?)
        .await?;
    let status = response.status().as_u16();
    let sidecar_error = response
        .headers()
        .get("x-statefabric-egress-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let replayed = response.headers().contains_key("x-statefabric-replayed");
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        sidecar_error,
        retry_after,
        replayed,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[tokio::test]
async fn the_egress_path_routes_retries_breaks_and_streams() -> anyhow::Result<()> {
    let seen = Arc::new(Seen::default());
    let port = start_upstream(seen.clone()).await?;
    let closed = env::free_port();
    let dir = tempfile::tempdir()?;
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh(port, closed))?;
    let egress_port = env::free_port();
    let files = format!("[{:?}]", mesh_file.display().to_string());
    let listen = format!("127.0.0.1:{egress_port}");
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let sidecar = process::sidecar(
        Storage::Sqlite,
        &tenant,
        "agent-1",
        &[
            ("STATEFABRIC_MESH__FILES", files.as_str()),
            ("STATEFABRIC_EGRESS__ENABLED", "true"),
            ("STATEFABRIC_EGRESS__LISTEN", listen.as_str()),
        ],
    )
    .await?;
    let egress = format!("http://{listen}");

    // Routing: path, query and the Upstream's header reach the upstream.
    let echo = call(&egress, "GET", "/up/echo?x=1", &[("x-agent", "a1")]).await?;
    assert_eq!(echo.status, 200, "{}", echo.body);
    let echoed: serde_json::Value = serde_json::from_str(&echo.body)?;
    assert_eq!(echoed["path"], "/base/echo");
    assert_eq!(echoed["query"], "x=1");
    assert_eq!(echoed["org"], "org-1");
    assert_eq!(echoed["agent"], "a1");
    let unknown = call(&egress, "GET", "/elsewhere/x", &[]).await?;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.sidecar_error.as_deref(), Some("unknown_upstream"));
    let known: serde_json::Value = serde_json::from_str(&unknown.body)?;
    assert_eq!(
        known["upstreams"],
        serde_json::json!([
            "fragile",
            "metered",
            "metered-stream",
            "model",
            "narrow",
            "nowhere",
            "ratey",
            "stormy",
            "up"
        ])
    );

    // Retries: an idempotent call through two 503s; a keyed POST too; a
    // plain POST is not retried.
    let got = call(&egress, "GET", "/up/flaky-get", &[]).await?;
    assert_eq!((got.status, got.body.as_str()), (200, "ok"));
    assert_eq!(seen.times("/base/flaky-get").len(), 3);
    let keyed = call(
        &egress,
        "POST",
        "/up/flaky-keyed",
        &[("idempotency-key", "k1")],
    )
    .await?;
    assert_eq!(keyed.status, 200);
    assert_eq!(seen.times("/base/flaky-keyed").len(), 3);
    let plain = call(&egress, "POST", "/up/flaky-post", &[]).await?;
    assert_eq!(plain.status, 503, "the upstream's own answer");
    assert_eq!(plain.sidecar_error, None);
    assert_eq!(seen.times("/base/flaky-post").len(), 1, "never retried");
    // 429 with retry-after-ms: 300 is waited before the second attempt.
    let limited = call(&egress, "GET", "/up/limited", &[]).await?;
    assert_eq!(limited.status, 200);
    let times = seen.times("/base/limited");
    assert_eq!(times.len(), 2);
    assert!(
        times[1].duration_since(times[0]) >= Duration::from_millis(280),
        "waited {:?}",
        times[1].duration_since(times[0])
    );
    // Nobody listening: retried, then 502 naming the upstream.
    let refused = call(&egress, "GET", "/nowhere/x", &[]).await?;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert_eq!(refused.sidecar_error.as_deref(), Some("connect"));
    assert!(refused.body.contains("nowhere"), "{}", refused.body);

    // The retry budget: an upstream answering 503 to everything gets each
    // call once plus 20 % (and one retry a second), not five times each.
    let storm_began = Instant::now();
    for _ in 0..20 {
        assert_eq!(
            call(&egress, "GET", "/stormy/storm", &[]).await?.status,
            503
        );
    }
    let seconds = storm_began.elapsed().as_secs_f64().ceil() as usize;
    let sent = seen.times("/base/storm").len();
    assert!(
        (20..=20 + 4 + seconds + 1).contains(&sent),
        "{sent} upstream calls for 20 requests in {seconds} s"
    );

    // Limits: two slots and two places in the queue; of eight calls at
    // once, four are served (two of them after waiting) and four are shed
    // at once with 503 and Retry-After, never reaching the upstream.
    let burst =
        futures::future::join_all((0..8).map(|_| call(&egress, "GET", "/narrow/slow", &[]))).await;
    let mut served = 0;
    for answer in burst {
        let answer = answer?;
        match answer.status {
            200 => served += 1,
            503 => {
                assert_eq!(answer.sidecar_error.as_deref(), Some("overloaded"));
                assert_eq!(answer.retry_after.as_deref(), Some("1"));
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert_eq!(served, 4);
    assert_eq!(seen.times("/base/slow").len(), 4);
    // Two requests a second: the third at once is shed with 429.
    for _ in 0..2 {
        assert_eq!(call(&egress, "GET", "/ratey/echo", &[]).await?.status, 200);
    }
    let limited = call(&egress, "GET", "/ratey/echo", &[]).await?;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.sidecar_error.as_deref(), Some("rate_limited"));
    assert_eq!(limited.retry_after.as_deref(), Some("1"));

    // The breaker: two 500s open it; the third call fails fast, unsent.
    for _ in 0..2 {
        assert_eq!(
            call(&egress, "GET", "/fragile/broken", &[]).await?.status,
            500
        );
    }
    let fast = call(&egress, "GET", "/fragile/broken", &[]).await?;
    assert_eq!(fast.status, 503);
    assert_eq!(fast.sidecar_error.as_deref(), Some("circuit_open"));
    assert!(fast.body.contains("fragile"), "{}", fast.body);
    assert_eq!(seen.times("/base/broken").len(), 2, "not called while open");

    // Streams: a slow, steady one arrives whole and chunk by chunk; a
    // stalled one is cut after the idle timeout (1 s).
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let response = client
        .request(Request::get(format!("{egress}/up/stream")).body(Full::new(Bytes::new()))?)
        .await?;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut chunks = Vec::new();
    let mut first_at = None;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            first_at.get_or_insert_with(|| started.elapsed());
            chunks.push(String::from_utf8_lossy(&data).into_owned());
        }
    }
    assert_eq!(chunks.concat().matches("data: ").count(), 5, "{chunks:?}");
    let first_at = first_at.unwrap_or_default();
    assert!(
        first_at + Duration::from_millis(900) < started.elapsed(),
        "the first chunk ({first_at:?}) came long before the last ({:?})",
        started.elapsed()
    );
    let stalled = client
        .request(Request::get(format!("{egress}/up/stall")).body(Full::new(Bytes::new()))?)
        .await?;
    let cut = tokio::time::timeout(Duration::from_secs(10), stalled.into_body().collect()).await;
    match cut {
        Ok(Err(_)) => {}
        Ok(Ok(whole)) => panic!(
            "a stalled stream ended cleanly: {:?}",
            String::from_utf8_lossy(&whole.to_bytes())
        ),
        Err(_) => panic!("a stalled stream was not cut within 10 s (idle timeout 1 s)"),
    }

    // Replay: a keyed call reaches the upstream once; its repeat is
    // answered from the record (marked), a task-keyed stream too; the same
    // key with another request is refused.
    replay_checks(&egress, &seen).await?;

    // An upgrade (WebSocket's handshake) is tunnelled: 101 from the
    // upstream, then bytes both ways through the sidecar.
    upgrade_check(&listen).await?;

    // A client that is not ours: the openai package, its base_url pointed
    // at the sidecar, holding no key (the sidecar adds the Upstream's).
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="the-agent-holds-no-key", max_retries=0)
reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
print(reply.choices[0].message.content)
stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
print("".join(chunk.choices[0].delta.content or "" for chunk in stream))
"#;
    let python = std::env::var("STATEFABRIC_TEST_PYTHON").map_err(|_| {
        anyhow::anyhow!("STATEFABRIC_TEST_PYTHON: source the env.sh testenv/up.sh writes")
    })?;
    let output = tokio::process::Command::new(python)
        .args(["-c", script, &format!("{egress}/model")])
        .output()
        .await?;
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        ["hello from upstream", "hello stream"]
    );

    // Model tokens: an answer reports 200 used of the 120 a minute allowed;
    // the next call would wait ~40 s for that debt to be repaid, longer
    // than its queue timeout: 429 saying when to come back. A stream's
    // usage (its last event) counts the same.
    let ask = r#"{"model": "m", "messages": []}"#;
    let ask_streamed = r#"{"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true}}"#;
    for (upstream, body) in [("metered", ask), ("metered-stream", ask_streamed)] {
        let path = format!("/{upstream}/chat/completions");
        let first = call_with(&egress, "POST", &path, &[], body).await?;
        assert_eq!(first.status, 200, "{upstream}: {}", first.body);
        let second = call_with(&egress, "POST", &path, &[], body).await?;
        assert_eq!(
            (second.status, second.sidecar_error.as_deref()),
            (429, Some("rate_limited")),
            "{upstream}: {}",
            second.body
        );
        let after: u64 = second
            .retry_after
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            (35..=45).contains(&after),
            "{upstream}: Retry-After {after}"
        );
    }

    // Metrics per upstream.
    let metrics = env::http("GET", &format!("{}/metrics", sidecar.admin), None, None)
        .await?
        .body;
    assert!(
        metrics.contains(r#"statefabric_egress_requests_total{upstream="up",class="2xx"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"statefabric_egress_retries_total{upstream="up",reason="unavailable"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"statefabric_egress_retry_budget_exhausted_total{upstream="stormy"}"#),
        "{metrics}"
    );
    // Bytes both ways, and the limited upstream's queue (empty by now).
    let counted = |needle: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert!(
        counted(r#"statefabric_egress_bytes_total{upstream="up",direction="received"}"#)
            .is_some_and(|n| n > 0.0),
        "{metrics}"
    );
    assert!(
        counted(r#"statefabric_egress_bytes_total{upstream="up",direction="sent"}"#)
            .is_some_and(|n| n > 0.0),
        "{metrics}"
    );
    assert_eq!(
        counted(r#"statefabric_egress_queued_calls{upstream="narrow"}"#),
        Some(0.0),
        "{metrics}"
    );
    for upstream in ["metered", "metered-stream"] {
        assert_eq!(
            counted(&format!(
                r#"statefabric_egress_model_tokens_total{{upstream="{upstream}"}}"#
            )),
            Some(200.0),
            "{metrics}"
        );
    }
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}

/// What a keyed call and its repeats get (see the test's replay part).
async fn replay_checks(egress: &str, seen: &Seen) -> anyhow::Result<()> {
    let key = [("idempotency-key", "order-1")];
    let first = call_with(egress, "POST", "/up/counted-1", &key, r#"{"a": 1}"#).await?;
    assert_eq!(
        (first.status, first.replayed),
        (200, false),
        "{}",
        first.body
    );
    let again = call_with(egress, "POST", "/up/counted-1", &key, r#"{"a": 1}"#).await?;
    assert_eq!(
        (again.status, again.replayed),
        (200, true),
        "{}",
        again.body
    );
    assert_eq!(again.body, first.body, "the recorded answer");
    assert_eq!(seen.times("/base/counted-1").len(), 1, "the upstream once");
    let other = call_with(egress, "POST", "/up/counted-1", &key, r#"{"a": 2}"#).await?;
    assert_eq!(other.status, 422, "{}", other.body);
    assert_eq!(other.sidecar_error.as_deref(), Some("key_reused"));
    // A stream under a task key: recorded whole, replayed whole.
    let task = [("x-statefabric-task-key", "saga-9/CODE/1/call-1")];
    let before = seen.times("/base/stream").len();
    let streamed = call(egress, "GET", "/up/stream", &task).await?;
    let replayed = call(egress, "GET", "/up/stream", &task).await?;
    assert_eq!(streamed.body.matches("data: ").count(), 5);
    assert_eq!((replayed.replayed, replayed.body), (true, streamed.body));
    assert_eq!(seen.times("/base/stream").len(), before + 1);
    Ok(())
}

/// Records are in the sidecar's store: a restarted sidecar (Postgres)
/// answers a repeat without calling the upstream again.
#[tokio::test]
async fn a_recorded_answer_survives_a_sidecar_restart() -> anyhow::Result<()> {
    let seen = Arc::new(Seen::default());
    let port = start_upstream(seen.clone()).await?;
    let dir = tempfile::tempdir()?;
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh(port, env::free_port()))?;
    let files = format!("[{:?}]", mesh_file.display().to_string());
    let listen = format!("127.0.0.1:{}", env::free_port());
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let vars = [
        ("STATEFABRIC_MESH__FILES", files.as_str()),
        ("STATEFABRIC_EGRESS__ENABLED", "true"),
        ("STATEFABRIC_EGRESS__LISTEN", listen.as_str()),
    ];
    let egress = format!("http://{listen}");
    let key = [("x-statefabric-task-key", "saga-1/PLAN/1/call-1")];
    let sidecar = process::sidecar(Storage::Postgres, &tenant, "agent-1", &vars).await?;
    let first = call_with(&egress, "POST", "/up/counted-restart", &key, "{}").await?;
    assert_eq!((first.status, first.replayed), (200, false));
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    let sidecar = process::sidecar(Storage::Postgres, &tenant, "agent-1", &vars).await?;
    let again = call_with(&egress, "POST", "/up/counted-restart", &key, "{}").await?;
    assert_eq!((again.status, again.replayed), (200, true));
    assert_eq!(again.body, first.body);
    assert_eq!(seen.times("/base/counted-restart").len(), 1);
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}

/// A raw HTTP/1.1 upgrade through the egress listener at `listen`.
async fn upgrade_check(listen: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(listen).await?;
    stream
        .write_all(
            b"GET /up/ws HTTP/1.1\r\nHost: sidecar\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(
            stream.read(&mut byte).await? == 1,
            "closed during the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in ["hello through the tunnel", "and back again"] {
        stream.write_all(message.as_bytes()).await?;
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed)).await??;
        assert_eq!(echoed, message.as_bytes());
    }
    Ok(())
}
