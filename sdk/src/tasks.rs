//! Sagas from an agent's side: start a saga, and take and answer the tasks
//! the saga engine dispatches to an agent type.
//!
//! [`TaskClient`] is the plain API (poll, stream, heartbeat, complete,
//! fail). [`TaskClient::work`] is the loop most agents want: it streams the
//! agent type's tasks, runs a handler for each (a bounded number at once),
//! heartbeats while the handler runs so the lease does not lapse, and
//! answers with the handler's result. A task's [`Task::key`] is its
//! idempotency key: a handler must give a repeat of the same key no second
//! effect.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::tasks_client::TasksClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::Error;

/// One attempt of a saga step (or of its compensation).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The idempotency key: saga/step/visit/attempt[/undo].
    pub key: String,
    /// The saga it belongs to.
    pub saga_id: String,
    /// The step of the saga's definition.
    pub step: String,
    /// How many times the saga has entered this step (loops revisit).
    pub visit: u32,
    /// The try of this visit (retries count up from 1).
    pub attempt: u32,
    /// True when this is the step's compensation (undo).
    pub compensation: bool,
    /// The agent type it is for.
    pub agent_type: String,
    /// What to do (the step's action).
    pub action: String,
    /// The step's input.
    pub input: Value,
    /// Answer or heartbeat within this long.
    pub timeout: Duration,
    /// The saga's W3C trace context: [`TaskClient::work`] sends it with
    /// the task's heartbeats and answer, so they join the saga's trace.
    pub traceparent: Option<String>,
}

fn from_pb(task: pb::Task) -> Result<Task, Error> {
    Ok(Task {
        input: if task.input_json.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&task.input_json)?
        },
        key: task.key,
        saga_id: task.saga_id,
        step: task.step,
        visit: task.visit,
        attempt: task.attempt,
        compensation: task.compensation,
        agent_type: task.agent_type,
        action: task.action,
        timeout: Duration::from_millis(task.timeout_ms),
        traceparent: Some(task.traceparent).filter(|t| !t.is_empty()),
    })
}

/// Saga tasks for an agent type, through the sidecar.
#[derive(Debug, Clone)]
pub struct TaskClient {
    inner: TasksClient<Channel>,
}

impl TaskClient {
    /// A client on a channel opened elsewhere (shared with other clients).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: TasksClient::new(channel),
        }
    }

    /// Starts a saga (latest version of `definition`) with `data` (a JSON
    /// object); `saga_id` makes it idempotent (a repeat is `Invalid`,
    /// "exists"). Returns the saga id.
    pub async fn start_saga(
        &mut self,
        definition: &str,
        saga_id: Option<&str>,
        data: &Value,
    ) -> Result<String, Error> {
        let response = self
            .inner
            .start_saga(pb::StartSagaRequest {
                definition: definition.to_owned(),
                saga_id: saga_id.unwrap_or_default().to_owned(),
                data_json: serde_json::to_vec(data)?,
            })
            .await?
            .into_inner();
        Ok(response.saga_id)
    }

    /// Up to `max` tasks, waiting up to `wait` for the first.
    pub async fn poll(
        &mut self,
        agent_type: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Task>, Error> {
        let response = self
            .inner
            .poll_tasks(pb::PollTasksRequest {
                agent_type: agent_type.to_owned(),
                max,
                wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
                worker: String::new(),
            })
            .await?
            .into_inner();
        response.tasks.into_iter().map(from_pb).collect()
    }

    /// Tasks as they are dispatched, at most `max_in_flight` unanswered.
    pub async fn stream(
        &mut self,
        agent_type: &str,
        max_in_flight: u32,
    ) -> Result<impl futures::Stream<Item = Result<Task, Error>> + use<>, Error> {
        let stream = self
            .inner
            .stream_tasks(pb::StreamTasksRequest {
                agent_type: agent_type.to_owned(),
                max_in_flight,
                worker: String::new(),
            })
            .await?
            .into_inner();
        Ok(stream.map(|item| item.map_err(Error::from).and_then(from_pb)))
    }

    /// Pushes the task's deadline a full timeout ahead; `Conflict` when the
    /// attempt is over (stop working on it).
    pub async fn heartbeat(&mut self, key: &str) -> Result<Duration, Error> {
        self.heartbeat_in(key, None).await
    }

    async fn heartbeat_in(&mut self, key: &str, trace: Option<&str>) -> Result<Duration, Error> {
        let request = traced(
            pb::HeartbeatRequest {
                key: key.to_owned(),
            },
            trace,
        );
        let response = self.inner.heartbeat(request).await?.into_inner();
        Ok(Duration::from_millis(response.deadline_in_ms))
    }

    /// Answers with `output`; `Conflict` when the attempt is over.
    pub async fn complete(&mut self, key: &str, output: &Value) -> Result<(), Error> {
        self.complete_in(key, output, None).await
    }

    async fn complete_in(
        &mut self,
        key: &str,
        output: &Value,
        trace: Option<&str>,
    ) -> Result<(), Error> {
        let request = pb::CompleteTaskRequest {
            key: key.to_owned(),
            output_json: serde_json::to_vec(output)?,
        };
        self.inner.complete_task(traced(request, trace)).await?;
        Ok(())
    }

    /// Answers with a failure; the engine retries per the step's policy.
    pub async fn fail(&mut self, key: &str, error: &str) -> Result<(), Error> {
        self.fail_in(key, error, None).await
    }

    async fn fail_in(&mut self, key: &str, error: &str, trace: Option<&str>) -> Result<(), Error> {
        let request = pb::FailTaskRequest {
            key: key.to_owned(),
            error: error.to_owned(),
        };
        self.inner.fail_task(traced(request, trace)).await?;
        Ok(())
    }

    /// Runs `handler` for every task of `agent_type`, at most `concurrency`
    /// at once, until `stop`. `Ok(output)` completes the task, `Err(reason)`
    /// fails it. Heartbeats go out every third of the timeout while the
    /// handler runs. Returns when `stop` is cancelled or the stream ends
    /// with an error.
    pub async fn work<H, F>(
        &self,
        agent_type: &str,
        concurrency: u32,
        stop: CancellationToken,
        handler: H,
    ) -> Result<(), Error>
    where
        H: Fn(Task) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Value, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let mut client = self.clone();
        let stream = client.stream(agent_type, concurrency.max(1)).await?;
        let mut stream = std::pin::pin!(stream);
        let mut running = tokio::task::JoinSet::new();
        loop {
            let task = tokio::select! {
                () = stop.cancelled() => break,
                Some(_) = running.join_next(), if !running.is_empty() => continue,
                next = stream.next() => match next {
                    Some(task) => task?,
                    None => break,
                },
            };
            let handler = handler.clone();
            let client = self.clone();
            running.spawn(run_one(client, task, handler));
        }
        running.shutdown().await;
        Ok(())
    }
}

/// `message` as a request in the trace `trace` (a `traceparent`), if any.
fn traced<T>(message: T, trace: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = trace.and_then(|t| t.parse().ok()) {
        request.metadata_mut().insert("traceparent", value);
    }
    request
}

async fn run_one<H, F>(mut client: TaskClient, task: Task, handler: Arc<H>)
where
    H: Fn(Task) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Value, String>> + Send + 'static,
{
    let key = task.key.clone();
    let trace = task.traceparent.clone();
    let trace = trace.as_deref();
    let every = (task.timeout / 3).max(Duration::from_millis(50));
    let work = handler(task);
    let mut work = std::pin::pin!(work);
    let mut beat = client.clone();
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            () = tokio::time::sleep(every) => {
                if let Err(err) = beat.heartbeat_in(&key, trace).await {
                    if err.is_conflict() {
                        // The attempt is over; its answer would change nothing.
                        return;
                    }
                    tracing::warn!(task = %key, error = %err, "heartbeat failed");
                }
            }
        }
    };
    let answered = match outcome {
        Ok(output) => client.complete_in(&key, &output, trace).await,
        Err(reason) => client.fail_in(&key, &reason, trace).await,
    };
    if let Err(err) = answered {
        tracing::warn!(task = %key, error = %err, "could not answer the task");
    }
}
