//! W3C trace context through the egress path: a call becomes one client
//! span in the agent's trace, exported to a real OTLP collector, and the
//! upstream gets the trace context of that span; a call without context
//! starts a trace; a sidecar that exports nothing passes the agent's
//! context on untouched.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use statefabric_tests::otlp::{Collector, export_vars};
use statefabric_tests::process::{self, Storage};

/// An upstream that answers 200 and keeps each request's `traceparent`.
async fn upstream() -> anyhow::Result<(u16, Arc<Mutex<Vec<Option<String>>>>)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let traceparent = request
                        .headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    kept.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(traceparent);
                    async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((port, seen))
}

async fn get(egress: &str, traceparent: Option<&str>) -> anyhow::Result<u16> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let mut request = hyper::Request::get(format!("{egress}/up/x"));
    if let Some(value) = traceparent {
        request = request.header("traceparent", value);
    }
    let response = client.request(request.body(Empty::<Bytes>::new())?).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

fn last(seen: &Mutex<Vec<Option<String>>>) -> Option<String> {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .last()
        .cloned()
        .flatten()
}

/// `traceparent`'s parts: version, trace id, parent (span) id, flags.
fn parts(traceparent: &str) -> Vec<&str> {
    traceparent.split('-').collect()
}

async fn sidecar_with_egress(
    port: u16,
    extra: &[(&'static str, String)],
) -> anyhow::Result<(process::Service, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: statefabric.io/v1alpha1\nkind: Upstream\nmetadata: {{name: up}}\nspec: {{url: \"http://127.0.0.1:{port}\"}}\n"
        ),
    )?;
    let listen = format!("127.0.0.1:{}", statefabric_tests::free_port());
    let mut vars = vec![
        (
            "STATEFABRIC_MESH__FILES",
            format!("[{:?}]", mesh.display().to_string()),
        ),
        ("STATEFABRIC_EGRESS__ENABLED", "true".to_owned()),
        ("STATEFABRIC_EGRESS__LISTEN", listen.clone()),
    ];
    vars.extend(extra.iter().cloned());
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let sidecar = process::sidecar(
        Storage::Sqlite,
        &tenant,
        "agent-1",
        &process::borrowed(&vars),
    )
    .await?;
    Ok((sidecar, format!("http://{listen}"), dir))
}

const AGENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn an_egress_call_is_a_span_in_the_agents_trace_and_the_upstream_continues_it()
-> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let (port, seen) = upstream().await?;
    let (sidecar, egress, _dir) = sidecar_with_egress(port, &export_vars(&collector)).await?;

    let agent = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    assert_eq!(get(&egress, Some(&agent)).await?, 200);
    let sent = last(&seen).expect("the upstream got a traceparent");
    let sent = parts(&sent);
    assert_eq!(sent[1], AGENT_TRACE, "the agent's trace goes on");
    assert_ne!(sent[2], AGENT_SPAN, "under the sidecar's span");
    let span = collector
        .span("the egress span", Duration::from_secs(15), |s| {
            s.name == "egress" && s.trace_id == AGENT_TRACE
        })
        .await?;
    assert_eq!(span.service, "statefabric-sidecar");
    assert_eq!(
        span.parent_span_id, AGENT_SPAN,
        "a child of the agent's span"
    );
    assert_eq!(span.span_id, sent[2], "the upstream's parent is this span");
    assert_eq!(
        span.attributes.get("upstream").map(String::as_str),
        Some("up")
    );
    assert_eq!(
        span.attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );

    // A call without context starts a trace of its own.
    assert_eq!(get(&egress, None).await?, 200);
    let started = last(&seen).expect("a traceparent for a call without one");
    let started = parts(&started);
    assert_ne!(started[1], AGENT_TRACE);
    collector
        .span("the root egress span", Duration::from_secs(15), |s| {
            s.name == "egress" && s.trace_id == started[1] && s.parent_span_id.is_empty()
        })
        .await?;
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}

#[tokio::test]
async fn without_trace_export_the_agents_context_passes_unchanged() -> anyhow::Result<()> {
    let (port, seen) = upstream().await?;
    let (sidecar, egress, _dir) = sidecar_with_egress(port, &[]).await?;
    let agent = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    assert_eq!(get(&egress, Some(&agent)).await?, 200);
    assert_eq!(last(&seen), Some(agent));
    assert_eq!(get(&egress, None).await?, 200);
    assert_eq!(last(&seen), None, "nothing invented without export");
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}
