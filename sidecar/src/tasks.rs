//! The `Tasks` gRPC service: the agent's side of sagas, for the sidecar's
//! own tenant — start a saga, take the tasks dispatched to an agent type
//! (poll or stream), heartbeat, complete, fail.
//!
//! Tasks are claimed from the saga store (`statefabric-saga-engine`'s
//! [`TaskQueue`]): each goes to one worker. Answers go to the engine's
//! inbox; the engine, not the sidecar, decides what they change. A stream
//! hands out at most `max_in_flight` tasks not yet answered (or past their
//! deadline) through this sidecar, so a slow agent is not buried: the rest
//! wait in the store for another worker.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use serde_json::Value;
use statefabric_domain::{SagaId, TenantId};
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::tasks_server::Tasks;
use statefabric_saga_store::{
    Claim, InboxMessage, Replied, Reply, StartRequest, StartRequested, TaskQueue, TaskRow,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::status::from_saga_store;

const MAX_BATCH: u32 = 1000;
const MAX_WAIT: Duration = Duration::from_secs(60);
/// A stream re-checks the store at least this often. It is woken when tasks
/// arrive or are released (in-process, or the tasks `NOTIFY`), when one of
/// its tasks is answered and when one's local deadline passes; this only
/// bounds how late a wake-up that went missing is made up for.
const STREAM_RECHECK: Duration = Duration::from_secs(10);
/// The `in_flight` owner of tasks handed out by `PollTasks`.
const POLLED: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub(crate) struct TasksService {
    queue: Arc<dyn TaskQueue>,
    tenant: TenantId,
    identity: String,
    /// Tasks handed out and not yet answered: key → (stream, or
    /// [`POLLED`]; local deadline).
    in_flight: Arc<Mutex<HashMap<String, (u64, Instant)>>>,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
    /// Wakes streams when an answer frees a place in their in-flight budget.
    freed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
}

fn to_pb(task: TaskRow) -> pb::Task {
    pb::Task {
        key: task.key,
        saga_id: task.saga_id.to_string(),
        step: task.step,
        visit: task.visit,
        attempt: task.attempt,
        compensation: task.compensation,
        agent_type: task.agent,
        action: task.action,
        input_json: serde_json::to_vec(&task.input).unwrap_or_default(),
        timeout_ms: u64::try_from(task.timeout_ms).unwrap_or_default(),
        traceparent: task.traceparent.unwrap_or_default(),
    }
}

fn agent_type(agent: &str) -> Result<&str, Status> {
    let ok = !agent.is_empty()
        && agent.len() <= 128
        && agent
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(agent)
    } else {
        Err(Status::invalid_argument(format!(
            "agent_type {agent:?} must be 1-128 letters, digits, '-', '_' or '.'"
        )))
    }
}

fn task_key(key: &str) -> Result<SagaId, Status> {
    key.parse::<statefabric_saga::TaskKey>()
        .map(|k| k.saga)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn json(bytes: &[u8], what: &str) -> Result<Value, Status> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes)
        .map_err(|e| Status::invalid_argument(format!("{what} is not valid JSON: {e}")))
}

impl TasksService {
    pub(crate) fn new(
        queue: Arc<dyn TaskQueue>,
        tenant: TenantId,
        identity: String,
        stop: CancellationToken,
    ) -> Self {
        Self {
            queue,
            tenant,
            identity,
            in_flight: Arc::default(),
            next_stream: Arc::default(),
            freed: Arc::default(),
            stop,
        }
    }

    fn worker(&self, worker: &str) -> String {
        if worker.is_empty() {
            self.identity.clone()
        } else {
            worker.chars().take(256).collect()
        }
    }

    fn handed_out(&self, owner: u64, task: &TaskRow) {
        let deadline =
            Instant::now() + Duration::from_millis(u64::try_from(task.timeout_ms).unwrap_or(0));
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(task.key.clone(), (owner, deadline));
    }

    /// Offers the tasks handed out through this sidecar and not answered to
    /// other workers at once (clean shutdown), instead of letting them wait
    /// out their deadlines.
    pub(crate) async fn release_unanswered(&self) {
        let keys: Vec<String> = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .map(|(k, _)| k)
            .collect();
        if keys.is_empty() {
            return;
        }
        match self.queue.release(&self.tenant, Some(&keys)).await {
            Ok(n) => tracing::info!(released = n, "offered unanswered tasks to other workers"),
            Err(err) => {
                tracing::warn!(error = %err, "could not release unanswered tasks; they wait out their deadlines")
            }
        }
    }

    /// Offers the tasks handed out through stream `stream` and not answered
    /// to other workers: its worker went away (its connection closed), so
    /// the tasks go on under the same keys instead of waiting out their
    /// deadlines — and a repeat under the same key is what lets the next
    /// worker's egress calls replay the first one's.
    async fn release_stream(&self, stream: u64) {
        let keys: Vec<String> = {
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let keys = in_flight
                .iter()
                .filter(|(_, (owner, _))| *owner == stream)
                .map(|(key, _)| key.clone())
                .collect::<Vec<_>>();
            for key in &keys {
                in_flight.remove(key);
            }
            keys
        };
        if keys.is_empty() {
            return;
        }
        match self.queue.release(&self.tenant, Some(&keys)).await {
            Ok(n) => tracing::info!(
                released = n,
                "a task stream closed; offered its unanswered tasks to other workers"
            ),
            Err(err) => {
                tracing::warn!(error = %err, "could not release a closed stream's tasks; they wait out their deadlines")
            }
        }
    }

    fn answered(&self, key: &str) {
        let removed = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        if removed.is_some() {
            self.freed.notify_waiters();
        }
    }

    async fn reply(&self, saga: &SagaId, message: InboxMessage) -> Result<(), Status> {
        let key = message.task_key().unwrap_or_default().to_owned();
        let replied = self
            .queue
            .reply(
                &self.tenant,
                Reply {
                    sender: &self.identity,
                    saga_id: saga,
                    message,
                },
            )
            .await
            .map_err(from_saga_store)?;
        self.answered(&key);
        match replied {
            // A repeat of an answer already waiting: nothing more to do.
            Replied::Accepted | Replied::Duplicate => Ok(()),
            Replied::NotCurrent => Err(Status::failed_precondition(format!(
                "task {key} is no longer current (answered, timed out or cancelled); this answer changes nothing"
            ))),
            Replied::Unknown => Err(Status::not_found(format!("no task {key}"))),
        }
    }
}

/// Hands out tasks as they come, within the stream's in-flight budget.
async fn stream_loop(
    service: TasksService,
    agent: String,
    worker: String,
    max_in_flight: usize,
    tx: tokio::sync::mpsc::Sender<Result<pb::Task, Status>>,
) {
    let stream = service
        .next_stream
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let closed = hand_out(&service, &agent, &worker, max_in_flight, stream, &tx).await;
    if closed {
        service.release_stream(stream).await;
    }
}

/// The body of [`stream_loop`]; true when it ended because the worker's
/// stream closed (false: the sidecar is stopping, or the store failed).
async fn hand_out(
    service: &TasksService,
    agent: &str,
    worker: &str,
    max_in_flight: usize,
    stream: u64,
    tx: &tokio::sync::mpsc::Sender<Result<pb::Task, Status>>,
) -> bool {
    loop {
        // Both wake-ups are subscribed to before the store is read, so
        // nothing that happens in between is missed.
        let mut signal = service.queue.tasks_signal(&service.tenant, agent);
        let freed = service.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let (budget, next_expiry) = {
            let mut in_flight = service
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            in_flight.retain(|_, (_, deadline)| *deadline > now);
            let ours = in_flight.values().filter(|(s, _)| *s == stream);
            let next_expiry = ours.clone().map(|(_, deadline)| *deadline).min();
            (max_in_flight.saturating_sub(ours.count()), next_expiry)
        };
        if budget > 0 {
            let max = u32::try_from(budget).unwrap_or(MAX_BATCH);
            match service
                .queue
                .claim(&service.tenant, Claim { agent, worker, max })
                .await
            {
                Ok(tasks) => {
                    let got = !tasks.is_empty();
                    for task in tasks {
                        service.handed_out(stream, &task);
                        if tx.send(Ok(to_pb(task))).await.is_err() {
                            return true;
                        }
                    }
                    if got {
                        continue;
                    }
                }
                Err(err) => {
                    let _ = tx.send(Err(from_saga_store(err))).await;
                    return false;
                }
            }
        }
        let recheck = Instant::now() + STREAM_RECHECK;
        tokio::select! {
            () = service.stop.cancelled() => return false,
            () = tx.closed() => return true,
            _ = signal.changed() => {}
            () = &mut freed => {}
            () = tokio::time::sleep_until(next_expiry.map_or(recheck, |at| at.min(recheck))) => {}
        }
    }
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;

#[tonic::async_trait]
impl Tasks for TasksService {
    async fn start_saga(
        &self,
        request: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::StartSagaResponse>, Status> {
        // The saga's trace: this call's span when traces are exported, else
        // the caller's context as sent.
        let traceparent =
            statefabric_runtime::trace_context::traceparent_of(&tracing::Span::current())
                .or(crate::call::CallMeta::of(&request)?.traceparent);
        let raw = request.into_inner();
        let id = if raw.saga_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            raw.saga_id
        };
        let id = SagaId::new(id).map_err(|e| Status::invalid_argument(format!("saga_id: {e}")))?;
        if raw.definition.is_empty() {
            return Err(Status::invalid_argument("definition is required"));
        }
        let data = match json(&raw.data_json, "data_json")? {
            Value::Null => Value::Object(serde_json::Map::new()),
            Value::Object(map) => Value::Object(map),
            _ => return Err(Status::invalid_argument("data_json must be a JSON object")),
        };
        match self
            .queue
            .request_start(
                &self.tenant,
                &self.identity,
                StartRequest {
                    saga_id: id.clone(),
                    definition: raw.definition.clone(),
                    data,
                    traceparent,
                },
            )
            .await
            .map_err(from_saga_store)?
        {
            StartRequested::Accepted => Ok(Response::new(pb::StartSagaResponse {
                saga_id: id.to_string(),
            })),
            StartRequested::Exists => Err(Status::already_exists(format!(
                "saga {id} exists or is being started"
            ))),
            StartRequested::UnknownDefinition => Err(Status::not_found(format!(
                "no saga definition {:?}",
                raw.definition
            ))),
        }
    }

    async fn poll_tasks(
        &self,
        request: Request<pb::PollTasksRequest>,
    ) -> Result<Response<pb::PollTasksResponse>, Status> {
        let raw = request.into_inner();
        let agent = agent_type(&raw.agent_type)?;
        if raw.max > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "max {} is over {MAX_BATCH}",
                raw.max
            )));
        }
        let wait = Duration::from_millis(u64::from(raw.wait_ms));
        if wait > MAX_WAIT {
            return Err(Status::invalid_argument(format!(
                "wait_ms {} is over {}",
                raw.wait_ms,
                MAX_WAIT.as_millis()
            )));
        }
        let worker = self.worker(&raw.worker);
        let until = Instant::now() + wait;
        loop {
            let mut signal = self.queue.tasks_signal(&self.tenant, agent);
            let tasks = self
                .queue
                .claim(
                    &self.tenant,
                    Claim {
                        agent,
                        worker: &worker,
                        max: raw.max.max(1),
                    },
                )
                .await
                .map_err(from_saga_store)?;
            for task in &tasks {
                self.handed_out(POLLED, task);
            }
            let now = Instant::now();
            if !tasks.is_empty() || now >= until {
                return Ok(Response::new(pb::PollTasksResponse {
                    tasks: tasks.into_iter().map(to_pb).collect(),
                }));
            }
            tokio::select! {
                () = self.stop.cancelled() => return Err(Status::unavailable("the sidecar is shutting down")),
                _ = signal.changed() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    type StreamTasksStream = TaskStream;

    async fn stream_tasks(
        &self,
        request: Request<pb::StreamTasksRequest>,
    ) -> Result<Response<Self::StreamTasksStream>, Status> {
        let raw = request.into_inner();
        let agent = agent_type(&raw.agent_type)?.to_owned();
        if raw.max_in_flight > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "max_in_flight {} is over {MAX_BATCH}",
                raw.max_in_flight
            )));
        }
        let max_in_flight = if raw.max_in_flight == 0 {
            16
        } else {
            raw.max_in_flight as usize
        };
        let (tx, rx) = tokio::sync::mpsc::channel(max_in_flight);
        tokio::spawn(stream_loop(
            self.clone(),
            agent,
            self.worker(&raw.worker),
            max_in_flight,
            tx,
        ));
        Ok(Response::new(Box::pin(tokio_stream_from_receiver(rx))))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let key = request.into_inner().key;
        task_key(&key)?;
        match self
            .queue
            .heartbeat(&self.tenant, &key)
            .await
            .map_err(from_saga_store)?
        {
            Some(deadline) => {
                let left = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
                if let Some(entry) = self
                    .in_flight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_mut(&key)
                {
                    entry.1 = Instant::now() + left;
                }
                Ok(Response::new(pb::HeartbeatResponse {
                    deadline_in_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                }))
            }
            None => {
                self.answered(&key);
                Err(Status::failed_precondition(format!(
                    "task {key} is no longer current (answered, timed out or cancelled); stop working on it"
                )))
            }
        }
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let raw = request.into_inner();
        let saga = task_key(&raw.key)?;
        let output = json(&raw.output_json, "output_json")?;
        self.reply(
            &saga,
            InboxMessage::Completed {
                key: raw.key,
                output,
            },
        )
        .await?;
        Ok(Response::new(pb::CompleteTaskResponse {}))
    }

    async fn fail_task(
        &self,
        request: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        let raw = request.into_inner();
        let saga = task_key(&raw.key)?;
        if raw.error.trim().is_empty() {
            return Err(Status::invalid_argument(
                "error is required: say why the task failed",
            ));
        }
        self.reply(
            &saga,
            InboxMessage::Failed {
                key: raw.key,
                error: raw.error,
            },
        )
        .await?;
        Ok(Response::new(pb::FailTaskResponse {}))
    }
}

fn tokio_stream_from_receiver(
    mut rx: tokio::sync::mpsc::Receiver<Result<pb::Task, Status>>,
) -> impl Stream<Item = Result<pb::Task, Status>> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
