//! `ResiliencyPolicy`: named timeouts, retries, circuit breakers and limits,
//! and the targets they apply to — the sidecar's own dependencies and the
//! agents' egress upstreams.

#![allow(
    unreachable_pub,
    reason = "kube's KubeSchema derive (the x_kube validation rules) re-emits these structs in a private module"
)]

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::GoDuration;
use crate::status::MeshStatus;

/// Named resilience settings and what they apply to. A target names the
/// settings it uses by their keys in this policy.
#[derive(CustomResource, KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "statefabric.io",
    version = "v1alpha1",
    kind = "ResiliencyPolicy",
    namespaced,
    status = "MeshStatus",
    shortname = "respol",
    category = "statefabric",
    doc = "Timeouts, retries, circuit breakers and limits for the sidecar's dependencies and egress upstreams.",
    printcolumn(
        name = "Targets",
        type_ = "integer",
        json_path = ".spec.targets.size()",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.sidecars.applied"
    ),
    printcolumn(
        name = "Refused",
        type_ = "integer",
        json_path = ".status.sidecars.refused"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.targets) || self.targets.all(t, !has(t.timeout) || (has(self.timeouts) && t.timeout in self.timeouts))").message("spec.targets[].timeout names no entry of spec.timeouts"))]
#[x_kube(validation = Rule::new("!has(self.targets) || self.targets.all(t, !has(t.retry) || (has(self.retries) && t.retry in self.retries))").message("spec.targets[].retry names no entry of spec.retries"))]
#[x_kube(validation = Rule::new("!has(self.targets) || self.targets.all(t, !has(t.circuitBreaker) || (has(self.circuitBreakers) && t.circuitBreaker in self.circuitBreakers))").message("spec.targets[].circuitBreaker names no entry of spec.circuitBreakers"))]
#[x_kube(validation = Rule::new("!has(self.targets) || self.targets.all(t, !has(t.limit) || (has(self.limits) && t.limit in self.limits))").message("spec.targets[].limit names no entry of spec.limits"))]
#[serde(rename_all = "camelCase")]
pub struct ResiliencyPolicySpec {
    /// Named timeout settings, for targets to use by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub timeouts: BTreeMap<String, TimeoutPolicy>,
    /// Named retry settings, for targets to use by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub retries: BTreeMap<String, RetryPolicy>,
    /// Named circuit breakers, for targets to use by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub circuit_breakers: BTreeMap<String, BreakerPolicy>,
    /// Named concurrency and rate limits, for targets to use by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub limits: BTreeMap<String, LimitPolicy>,
    /// What the settings apply to, each naming the ones it uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub targets: Vec<PolicyTarget>,
}

/// How long a call may take.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("!has(self.perTry) || !has(self.total) || duration(self.perTry) <= duration(self.total)").message("perTry must not exceed total"))]
#[serde(rename_all = "camelCase")]
pub struct TimeoutPolicy {
    /// Establishing a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<GoDuration>,
    /// One attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<GoDuration>,
    /// The whole call, retries and their waits included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<GoDuration>,
    /// A stream with no data for this long is cut (reset by every chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<GoDuration>,
}

/// Retries with exponential backoff, bounded by a budget.
#[derive(KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("duration(self.maxBackoff) >= duration(self.initialBackoff)").message("maxBackoff must be at least initialBackoff"))]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// The wait before the first retry, a duration such as `100ms`; it
    /// doubles with each further one.
    pub initial_backoff: GoDuration,
    /// The longest wait between attempts, a duration such as `2s`.
    pub max_backoff: GoDuration,
    /// Whether waits are randomized.
    #[serde(default)]
    pub jitter: Jitter,
    /// Retries may add at most this share of the requests (in percent), so
    /// a failing dependency does not get a storm.
    #[serde(default = "default_budget_percent")]
    #[schemars(range(max = 100))]
    pub budget_percent: u32,
    /// Retries always allowed per second, whatever the budget says.
    #[serde(default = "default_min_retries_per_second")]
    #[schemars(range(max = 1000))]
    pub min_retries_per_second: u32,
    /// What is retried (only idempotent calls, or those with an idempotency
    /// key).
    #[serde(default = "default_retry_on")]
    #[schemars(length(min = 1, max = 8))]
    pub retry_on: Vec<RetryOn>,
}

fn default_budget_percent() -> u32 {
    20
}

fn default_min_retries_per_second() -> u32 {
    10
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectError,
        RetryOn::TooManyRequests,
        RetryOn::Unavailable,
    ]
}

/// How a retry's wait is drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Jitter {
    /// A random wait between zero and the backoff.
    #[default]
    Full,
    /// Exactly the backoff.
    None,
}

/// A failure worth another attempt.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum RetryOn {
    /// The connection could not be made or was reset before a response.
    ConnectError,
    /// HTTP 429 (honouring Retry-After).
    TooManyRequests,
    /// HTTP 502, 503, 504; gRPC UNAVAILABLE.
    Unavailable,
    /// The attempt's own timeout.
    Timeout,
}

/// Fail fast while a dependency keeps failing.
#[derive(KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.consecutiveFailures) || has(self.failureRatePercent)").message("set consecutiveFailures or failureRatePercent"))]
#[x_kube(validation = Rule::new("!has(self.failureRatePercent) || has(self.window)").message("failureRatePercent needs a window"))]
#[serde(rename_all = "camelCase")]
pub struct BreakerPolicy {
    /// Opens after this many failures in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: Option<u32>,
    /// Opens when this share of the calls in `window` failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_rate_percent: Option<u32>,
    /// The sliding window the failure rate is counted over, a duration
    /// such as `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<GoDuration>,
    /// Calls in the window before the rate counts.
    #[serde(default = "default_min_calls")]
    #[schemars(range(min = 1, max = 10_000))]
    pub min_calls: u32,
    /// How long it stays open before probing.
    pub open_for: GoDuration,
    /// Probes let through while half-open.
    #[serde(default = "default_half_open_probes")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: u32,
}

fn default_min_calls() -> u32 {
    10
}

fn default_half_open_probes() -> u32 {
    1
}

/// Concurrency and rate limits with a bounded queue.
#[derive(KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.maxConcurrency) || has(self.requestsPerSecond) || has(self.tokensPerMinute)").message("set maxConcurrency, requestsPerSecond or tokensPerMinute"))]
#[serde(rename_all = "camelCase")]
pub struct LimitPolicy {
    /// Calls in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_concurrency: Option<u32>,
    /// Calls started per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: Option<u32>,
    /// For model APIs that report usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// Calls that may wait for a slot; more are shed at once.
    #[serde(default)]
    #[schemars(range(max = 100_000))]
    pub queue: u32,
    /// The longest a call waits in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<GoDuration>,
}

/// What a policy applies to: one of the sidecar's dependencies or an
/// egress upstream, with the names of the settings it uses.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.dependency) != has(self.upstream)").message("a target names exactly one of dependency and upstream"))]
#[serde(rename_all = "camelCase")]
pub struct PolicyTarget {
    /// One of the sidecar's own dependencies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency: Option<Dependency>,
    /// An Upstream in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub upstream: Option<String>,
    /// An entry of `timeouts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub timeout: Option<String>,
    /// An entry of `retries`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub retry: Option<String>,
    /// An entry of `circuitBreakers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub circuit_breaker: Option<String>,
    /// An entry of `limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub limit: Option<String>,
}

/// A dependency of the sidecar itself.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
#[allow(
    missing_docs,
    reason = "documented variants make schemars emit a oneOf, which kube turns into an enum without the null this Option field needs listed"
)]
pub enum Dependency {
    Postgres,
    Redis,
    Kafka,
    Registry,
    ControlPlane,
}
