//! Where the agent's calls go, and under which policy: the mesh
//! configuration's Upstreams, each with the ResiliencyPolicy settings its
//! targets name, resolved once per configuration (pure; hot-swapped by the
//! mesh applier). What a route cannot honour yet is returned as a note for
//! the ACK, never dropped silently.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use statefabric_mesh::EffectiveConfig;
use statefabric_mesh::resiliency::{Jitter, RetryOn};
use statefabric_mesh::upstream::Protocol;
use statefabric_resilience::BreakerConfig;

/// Timeouts and retries when no policy sets them: an LLM call may take
/// minutes, but a stream silent for a minute is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub connect: Duration,
    pub total: Duration,
    pub idle: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            total: Duration::from_secs(600),
            idle: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub full_jitter: bool,
    pub on: Vec<RetryOn>,
    /// Retries may add at most this share of the requests (percent) ...
    pub budget_percent: u32,
    /// ... beyond this many a second.
    pub min_retries_per_second: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    pub connect: Duration,
    /// One attempt, until the response's headers.
    pub per_try: Option<Duration>,
    /// The whole call until the response's headers, retries included.
    pub total: Duration,
    /// Silence allowed between two chunks of a response body.
    pub idle: Duration,
    pub retry: Option<RetrySettings>,
    pub breaker: Option<BreakerConfig>,
    pub limit: Option<super::limits::LimitSettings>,
}

/// One upstream as the sidecar calls it.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    /// Scheme and authority of the upstream.
    pub origin: Uri,
    /// The URL's path, which the agent's path is appended to (no trailing
    /// slash).
    pub base_path: String,
    pub protocol: Protocol,
    /// Added to every request (literal values).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub policy: RoutePolicy,
}

/// Every route of the current configuration, by upstream name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routes {
    by_name: BTreeMap<String, Arc<Route>>,
}

impl Routes {
    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    /// The routes of `config`, and what of it is not applied. `Err` names a
    /// setting that makes the configuration unusable.
    pub fn from_config(
        config: &EffectiveConfig,
        defaults: Defaults,
    ) -> Result<(Self, Vec<String>), String> {
        let mut routes = BTreeMap::new();
        let mut notes = Vec::new();
        for upstream in &config.upstreams {
            let (route, mut more) = route(config, upstream, defaults)?;
            notes.append(&mut more);
            routes.insert(route.name.clone(), Arc::new(route));
        }
        Ok((Self { by_name: routes }, notes))
    }
}

fn route(
    config: &EffectiveConfig,
    upstream: &statefabric_mesh::effective::Named<statefabric_mesh::upstream::UpstreamSpec>,
    defaults: Defaults,
) -> Result<(Route, Vec<String>), String> {
    let name = &upstream.name;
    let spec = &upstream.spec;
    let at = format!("Upstream {name}");
    let url: Uri = spec
        .url
        .parse()
        .map_err(|e| format!("{at}: spec.url {}: {e}", spec.url))?;
    let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
        return Err(format!("{at}: spec.url must be absolute"));
    };
    let origin = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("{at}: spec.url: {e}"))?;
    let mut notes = Vec::new();
    let mut headers = Vec::new();
    for (index, header) in spec.headers.iter().enumerate() {
        let Some(value) = &header.value else {
            notes.push(format!(
                "{at}: spec.headers[{index}] ({}) comes from a Secret, which this sidecar cannot read yet; not added",
                header.name
            ));
            continue;
        };
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|e| format!("{at}: spec.headers[{index}].name: {e}"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| format!("{at}: spec.headers[{index}].value: {e}"))?;
        headers.push((name, value));
    }
    if spec
        .tls
        .as_ref()
        .is_some_and(|t| t.ca.is_some() || t.server_name.is_some())
    {
        notes.push(format!(
            "{at}: spec.tls (a CA from a Secret, a server name) is not applied yet; the sidecar's roots verify the URL's host"
        ));
    }
    let (policy, mut more) = policy(config, name, defaults)?;
    notes.append(&mut more);
    Ok((
        Route {
            name: name.clone(),
            origin,
            base_path: url.path().trim_end_matches('/').to_owned(),
            protocol: spec.protocol,
            headers,
            policy,
        },
        notes,
    ))
}

/// The settings of the first policy (by name) whose targets name
/// `upstream`; a second one is noted and ignored.
fn policy(
    config: &EffectiveConfig,
    upstream: &str,
    defaults: Defaults,
) -> Result<(RoutePolicy, Vec<String>), String> {
    let mut resolved = RoutePolicy {
        connect: defaults.connect,
        per_try: None,
        total: defaults.total,
        idle: defaults.idle,
        retry: None,
        breaker: None,
        limit: None,
    };
    let mut notes = Vec::new();
    let mut winner: Option<&str> = None;
    for policy in &config.policies {
        for (index, target) in policy.spec.targets.iter().enumerate() {
            if target.upstream.as_deref() != Some(upstream) {
                continue;
            }
            let at = format!("ResiliencyPolicy {}: spec.targets[{index}]", policy.name);
            if let Some(first) = winner {
                notes.push(format!(
                    "{at}: upstream {upstream} is already configured by ResiliencyPolicy {first}; not applied"
                ));
                continue;
            }
            winner = Some(&policy.name);
            let spec = &policy.spec;
            let named = |field: &str, name: &Option<String>, exists: bool| match name {
                Some(n) if !exists => Err(format!("{at}.{field}: names no entry {n}")),
                _ => Ok(()),
            };
            if let Some(t) = target.timeout.as_ref().and_then(|n| spec.timeouts.get(n)) {
                resolved.connect = t.connect.map_or(resolved.connect, |d| d.get());
                resolved.per_try = t.per_try.map(|d| d.get());
                resolved.total = t.total.map_or(resolved.total, |d| d.get());
                resolved.idle = t.idle.map_or(resolved.idle, |d| d.get());
            } else {
                named("timeout", &target.timeout, false)?;
            }
            if let Some(r) = target.retry.as_ref().and_then(|n| spec.retries.get(n)) {
                resolved.retry = Some(RetrySettings {
                    max_attempts: r.max_attempts.max(1),
                    initial_backoff: r.initial_backoff.get(),
                    max_backoff: r.max_backoff.get(),
                    full_jitter: r.jitter == Jitter::Full,
                    on: r.retry_on.clone(),
                    budget_percent: r.budget_percent,
                    min_retries_per_second: r.min_retries_per_second,
                });
            } else {
                named("retry", &target.retry, false)?;
            }
            if let Some(b) = target
                .circuit_breaker
                .as_ref()
                .and_then(|n| spec.circuit_breakers.get(n))
            {
                resolved.breaker = Some(crate::mesh::breaker_config(b)?);
            } else {
                named("circuitBreaker", &target.circuit_breaker, false)?;
            }
            if let Some(l) = target.limit.as_ref().and_then(|n| spec.limits.get(n)) {
                resolved.limit = Some(super::limits::LimitSettings {
                    max_concurrency: l.max_concurrency,
                    requests_per_second: l.requests_per_second,
                    queue: l.queue,
                    // Without a bound, a queued call waits a second at most.
                    queue_timeout: l.queue_timeout.map_or(Duration::from_secs(1), |d| d.get()),
                });
                if let Some(tokens) = l.tokens_per_minute {
                    notes.push(format!(
                        "{at}.limit: tokensPerMinute ({tokens}) is not enforced yet"
                    ));
                }
            } else {
                named("limit", &target.limit, false)?;
            }
        }
    }
    Ok((resolved, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> EffectiveConfig {
        let mut catalog = statefabric_mesh::Catalog::default();
        statefabric_mesh::local::add_documents(&mut catalog, "test", yaml, "agents")
            .expect("documents");
        let identity = statefabric_mesh::Identity {
            namespace: "agents".into(),
            pod: "p".into(),
            ..statefabric_mesh::Identity::default()
        };
        statefabric_mesh::effective(&catalog, &identity).expect("effective")
    }

    const MESH: &str = r#"
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: openai}
spec:
  url: https://api.openai.com/v1/
  headers:
  - {name: OpenAI-Organization, value: org-1}
  - {name: Authorization, secretKeyRef: {name: openai, key: bearer}}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: tools}
spec: {url: "http://tools.agents:8080"}
---
apiVersion: statefabric.io/v1alpha1
kind: ResiliencyPolicy
metadata: {name: llm}
spec:
  timeouts: {llm: {connect: 2s, perTry: 30s, total: 2m, idle: 20s}}
  retries: {llm: {maxAttempts: 3, initialBackoff: 100ms, maxBackoff: 2s}}
  circuitBreakers: {llm: {consecutiveFailures: 5, openFor: 30s}}
  targets:
  - {upstream: openai, timeout: llm, retry: llm, circuitBreaker: llm}
"#;

    #[test]
    fn upstreams_become_routes_with_their_policies_and_the_rest_is_noted() {
        let (routes, notes) = Routes::from_config(&config(MESH), Defaults::default()).expect("ok");
        assert_eq!(routes.names(), ["openai", "tools"]);
        let openai = routes.get("openai").expect("route");
        assert_eq!(openai.origin.to_string(), "https://api.openai.com/");
        assert_eq!(openai.base_path, "/v1");
        assert_eq!(openai.headers.len(), 1, "the literal header only");
        let p = &openai.policy;
        assert_eq!(
            (p.connect, p.per_try, p.total, p.idle),
            (
                Duration::from_secs(2),
                Some(Duration::from_secs(30)),
                Duration::from_secs(120),
                Duration::from_secs(20)
            )
        );
        assert_eq!(p.retry.as_ref().map(|r| r.max_attempts), Some(3));
        assert_eq!(p.breaker.map(|b| b.failure_threshold), Some(5));
        let tools = routes.get("tools").expect("route");
        assert_eq!(tools.base_path, "");
        assert_eq!(tools.policy.retry, None);
        assert_eq!(tools.policy.total, Defaults::default().total);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("spec.headers[1]") && n.contains("Secret")),
            "{notes:?}"
        );
        assert_eq!(
            p.retry.as_ref().map(|r| r.budget_percent),
            Some(20),
            "the default budget"
        );
    }
}
