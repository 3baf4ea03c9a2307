//! Saga definitions: the data model and the Rust builder. The ways in —
//! parsing YAML or JSON, `Builder::build` — live with the checks they end
//! in, in [`crate::validate`] (this module imports nothing from it).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A versioned saga definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// What sagas name to be started from it.
    pub name: String,
    /// Versions of one name are kept side by side: a saga runs to its end
    /// on the version it started with.
    pub version: u32,
    /// The first step.
    pub start: String,
    /// An instance without a transition for this long is flagged stuck.
    #[serde(with = "humantime_serde", default = "default_stuck_after")]
    pub stuck_after: Duration,
    /// Completion expected within this long (breaches are counted).
    #[serde(with = "humantime_serde", default)]
    pub sla: Option<Duration>,
    /// The steps by name.
    pub steps: BTreeMap<String, Step>,
}

fn default_stuck_after() -> Duration {
    Duration::from_secs(600)
}

/// One step: a task for an agent type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The agent type that performs it.
    pub agent: String,
    /// What the agent is asked to do (the task's action).
    pub action: String,
    /// The task's input: each value is taken as is, except strings of the
    /// form `$/data/...` or `$/steps/<STEP>/output/...`, which are JSON
    /// pointers into the saga's data and earlier steps' latest outputs
    /// (absent → null).
    #[serde(default)]
    pub input: BTreeMap<String, Value>,
    /// How long one attempt may take (the task's lease, renewed by
    /// heartbeats).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Further attempts after a failure or timeout.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// What undoes the step; `none` only for steps without effects.
    pub compensation: Compensation,
    /// Where to go after success when no `when` condition matches.
    #[serde(default = "Target::done")]
    pub on_success: Target,
    /// Where to go once the attempts are used up.
    #[serde(default = "Target::compensate")]
    pub on_failure: Target,
    /// Conditions on the output, tried in order before `on_success`.
    #[serde(default)]
    pub when: Vec<Condition>,
    /// How many times the step may run in one instance (required on some
    /// step of every loop).
    #[serde(default)]
    pub max_visits: Option<u32>,
    /// Where to go instead of a visit past `max_visits`.
    #[serde(default = "Target::failed")]
    pub on_exhausted: Target,
}

/// Retries of a failed or timed-out attempt, with exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The delay before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Each delay is the one before times this.
    pub multiplier: f64,
    /// Fraction of each delay that is random (0: none, 1: full jitter).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// A step's undo: another action (by default for the same agent type), or
/// `none` for a step that changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compensation {
    /// Nothing to undo.
    None,
    /// A task that undoes the step.
    Action {
        /// The agent type that performs it (default: the step's).
        agent: Option<String>,
        /// Its action.
        action: String,
    },
}

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum CompensationRepr {
    Keyword(String),
    Action {
        #[serde(default)]
        agent: Option<String>,
        action: String,
    },
}

impl Serialize for Compensation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::None => CompensationRepr::Keyword("none".into()).serialize(s),
            Self::Action { agent, action } => CompensationRepr::Action {
                agent: agent.clone(),
                action: action.clone(),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Compensation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match CompensationRepr::deserialize(d)? {
            CompensationRepr::Keyword(k) if k == "none" => Ok(Self::None),
            CompensationRepr::Keyword(other) => Err(serde::de::Error::custom(format!(
                "compensation must be `none` or {{action: ...}}, not `{other}`"
            ))),
            CompensationRepr::Action { agent, action } => Ok(Self::Action { agent, action }),
        }
    }
}

/// Where a transition leads: a step, or an end.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Target {
    /// The step of this name.
    Step(String),
    /// Finished successfully.
    Done,
    /// Finished unsuccessfully by the definition's own logic (e.g. too many
    /// iterations): completed steps are compensated, the end state is FAILED.
    Failed,
    /// Something went wrong: completed steps are compensated, the end state
    /// is COMPENSATED.
    Compensate,
}

impl Target {
    /// [`Target::Done`] (serde's default for `on_success`).
    pub fn done() -> Self {
        Self::Done
    }
    /// [`Target::Failed`] (serde's default for `on_exhausted`).
    pub fn failed() -> Self {
        Self::Failed
    }
    /// [`Target::Compensate`] (serde's default for `on_failure`).
    pub fn compensate() -> Self {
        Self::Compensate
    }
}

impl From<String> for Target {
    fn from(s: String) -> Self {
        match s.as_str() {
            "DONE" => Self::Done,
            "FAILED" => Self::Failed,
            "COMPENSATE" => Self::Compensate,
            _ => Self::Step(s),
        }
    }
}

impl From<&str> for Target {
    fn from(s: &str) -> Self {
        Self::from(s.to_owned())
    }
}

impl From<Target> for String {
    fn from(t: Target) -> Self {
        match t {
            Target::Step(s) => s,
            Target::Done => "DONE".into(),
            Target::Failed => "FAILED".into(),
            Target::Compensate => "COMPENSATE".into(),
        }
    }
}

/// `goto` when the output at JSON pointer `path` equals `equals`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// A JSON pointer into the step's output (`/verdict`).
    pub path: String,
    /// The value it must equal.
    pub equals: Value,
    /// Where to go when it does.
    pub goto: Target,
}

impl Definition {
    /// The definition as YAML, in the form it is loaded from.
    pub fn to_yaml(&self) -> String {
        yaml_serde::to_string(self).unwrap_or_default()
    }

    /// A builder for a definition in Rust (checked by `build`).
    pub fn builder(name: &str, version: u32) -> Builder {
        Builder {
            definition: Definition {
                name: name.to_owned(),
                version,
                start: String::new(),
                stuck_after: default_stuck_after(),
                sla: None,
                steps: BTreeMap::new(),
            },
        }
    }
}

impl Step {
    /// A step with the default retry policy, ending the saga on success,
    /// compensating on failure. Set its compensation before building.
    pub fn new(agent: &str, action: &str, timeout: Duration) -> Self {
        Self {
            agent: agent.to_owned(),
            action: action.to_owned(),
            input: BTreeMap::new(),
            timeout,
            retry: RetryPolicy::default(),
            compensation: Compensation::Action {
                agent: None,
                action: String::new(),
            },
            on_success: Target::Done,
            on_failure: Target::Compensate,
            when: Vec::new(),
            max_visits: None,
            on_exhausted: Target::Failed,
        }
    }

    /// Adds an input entry (a value, or a `$/...` pointer).
    pub fn input(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.input.insert(key.to_owned(), value.into());
        self
    }

    /// Undone by `action`, by the same agent type.
    pub fn compensate_with(mut self, action: &str) -> Self {
        self.compensation = Compensation::Action {
            agent: None,
            action: action.to_owned(),
        };
        self
    }

    /// A step with no effects to undo.
    pub fn no_compensation(mut self) -> Self {
        self.compensation = Compensation::None;
        self
    }

    /// Retried by `retry` instead of the default policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Where to go after success when no condition matches.
    pub fn on_success(mut self, target: impl Into<Target>) -> Self {
        self.on_success = target.into();
        self
    }

    /// Where to go once the attempts are used up.
    pub fn on_failure(mut self, target: impl Into<Target>) -> Self {
        self.on_failure = target.into();
        self
    }

    /// Adds a condition on the output, tried after those added before.
    pub fn when(mut self, path: &str, equals: impl Into<Value>, goto: impl Into<Target>) -> Self {
        self.when.push(Condition {
            path: path.to_owned(),
            equals: equals.into(),
            goto: goto.into(),
        });
        self
    }

    /// Runs at most `visits` times per saga; a further visit goes to
    /// `then` instead.
    pub fn max_visits(mut self, visits: u32, then: impl Into<Target>) -> Self {
        self.max_visits = Some(visits);
        self.on_exhausted = then.into();
        self
    }
}

/// Builds a definition in Rust; `build` validates it like a loaded one.
#[derive(Debug, Clone)]
pub struct Builder {
    pub(crate) definition: Definition,
}

impl Builder {
    /// The first step.
    pub fn start(mut self, step: &str) -> Self {
        self.definition.start = step.to_owned();
        self
    }

    /// Adds (or replaces) the step `name`.
    pub fn step(mut self, name: &str, step: Step) -> Self {
        self.definition.steps.insert(name.to_owned(), step);
        self
    }

    /// Flag instances with no transition for this long as stuck.
    pub fn stuck_after(mut self, after: Duration) -> Self {
        self.definition.stuck_after = after;
        self
    }

    /// Count instances not completed within this long as SLA breaches.
    pub fn sla(mut self, sla: Duration) -> Self {
        self.definition.sla = Some(sla);
        self
    }
}
