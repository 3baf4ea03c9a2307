//! `fabric sagas …`: the operator API from the command line, with readable
//! output (a table, a saga with its history, a graph as Mermaid or DOT).
//! Errors from the API are printed as it words them, with a failing exit.

use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use clap::Subcommand;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub(crate) struct Target {
    /// The control plane's operator API.
    #[arg(long, env = "STATEFABRIC_API", default_value = "http://127.0.0.1:7502")]
    api: String,
    /// An operator's bearer token (not needed for `fabric dev`).
    #[arg(long, env = "STATEFABRIC_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SagasCommand {
    /// Lists sagas, newest first.
    List {
        #[arg(long)]
        definition: Option<String>,
        #[arg(long)]
        status: Option<String>,
        /// Started longer ago than this (e.g. 10m).
        #[arg(long)]
        older_than: Option<String>,
        /// Only sagas flagged stuck.
        #[arg(long)]
        stuck: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One saga: its state, tasks and history.
    Show {
        id: String,
    },
    /// Starts a saga.
    Start {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "plan-code-critique")]
        definition: String,
        #[arg(long)]
        id: Option<String>,
        /// The saga's data (a JSON object).
        #[arg(long, default_value = "{}")]
        data: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Dispatches the failed (or stuck) step again.
    Retry {
        id: String,
    },
    /// Treats the failed step as done with this output (JSON).
    Skip {
        id: String,
        #[arg(long)]
        output: String,
    },
    /// Stops the saga and undoes its completed steps.
    Compensate {
        id: String,
    },
    /// Stops the saga without undoing anything.
    Abort {
        id: String,
    },
    /// Replaces a paused saga's data (a JSON object).
    Amend {
        id: String,
        #[arg(long)]
        data: String,
    },
    /// The saga (or a definition with --definition) as a graph.
    Graph {
        id: Option<String>,
        #[arg(long)]
        definition: Option<String>,
        /// json, mermaid or dot
        #[arg(long, default_value = "mermaid")]
        format: String,
    },
}

async fn call(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, String)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}{path}", target.api.trim_end_matches('/'));
    let mut request = hyper::Request::builder().method(method).uri(&url);
    if let Some(token) = &target.token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    if !body.is_empty() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(Bytes::from(body)))?;
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(30), client.request(request))
            .await
            .with_context(|| format!("{method} {url} timed out"))?
            .with_context(|| format!("cannot reach the operator API at {}", target.api))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn json_arg(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("--{what} is not valid JSON"))
}

fn table(body: &Value) -> String {
    let mut out = format!(
        "{:<38} {:<20} {:<12} {:<7} {:<26} {}\n",
        "SAGA", "DEFINITION", "STATUS", "PAUSED", "STARTED", "TENANT"
    );
    for s in body["sagas"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<38} {:<20} {:<12} {:<7} {:<26} {}\n",
            s["saga_id"].as_str().unwrap_or_default(),
            format!(
                "{} v{}",
                s["definition"].as_str().unwrap_or_default(),
                s["version"]
            ),
            s["status"].as_str().unwrap_or_default(),
            s["paused"],
            s["started_at"].as_str().unwrap_or_default(),
            s["tenant"].as_str().unwrap_or_default(),
        ));
    }
    out
}

fn details(body: &Value) -> String {
    let saga = &body["saga"];
    let i = &saga["instance"];
    let mut out = format!(
        "saga {}  ({} v{}, tenant {})\nstatus {}{}  revision {}\nstarted {}  last progress {}\n",
        i["id"].as_str().unwrap_or_default(),
        i["definition"].as_str().unwrap_or_default(),
        i["version"],
        saga["tenant"].as_str().unwrap_or_default(),
        i["status"].as_str().unwrap_or_default(),
        if i["paused"] == json!(true) {
            " (paused)"
        } else {
            ""
        },
        saga["revision"],
        saga["started_at"].as_str().unwrap_or_default(),
        saga["progressed_at"].as_str().unwrap_or_default(),
    );
    if let Some(e) = i["last_error"].as_str() {
        out.push_str(&format!("last error: {e}\n"));
    }
    out.push_str("\ntasks:\n");
    for t in body["tasks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<44} {:<10} {:<10} {}\n",
            t["key"].as_str().unwrap_or_default(),
            t["agent"].as_str().unwrap_or_default(),
            t["status"].as_str().unwrap_or_default(),
            t["error"].as_str().unwrap_or_default(),
        ));
    }
    out.push_str("\nhistory:\n");
    for h in body["history"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} #{:<3} {:<22} {:<10} {}\n",
            h["at"].as_str().unwrap_or_default(),
            h["revision"],
            h["kind"].as_str().unwrap_or_default(),
            h["actor"].as_str().unwrap_or("-"),
            h["detail"],
        ));
    }
    out
}

/// Method, path, body, and how to print the answer.
type Request = (&'static str, String, Option<Value>, fn(&Value) -> String);

async fn execute(target: &Target, command: SagasCommand) -> anyhow::Result<String> {
    let action = |id: &str, name: &str| format!("/v1/sagas/{id}/{name}");
    let (method, path, body, render): Request = match command {
        SagasCommand::List {
            definition,
            status,
            older_than,
            stuck,
            limit,
        } => {
            let mut query = vec![format!("limit={limit}")];
            for (k, v) in [
                ("definition", definition),
                ("status", status),
                ("older_than", older_than),
            ] {
                if let Some(v) = v {
                    query.push(format!("{k}={v}"));
                }
            }
            if stuck {
                query.push("stuck=true".into());
            }
            ("GET", format!("/v1/sagas?{}", query.join("&")), None, table)
        }
        SagasCommand::Show { id } => ("GET", format!("/v1/sagas/{id}"), None, details),
        SagasCommand::Start {
            tenant,
            definition,
            id,
            data,
        } => (
            "POST",
            "/v1/sagas".into(),
            Some(
                json!({"tenant": tenant, "definition": definition, "saga_id": id, "data": json_arg("data", &data)?}),
            ),
            |v| {
                format!(
                    "started {}\n",
                    v["instance"]["id"].as_str().unwrap_or_default()
                )
            },
        ),
        SagasCommand::Pause { id } => ("POST", action(&id, "pause"), None, summary),
        SagasCommand::Resume { id } => ("POST", action(&id, "resume"), None, summary),
        SagasCommand::Retry { id } => ("POST", action(&id, "retry"), None, summary),
        SagasCommand::Compensate { id } => ("POST", action(&id, "compensate"), None, summary),
        SagasCommand::Abort { id } => ("POST", action(&id, "abort"), None, summary),
        SagasCommand::Skip { id, output } => (
            "POST",
            action(&id, "skip"),
            Some(json!({"output": json_arg("output", &output)?})),
            summary,
        ),
        SagasCommand::Amend { id, data } => (
            "POST",
            action(&id, "amend"),
            Some(json!({"data": json_arg("data", &data)?})),
            summary,
        ),
        SagasCommand::Graph {
            id,
            definition,
            format,
        } => {
            let path = match (id, definition) {
                (Some(id), _) => format!("/v1/sagas/{id}/graph?format={format}"),
                (None, Some(d)) => format!("/v1/definitions/{d}/graph?format={format}"),
                (None, None) => anyhow::bail!("name a saga id or --definition"),
            };
            let (status, text) = call(target, "GET", &path, None).await?;
            return ok(status, text.clone()).map(|()| format!("{text}\n"));
        }
    };
    let (status, text) = call(target, method, &path, body).await?;
    ok(status, text.clone())?;
    let value: Value = serde_json::from_str(&text).context("the API answered with invalid JSON")?;
    Ok(render(&value))
}

fn summary(v: &Value) -> String {
    format!(
        "saga {} is {}{}\n",
        v["instance"]["id"].as_str().unwrap_or_default(),
        v["instance"]["status"].as_str().unwrap_or_default(),
        if v["instance"]["paused"] == json!(true) {
            " (paused)"
        } else {
            ""
        }
    )
}

fn ok(status: u16, text: String) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(text);
    anyhow::bail!("{status}: {message}")
}

pub(crate) async fn run(target: Target, command: SagasCommand) -> ExitCode {
    match execute(&target, command).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("fabric sagas: {err:#}");
            ExitCode::FAILURE
        }
    }
}
