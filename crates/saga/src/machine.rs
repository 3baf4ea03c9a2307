//! One saga instance and its transition function.
//!
//! `Instance::apply(definition, input, random)` is pure: it changes the
//! instance and returns the effects the engine must carry out — dispatch a
//! task, arm a timer, cancel an attempt, announce a status — all persisted
//! with the new state in one transaction. Each task carries a key (saga,
//! step, visit, attempt), and only the reply to the attempt in flight counts:
//! a late or duplicate reply changes nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use statefabric_domain::SagaId;

use crate::backoff;
use crate::definition::{Compensation, Definition, Target};
use crate::validate::resolve_input;

/// Where a saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Running its steps forward.
    Running,
    /// Undoing completed steps, in reverse order.
    Compensating,
    /// Finished successfully.
    Done,
    /// Ended by the definition's own logic (after compensating).
    Failed,
    /// Ended after a failure, completed steps undone.
    Compensated,
    /// A compensation kept failing: an operator must act.
    Stuck,
    /// Ended by an operator, nothing undone.
    Aborted,
}

impl Status {
    /// No input changes a saga in a final state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Compensated | Self::Aborted
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// Identifies one attempt of one visit of a step (or of its compensation):
/// the task's idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskKey {
    /// The saga's id.
    pub saga: SagaId,
    /// The step's name.
    pub step: String,
    /// Which visit of the step (from 1; loops visit a step again).
    pub visit: u32,
    /// Which attempt of the visit (from 1).
    pub attempt: u32,
    /// Whether this is the step's compensation rather than the step.
    pub compensation: bool,
}

/// A text that is not `saga/step/visit/attempt[/undo]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task key {0:?} is not of the form saga/step/visit/attempt[/undo]")]
pub struct BadTaskKey(pub String);

/// Parses what [`TaskKey`]'s `Display` writes (step names may hold `/`).
impl std::str::FromStr for TaskKey {
    type Err = BadTaskKey;

    fn from_str(key: &str) -> Result<Self, BadTaskKey> {
        let bad = || BadTaskKey(key.to_owned());
        let (saga, rest) = key.split_once('/').ok_or_else(bad)?;
        let (rest, compensation) = match rest.strip_suffix("/undo") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (rest, attempt) = rest.rsplit_once('/').ok_or_else(bad)?;
        let (step, visit) = rest.rsplit_once('/').ok_or_else(bad)?;
        Ok(Self {
            saga: SagaId::new(saga).map_err(|_| bad())?,
            step: step.to_owned(),
            visit: visit.parse().map_err(|_| bad())?,
            attempt: attempt.parse().map_err(|_| bad())?,
            compensation,
        })
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.saga, self.step, self.visit, self.attempt
        )?;
        if self.compensation {
            f.write_str("/undo")?;
        }
        Ok(())
    }
}

/// What the instance waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    /// The task is out; a reply or its deadline comes next.
    Reply,
    /// Backing off before this attempt is dispatched.
    Backoff,
}

/// The attempt an instance is at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Its task's key.
    pub key: TaskKey,
    /// What it waits for.
    pub waiting: Waiting,
}

/// A completed forward visit: what compensation undoes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completed {
    /// The step.
    pub step: String,
    /// The visit.
    pub visit: u32,
    /// What it returned (its compensation's input may point into it).
    pub output: Value,
}

/// A transition decided while paused, taken on resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Where the saga goes on resume.
    pub target: Target,
    /// Set when the hold follows a step that failed for good (an operator
    /// may retry or skip it instead).
    pub failed: Option<TaskKey>,
}

/// One saga: its state, changed only by [`Instance::apply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The saga's id.
    pub id: SagaId,
    /// The definition's name.
    pub definition: String,
    /// The definition's version it runs on (to its end).
    pub version: u32,
    /// Where it is in its life.
    pub status: Status,
    /// The saga's data, given at start (an operator may amend it).
    pub data: Value,
    /// Each step's latest output.
    pub outputs: BTreeMap<String, Value>,
    /// Visits so far, by step.
    pub visits: BTreeMap<String, u32>,
    /// Forward visits completed, in order (compensation undoes them in
    /// reverse).
    pub completed: Vec<Completed>,
    /// The attempt in flight or backing off, if any.
    pub current: Option<Attempt>,
    /// While compensating: the status to end in.
    pub ending: Option<Status>,
    /// Paused by an operator: no transition is taken until resumed.
    pub paused: bool,
    /// The transition decided while paused.
    pub held: Option<Held>,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// The W3C trace context the saga was started in; its tasks carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// What happened, fed to [`Instance::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An agent completed the task.
    Completed {
        /// The task's key.
        key: TaskKey,
        /// What it returned.
        output: Value,
    },
    /// An agent reported the task failed.
    Failed {
        /// The task's key.
        key: TaskKey,
        /// Why.
        error: String,
    },
    /// The attempt's deadline passed without a reply.
    TimedOut {
        /// The task's key.
        key: TaskKey,
    },
    /// The backoff before this attempt is over.
    RetryDue {
        /// The task's key.
        key: TaskKey,
    },
    /// An operator acted.
    Operator(OperatorAction),
}

/// What an operator may do to a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OperatorAction {
    /// Take no further transition until resumed (a task in flight finishes).
    Pause,
    /// Take the held transition and go on.
    Resume,
    /// Dispatch the failed (or stuck, or backing-off) attempt again now.
    RetryStep,
    /// Treat the failed, stuck or backing-off step as done with `output`.
    Skip {
        /// What the step would have returned.
        output: Value,
    },
    /// Stop and undo the completed steps.
    Compensate,
    /// Stop without undoing anything.
    Abort,
    /// Replace the saga's data (only while paused).
    Amend {
        /// The new data (a JSON object).
        data: Value,
    },
}

impl OperatorAction {
    /// The action's name in the APIs and the audit log.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::RetryStep => "retry",
            Self::Skip { .. } => "skip",
            Self::Compensate => "compensate",
            Self::Abort => "abort",
            Self::Amend { .. } => "amend",
        }
    }
}

/// A task for an agent type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Its key (the idempotency key of the agent's work).
    pub key: TaskKey,
    /// The agent type that performs it.
    pub agent: String,
    /// What to do.
    pub action: String,
    /// The step's input, pointers resolved.
    pub input: Value,
    /// The attempt's deadline (its lease, renewed by heartbeats).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// Fires `Input::TimedOut`.
    Deadline,
    /// Fires `Input::RetryDue`.
    Retry,
}

/// What the engine must carry out after a transition, in the same
/// transaction as the new state.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Hand this task to its agent type.
    Dispatch(Task),
    /// Arm a timer.
    Timer {
        /// The attempt it is for.
        key: TaskKey,
        /// What it fires.
        kind: TimerKind,
        /// When, from now.
        after: Duration,
    },
    /// This attempt is over: drop its timers and its task.
    Cancel {
        /// The attempt.
        key: TaskKey,
    },
    /// The status changed.
    Status(Status),
}

/// Why an input was refused (the instance is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SagaError {
    /// An operator action that does not fit the saga's state.
    #[error("cannot {action} saga {saga} ({status}): {reason}")]
    NotAllowed {
        /// The saga.
        saga: SagaId,
        /// The action's name.
        action: &'static str,
        /// The saga's status.
        status: Status,
        /// Why not.
        reason: String,
    },
    /// The definition given is not the one the saga runs on.
    #[error("saga {saga} runs {definition} v{version}, not the definition given")]
    WrongDefinition {
        /// The saga.
        saga: SagaId,
        /// Its definition's name.
        definition: String,
        /// Its definition's version.
        version: u32,
    },
}

impl Instance {
    /// A new instance of `definition`, started: the first step's task.
    pub fn start(definition: &Definition, id: SagaId, data: Value) -> (Self, Vec<Effect>) {
        let mut instance = Self {
            id,
            definition: definition.name.clone(),
            version: definition.version,
            status: Status::Running,
            data,
            outputs: BTreeMap::new(),
            visits: BTreeMap::new(),
            completed: Vec::new(),
            current: None,
            ending: None,
            paused: false,
            held: None,
            last_error: None,
            traceparent: None,
        };
        let mut effects = vec![Effect::Status(Status::Running)];
        instance.enter(
            definition,
            Target::Step(definition.start.clone()),
            &mut effects,
        );
        (instance, effects)
    }

    /// Applies one input. `random` in [0, 1) jitters retry delays.
    pub fn apply(
        &mut self,
        definition: &Definition,
        input: Input,
        random: f64,
    ) -> Result<Vec<Effect>, SagaError> {
        if definition.name != self.definition || definition.version != self.version {
            return Err(SagaError::WrongDefinition {
                saga: self.id.clone(),
                definition: self.definition.clone(),
                version: self.version,
            });
        }
        let mut effects = Vec::new();
        match input {
            Input::Completed { key, output } => {
                if self.is_current(&key, Waiting::Reply) {
                    self.completed_attempt(definition, key, output, &mut effects);
                }
            }
            Input::Failed { key, error } => {
                if self.is_current(&key, Waiting::Reply) {
                    self.failed_attempt(definition, key, error, random, &mut effects);
                }
            }
            Input::TimedOut { key } => {
                if self.is_current(&key, Waiting::Reply) {
                    let error = format!("no reply within the step's timeout (attempt {key})");
                    self.failed_attempt(definition, key, error, random, &mut effects);
                }
            }
            Input::RetryDue { key } => {
                if self.is_current(&key, Waiting::Backoff) && !self.paused {
                    self.dispatch(definition, key, &mut effects);
                }
            }
            Input::Operator(action) => self.operate(definition, action, &mut effects)?,
        }
        Ok(effects)
    }

    fn is_current(&self, key: &TaskKey, waiting: Waiting) -> bool {
        !self.status.is_final()
            && self
                .current
                .as_ref()
                .is_some_and(|a| a.key == *key && a.waiting == waiting)
    }

    fn key(&self, step: &str, visit: u32, attempt: u32, compensation: bool) -> TaskKey {
        TaskKey {
            saga: self.id.clone(),
            step: step.to_owned(),
            visit,
            attempt,
            compensation,
        }
    }

    fn set_status(&mut self, status: Status, effects: &mut Vec<Effect>) {
        if self.status != status {
            self.status = status;
            effects.push(Effect::Status(status));
        }
    }

    /// Follows `target`; a bounded step past its bound follows its
    /// `on_exhausted` instead (at most one hop per step, so a chain of
    /// exhausted steps cannot spin).
    fn enter(&mut self, definition: &Definition, target: Target, effects: &mut Vec<Effect>) {
        let mut target = target;
        for _ in 0..=definition.steps.len() {
            match target {
                Target::Done => {
                    self.current = None;
                    self.set_status(Status::Done, effects);
                    return;
                }
                Target::Failed => {
                    return self.begin_compensation(definition, Status::Failed, effects);
                }
                Target::Compensate => {
                    return self.begin_compensation(definition, Status::Compensated, effects);
                }
                Target::Step(name) => {
                    let Some(step) = definition.steps.get(&name) else {
                        // Validation rules this out; end safely if it happens.
                        self.last_error = Some(format!("unknown step `{name}`"));
                        return self.begin_compensation(definition, Status::Compensated, effects);
                    };
                    let visit = self.visits.get(&name).copied().unwrap_or(0) + 1;
                    if step.max_visits.is_some_and(|max| visit > max) {
                        self.last_error = Some(format!(
                            "step `{name}` reached its bound of {} visits",
                            step.max_visits.unwrap_or_default()
                        ));
                        target = step.on_exhausted.clone();
                        continue;
                    }
                    self.visits.insert(name.clone(), visit);
                    let key = self.key(&name, visit, 1, false);
                    return self.dispatch(definition, key, effects);
                }
            }
        }
        self.last_error = Some("steps exhausted each other's bounds".into());
        self.begin_compensation(definition, Status::Failed, effects);
    }

    fn dispatch(&mut self, definition: &Definition, key: TaskKey, effects: &mut Vec<Effect>) {
        let Some(step) = definition.steps.get(&key.step) else {
            return;
        };
        let (agent, action, input) = if key.compensation {
            let output = self
                .completed
                .iter()
                .find(|c| c.step == key.step && c.visit == key.visit)
                .map(|c| c.output.clone())
                .unwrap_or(Value::Null);
            let (agent, action) = match &step.compensation {
                Compensation::Action { agent, action } => (
                    agent.clone().unwrap_or_else(|| step.agent.clone()),
                    action.clone(),
                ),
                Compensation::None => (step.agent.clone(), String::new()),
            };
            (
                agent,
                action,
                serde_json::json!({"data": self.data, "output": output}),
            )
        } else {
            (
                step.agent.clone(),
                step.action.clone(),
                resolve_input(&step.input, &self.data, &self.outputs),
            )
        };
        effects.push(Effect::Dispatch(Task {
            key: key.clone(),
            agent,
            action,
            input,
            timeout: step.timeout,
        }));
        effects.push(Effect::Timer {
            key: key.clone(),
            kind: TimerKind::Deadline,
            after: step.timeout,
        });
        self.current = Some(Attempt {
            key,
            waiting: Waiting::Reply,
        });
    }

    fn completed_attempt(
        &mut self,
        definition: &Definition,
        key: TaskKey,
        output: Value,
        effects: &mut Vec<Effect>,
    ) {
        effects.push(Effect::Cancel { key: key.clone() });
        self.current = None;
        if key.compensation {
            self.completed
                .retain(|c| !(c.step == key.step && c.visit == key.visit));
            return self.next_compensation(definition, effects);
        }
        let Some(step) = definition.steps.get(&key.step) else {
            return;
        };
        let target = step
            .when
            .iter()
            .find(|c| output.pointer(&c.path) == Some(&c.equals))
            .map_or_else(|| step.on_success.clone(), |c| c.goto.clone());
        self.outputs.insert(key.step.clone(), output.clone());
        self.completed.push(Completed {
            step: key.step.clone(),
            visit: key.visit,
            output,
        });
        self.go(definition, target, None, effects);
    }

    fn failed_attempt(
        &mut self,
        definition: &Definition,
        key: TaskKey,
        error: String,
        random: f64,
        effects: &mut Vec<Effect>,
    ) {
        effects.push(Effect::Cancel { key: key.clone() });
        self.last_error = Some(error);
        let Some(step) = definition.steps.get(&key.step) else {
            return;
        };
        if key.attempt < step.retry.max_attempts {
            let next = TaskKey {
                attempt: key.attempt + 1,
                ..key
            };
            effects.push(Effect::Timer {
                key: next.clone(),
                kind: TimerKind::Retry,
                after: backoff::delay(&step.retry, next.attempt, random),
            });
            self.current = Some(Attempt {
                key: next,
                waiting: Waiting::Backoff,
            });
            return;
        }
        if key.compensation {
            // Never dropped: the attempt stays current for an operator.
            self.current = Some(Attempt {
                key,
                waiting: Waiting::Backoff,
            });
            return self.set_status(Status::Stuck, effects);
        }
        self.current = None;
        let target = step.on_failure.clone();
        self.go(definition, target, Some(key), effects);
    }

    /// Takes a transition, or holds it while paused.
    fn go(
        &mut self,
        definition: &Definition,
        target: Target,
        failed: Option<TaskKey>,
        effects: &mut Vec<Effect>,
    ) {
        if self.paused {
            self.held = Some(Held { target, failed });
        } else {
            self.enter(definition, target, effects);
        }
    }

    fn begin_compensation(
        &mut self,
        definition: &Definition,
        ending: Status,
        effects: &mut Vec<Effect>,
    ) {
        self.ending = Some(ending);
        self.current = None;
        self.set_status(Status::Compensating, effects);
        self.next_compensation(definition, effects);
    }

    /// Undoes the latest completed visit that has a compensation; ends when
    /// none is left.
    fn next_compensation(&mut self, definition: &Definition, effects: &mut Vec<Effect>) {
        while let Some(last) = self.completed.last() {
            let undoable = definition
                .steps
                .get(&last.step)
                .is_some_and(|s| s.compensation != Compensation::None);
            if undoable {
                let key = self.key(&last.step.clone(), last.visit, 1, true);
                if self.paused {
                    self.held = Some(Held {
                        target: Target::Compensate,
                        failed: None,
                    });
                    return;
                }
                return self.dispatch(definition, key, effects);
            }
            self.completed.pop();
        }
        let ending = self.ending.unwrap_or(Status::Compensated);
        self.set_status(ending, effects);
    }

    fn not_allowed(&self, action: &OperatorAction, reason: impl Into<String>) -> SagaError {
        SagaError::NotAllowed {
            saga: self.id.clone(),
            action: action.name(),
            status: self.status,
            reason: reason.into(),
        }
    }

    fn operate(
        &mut self,
        definition: &Definition,
        action: OperatorAction,
        effects: &mut Vec<Effect>,
    ) -> Result<(), SagaError> {
        if self.status.is_final() {
            return Err(self.not_allowed(&action, "it has ended"));
        }
        match &action {
            OperatorAction::Pause => {
                if self.paused {
                    return Err(self.not_allowed(&action, "it is already paused"));
                }
                self.paused = true;
            }
            OperatorAction::Resume => {
                if !self.paused {
                    return Err(self.not_allowed(&action, "it is not paused"));
                }
                self.paused = false;
                if let Some(held) = self.held.take() {
                    if held.target == Target::Compensate && self.status == Status::Compensating {
                        self.next_compensation(definition, effects);
                    } else {
                        self.enter(definition, held.target, effects);
                    }
                } else if let Some(a) = self.current.clone()
                    && a.waiting == Waiting::Backoff
                    && self.status != Status::Stuck
                {
                    self.dispatch(definition, a.key, effects);
                }
            }
            OperatorAction::RetryStep => {
                let key = self.retryable(&action)?;
                effects.push(Effect::Cancel { key: key.clone() });
                let fresh = TaskKey {
                    attempt: key.attempt + 1,
                    ..key
                };
                self.held = None;
                if self.status == Status::Stuck {
                    self.set_status(Status::Compensating, effects);
                }
                self.dispatch(definition, fresh, effects);
            }
            OperatorAction::Skip { output } => {
                let key = self.retryable(&action)?;
                self.held = None;
                if self.status == Status::Stuck {
                    self.set_status(Status::Compensating, effects);
                }
                // As if the attempt had succeeded with `output` (while
                // paused, the next transition is held as usual).
                self.current = Some(Attempt {
                    key: key.clone(),
                    waiting: Waiting::Reply,
                });
                self.completed_attempt(definition, key, output.clone(), effects);
            }
            OperatorAction::Compensate => {
                if self.status != Status::Running {
                    return Err(self.not_allowed(&action, "it is already compensating"));
                }
                if let Some(a) = self.current.take() {
                    effects.push(Effect::Cancel { key: a.key });
                }
                self.held = None;
                self.paused = false;
                self.begin_compensation(definition, Status::Compensated, effects);
            }
            OperatorAction::Abort => {
                if let Some(a) = self.current.take() {
                    effects.push(Effect::Cancel { key: a.key });
                }
                self.held = None;
                self.paused = false;
                self.set_status(Status::Aborted, effects);
            }
            OperatorAction::Amend { data } => {
                if !self.paused {
                    return Err(self.not_allowed(&action, "pause it first"));
                }
                if !data.is_object() {
                    return Err(self.not_allowed(&action, "the data must be a JSON object"));
                }
                self.data = data.clone();
            }
        }
        Ok(())
    }

    /// The attempt an operator may retry or skip: a stuck compensation, a
    /// step backing off between attempts, or a step that failed for good
    /// while the saga was paused. Never a task that is out.
    fn retryable(&self, action: &OperatorAction) -> Result<TaskKey, SagaError> {
        if let Some(Held {
            failed: Some(key), ..
        }) = &self.held
        {
            return Ok(key.clone());
        }
        match &self.current {
            Some(a) if a.waiting == Waiting::Backoff => Ok(a.key.clone()),
            Some(a) => Err(self.not_allowed(
                action,
                format!("step `{}` is running (attempt {})", a.key.step, a.key),
            )),
            None => Err(self.not_allowed(action, "no step has failed")),
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;

/// A saga id for tests.
#[cfg(test)]
pub(crate) fn saga_id(id: &str) -> SagaId {
    SagaId::new(id).expect("a valid saga id")
}
