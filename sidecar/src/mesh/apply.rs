//! What a mesh configuration changes in the running sidecar.
//!
//! [`Applier::apply`] first turns the whole configuration into a [`Plan`]
//! (nothing touched yet), so a configuration it refuses changes nothing;
//! then it swaps each hot part at once. Calls in flight keep the setting
//! they started with.
//!
//! Hot, from the FabricConfig: session namespaces and TTL policies, cache
//! bounds and max age, lock limits, the log level. From the
//! ResiliencyPolicies whose targets name one of the sidecar's dependencies:
//! - `redis`: the command deadline (`timeout.perTry`, else `total`) and the
//!   circuit breaker (consecutive failures or failure rate, open duration,
//!   half-open probes) of the shared Redis connection;
//! - `controlPlane`: the connect timeout (`timeout.connect`) and the
//!   reconnect backoff (`retry.initialBackoff` .. `maxBackoff`) of this
//!   very subscription.
//!
//! A part the configuration stops setting returns to what the sidecar's own
//! TOML says. What is not applied is named in the ACK (and so in the
//! resource's status), never dropped silently: backends and building blocks
//! changed since the sidecar started (they take effect at its next start),
//! and settings it does not act on for a dependency (see [`Plan::notes`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use statefabric_mesh::EffectiveConfig;
use statefabric_mesh::effective::Named;
use statefabric_mesh::fabric_config::{Backends, BuildingBlock, Expiry as MeshExpiry};
use statefabric_mesh::resiliency::{BreakerPolicy, Dependency, ResiliencyPolicySpec};
use statefabric_redis::Redis;
use statefabric_resilience::{BreakerConfig, FailureRate};
use statefabric_runtime::LogFilter;
use statefabric_session::{Expiry, Policy};

use crate::cache::{CacheLimits, ContextCache};
use crate::config::MeshClientConfig;
use crate::locks::LockLimits;
use crate::sessions::SessionPolicies;

/// How the sidecar reaches the control plane; changeable by a policy that
/// targets the `controlPlane` dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkSettings {
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl LinkSettings {
    /// As the sidecar's `[mesh]` section says.
    pub(crate) fn configured(config: &MeshClientConfig) -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            reconnect_min: config.reconnect_min,
            reconnect_max: config.reconnect_max,
        }
    }
}

/// The parts of the running sidecar a configuration changes; clones share
/// them with the services that read them.
#[derive(Debug, Clone)]
pub(crate) struct Hot {
    pub sessions: SessionPolicies,
    pub cache: Arc<ContextCache>,
    pub locks: LockLimits,
    pub log_filter: LogFilter,
    pub redis: Option<Redis>,
    pub link: Arc<ArcSwap<LinkSettings>>,
    /// The egress path and its defaults (`None`: egress is off).
    pub egress: Option<(Arc<crate::egress::Egress>, crate::egress::routes::Defaults)>,
}

/// What the sidecar's own configuration says, restored when a mesh
/// configuration stops setting a part.
#[derive(Debug, Clone)]
struct Defaults {
    cache: CacheLimits,
    log_level: String,
    redis: Option<(Duration, BreakerConfig)>,
    link: LinkSettings,
}

/// What needs a restart, as first applied in this process.
#[derive(Debug, Clone, PartialEq)]
struct AtStart {
    backends: Backends,
    building_blocks: Option<Vec<BuildingBlock>>,
}

/// Applies configurations to the running sidecar.
#[derive(Debug)]
pub(super) struct Applier {
    hot: Hot,
    defaults: Defaults,
    at_start: std::sync::Mutex<Option<AtStart>>,
}

/// One configuration, checked and resolved, not yet applied.
#[derive(Debug)]
struct Plan {
    sessions: BTreeMap<String, Policy>,
    cache: CacheLimits,
    lock_lease: Option<Duration>,
    lock_wait: Option<Duration>,
    log_level: String,
    redis: Option<(Duration, BreakerConfig)>,
    link: LinkSettings,
    restart: AtStart,
    /// The egress routes (`None`: egress is off).
    egress: Option<crate::egress::routes::Routes>,
    /// Settings not applied, each naming its resource and field.
    notes: Vec<String>,
}

impl Applier {
    /// Takes the running values of every hot part as the defaults.
    pub(super) fn new(hot: Hot, log_level: &str) -> Self {
        let defaults = Defaults {
            cache: hot.cache.limits(),
            log_level: log_level.to_owned(),
            redis: hot
                .redis
                .as_ref()
                .map(|r| (r.guard().timeout(), r.guard().breaker().config())),
            link: **hot.link.load(),
        };
        Self {
            hot,
            defaults,
            at_start: std::sync::Mutex::new(None),
        }
    }

    pub(super) fn link(&self) -> LinkSettings {
        **self.hot.link.load()
    }

    /// Applies what is hot and returns what was not applied; `Err` (the
    /// NACK's reason) changes nothing.
    pub(super) fn apply(&self, config: &EffectiveConfig) -> Result<Vec<String>, String> {
        let mut plan = self.plan(config)?;
        {
            let mut at_start = self
                .at_start
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let started = at_start.get_or_insert_with(|| plan.restart.clone());
            if let Some(fabric) = &config.fabric_config {
                if started.backends != plan.restart.backends {
                    plan.notes.push(format!(
                        "FabricConfig {}: spec.backends changed; takes effect at the sidecar's next start",
                        fabric.name
                    ));
                }
                if started.building_blocks != plan.restart.building_blocks {
                    plan.notes.push(format!(
                        "FabricConfig {}: spec.buildingBlocks changed; takes effect at the sidecar's next start",
                        fabric.name
                    ));
                }
            }
        }
        // Parsed in `plan`: cannot fail here.
        self.hot.log_filter.set(&plan.log_level)?;
        self.hot.sessions.set_mesh(plan.sessions);
        self.hot.cache.set_limits(plan.cache);
        self.hot.locks.set(plan.lock_lease, plan.lock_wait);
        if let (Some(redis), Some((timeout, breaker))) = (&self.hot.redis, plan.redis) {
            redis.guard().set_timeout(timeout);
            redis.guard().breaker().set_config(breaker);
        }
        self.hot.link.store(Arc::new(plan.link));
        if let (Some((egress, _)), Some(routes)) = (&self.hot.egress, plan.egress) {
            egress.set_routes(routes);
        }
        Ok(plan.notes)
    }

    fn plan(&self, config: &EffectiveConfig) -> Result<Plan, String> {
        let defaults = &self.defaults;
        let mut plan = Plan {
            sessions: BTreeMap::new(),
            cache: defaults.cache,
            lock_lease: None,
            lock_wait: None,
            log_level: defaults.log_level.clone(),
            redis: defaults.redis,
            link: defaults.link,
            restart: AtStart {
                backends: Backends::default(),
                building_blocks: None,
            },
            egress: None,
            notes: Vec::new(),
        };
        if let Some(fabric) = &config.fabric_config {
            let name = &fabric.name;
            let spec = &fabric.spec;
            for (namespace, policy) in &spec.sessions {
                let ttl = policy.ttl.get();
                if ttl.is_zero() {
                    return Err(format!(
                        "FabricConfig {name}: spec.sessions.{namespace}.ttl must be positive"
                    ));
                }
                plan.sessions.insert(
                    namespace.clone(),
                    Policy {
                        ttl,
                        expiry: match policy.expiry {
                            MeshExpiry::Absolute => Expiry::Absolute,
                            MeshExpiry::Sliding => Expiry::Sliding,
                        },
                        max_ttl: policy.max_ttl.map(|d| d.get()),
                    },
                );
            }
            let cache = &spec.cache;
            let size = |value: Option<u64>, default: usize| {
                value.map_or(default, |v| usize::try_from(v).unwrap_or(usize::MAX))
            };
            plan.cache = CacheLimits {
                max_entries: size(cache.max_entries, defaults.cache.max_entries),
                max_bytes: size(cache.max_bytes, defaults.cache.max_bytes),
                max_age: cache.max_age.map_or(defaults.cache.max_age, |d| d.get()),
            };
            if cache.max_entries == Some(0) || cache.max_bytes == Some(0) {
                return Err(format!(
                    "FabricConfig {name}: spec.cache bounds must be positive"
                ));
            }
            plan.lock_lease = spec.locks.max_lease.map(|d| d.get());
            plan.lock_wait = spec.locks.max_wait.map(|d| d.get());
            if plan.lock_lease.is_some_and(|d| d.is_zero()) {
                return Err(format!(
                    "FabricConfig {name}: spec.locks.maxLease must be positive"
                ));
            }
            if let Some(level) = spec.log_level {
                plan.log_level = level.as_str().to_owned();
            }
            plan.restart = AtStart {
                backends: spec.backends.clone(),
                building_blocks: spec.building_blocks.clone(),
            };
        }
        // The first policy by name that targets a dependency wins; a later
        // one is named in the notes.
        let mut claimed: BTreeMap<Dependency, &str> = BTreeMap::new();
        for policy in &config.policies {
            for (index, target) in policy.spec.targets.iter().enumerate() {
                let Some(dependency) = target.dependency else {
                    continue; // an egress upstream: the egress path's
                };
                let at = format!("ResiliencyPolicy {}: spec.targets[{index}]", policy.name);
                if let Some(winner) = claimed.get(&dependency) {
                    plan.notes.push(format!(
                        "{at}: {} is already configured by ResiliencyPolicy {winner}; not applied",
                        spelt(dependency)
                    ));
                    continue;
                }
                claimed.insert(dependency, &policy.name);
                self.plan_dependency(&mut plan, policy, index, dependency, &at)?;
            }
        }
        if let Err(reason) = LogFilter::detached().set(&plan.log_level) {
            return Err(format!("spec.logLevel: {reason}"));
        }
        match &self.hot.egress {
            Some((_, defaults)) => {
                let (routes, mut notes) =
                    crate::egress::routes::Routes::from_config(config, *defaults)?;
                plan.notes.append(&mut notes);
                plan.egress = Some(routes);
            }
            None if !config.upstreams.is_empty() => plan
                .notes
                .push("Upstreams: egress is off in this sidecar (egress.enabled)".to_owned()),
            None => {}
        }
        Ok(plan)
    }

    /// Resolves one target's named settings for one dependency.
    fn plan_dependency(
        &self,
        plan: &mut Plan,
        policy: &Named<ResiliencyPolicySpec>,
        index: usize,
        dependency: Dependency,
        at: &str,
    ) -> Result<(), String> {
        let spec = &policy.spec;
        let target = &spec.targets[index];
        let lookup = |field: &str, name: &Option<String>, exists: bool| match name {
            Some(n) if !exists => Err(format!("{at}.{field}: names no entry {n}")),
            _ => Ok(()),
        };
        let timeout = target.timeout.as_ref().and_then(|n| spec.timeouts.get(n));
        lookup("timeout", &target.timeout, timeout.is_some())?;
        let retry = target.retry.as_ref().and_then(|n| spec.retries.get(n));
        lookup("retry", &target.retry, retry.is_some())?;
        let breaker = target
            .circuit_breaker
            .as_ref()
            .and_then(|n| spec.circuit_breakers.get(n));
        lookup("circuitBreaker", &target.circuit_breaker, breaker.is_some())?;
        if target.limit.is_some() {
            plan.notes.push(format!(
                "{at}.limit: limits apply to egress upstreams; the sidecar's own calls to {} are bounded by its pools",
                spelt(dependency)
            ));
        }
        match dependency {
            Dependency::Redis => {
                let Some((default_timeout, default_breaker)) = self.defaults.redis else {
                    plan.notes.push(format!(
                        "{at}: this sidecar does not use Redis; nothing applied"
                    ));
                    return Ok(());
                };
                let deadline = timeout
                    .and_then(|t| t.per_try.or(t.total))
                    .map_or(default_timeout, |d| d.get());
                if deadline.is_zero() {
                    return Err(format!("{at}.timeout: the deadline must be positive"));
                }
                if timeout.is_some_and(|t| t.connect.is_some()) {
                    plan.notes.push(format!(
                        "{at}.timeout.connect: Redis connections are made at start; takes effect at the sidecar's next start"
                    ));
                }
                if retry.is_some() {
                    plan.notes.push(format!(
                        "{at}.retry: not applied to Redis; its adapters retry only what is safe to repeat (a lock or session write is not)"
                    ));
                }
                let breaker = match breaker {
                    Some(b) => {
                        breaker_config(b).map_err(|e| format!("{at}.circuitBreaker: {e}"))?
                    }
                    None => default_breaker,
                };
                plan.redis = Some((deadline, breaker));
            }
            Dependency::ControlPlane => {
                if let Some(connect) = timeout.and_then(|t| t.connect) {
                    plan.link.connect_timeout = connect.get();
                }
                if let Some(retry) = retry {
                    plan.link.reconnect_min = retry.initial_backoff.get();
                    plan.link.reconnect_max = retry.max_backoff.get();
                }
                if plan.link.connect_timeout.is_zero()
                    || plan.link.reconnect_min.is_zero()
                    || plan.link.reconnect_max < plan.link.reconnect_min
                {
                    return Err(format!(
                        "{at}: the control plane's connect timeout and backoff must be positive, maxBackoff at least initialBackoff"
                    ));
                }
                if breaker.is_some() {
                    plan.notes.push(format!(
                        "{at}.circuitBreaker: not applied to the control plane; the subscription backs off instead"
                    ));
                }
            }
            Dependency::Postgres | Dependency::Kafka | Dependency::Registry => {
                plan.notes.push(format!(
                    "{at}: policies for {} are not applied by this sidecar version (its timeouts come from its own configuration)",
                    spelt(dependency)
                ));
            }
        }
        Ok(())
    }
}

/// The dependency as spelt in the resource.
fn spelt(dependency: Dependency) -> &'static str {
    match dependency {
        Dependency::Postgres => "postgres",
        Dependency::Redis => "redis",
        Dependency::Kafka => "kafka",
        Dependency::Registry => "registry",
        Dependency::ControlPlane => "controlPlane",
    }
}

/// A breaker policy as the breaker's settings.
pub(crate) fn breaker_config(policy: &BreakerPolicy) -> Result<BreakerConfig, String> {
    let failure_rate = match (policy.failure_rate_percent, policy.window) {
        (Some(percent), Some(window)) if !window.get().is_zero() => Some(FailureRate {
            percent,
            window: window.get(),
            min_calls: policy.min_calls,
        }),
        (Some(_), _) => return Err("failureRatePercent needs a positive window".to_owned()),
        (None, _) => None,
    };
    if policy.consecutive_failures.is_none() && failure_rate.is_none() {
        return Err("set consecutiveFailures or failureRatePercent".to_owned());
    }
    if policy.open_for.get().is_zero() {
        return Err("openFor must be positive".to_owned());
    }
    Ok(BreakerConfig {
        failure_threshold: policy.consecutive_failures.unwrap_or(0),
        failure_rate,
        open_for: policy.open_for.get(),
        half_open_probes: policy.half_open_probes.max(1),
    })
}

#[cfg(test)]
mod tests {
    use statefabric_mesh::{Catalog, Identity};

    use super::*;

    fn applier() -> Applier {
        let hot = Hot {
            sessions: SessionPolicies::new(BTreeMap::new()),
            cache: Arc::new(ContextCache::new(100, 1_000_000, Duration::from_secs(30))),
            locks: LockLimits::default(),
            log_filter: LogFilter::detached(),
            redis: None,
            link: Arc::new(ArcSwap::from_pointee(LinkSettings {
                connect_timeout: Duration::from_secs(5),
                reconnect_min: Duration::from_millis(200),
                reconnect_max: Duration::from_secs(10),
            })),
            egress: None,
        };
        let mut applier = Applier::new(hot, "info");
        // As if the sidecar used Redis: 2 s deadline, 5 faults open it.
        applier.defaults.redis = Some((Duration::from_secs(2), BreakerConfig::default()));
        applier
    }

    fn config(yaml: &str) -> EffectiveConfig {
        let mut catalog = Catalog::default();
        statefabric_mesh::local::add_documents(&mut catalog, "test", yaml, "agents")
            .expect("documents");
        let identity = Identity {
            namespace: "agents".into(),
            pod: "p".into(),
            ..Identity::default()
        };
        statefabric_mesh::effective(&catalog, &identity).expect("effective")
    }

    const FABRIC: &str = r#"
apiVersion: statefabric.io/v1alpha1
kind: FabricConfig
metadata: {name: agents}
spec:
  default: true
  logLevel: debug
  cache: {maxEntries: 2, maxAge: 5s}
  locks: {maxLease: 30s}
  sessions: {chat: {ttl: 1m}}
  backends: {redis: {addresses: ["redis:6379"]}}
"#;

    const POLICY: &str = r#"
apiVersion: statefabric.io/v1alpha1
kind: ResiliencyPolicy
metadata: {name: a-deps}
spec:
  timeouts: {fast: {perTry: 150ms, connect: 1s}}
  retries: {calm: {maxAttempts: 3, initialBackoff: 1s, maxBackoff: 20s}}
  circuitBreakers: {strict: {consecutiveFailures: 2, openFor: 1m, halfOpenProbes: 3}}
  limits: {few: {maxConcurrency: 4}}
  targets:
  - {dependency: redis, timeout: fast, circuitBreaker: strict, retry: calm, limit: few}
  - {dependency: controlPlane, timeout: fast, retry: calm}
  - {dependency: postgres, timeout: fast}
---
apiVersion: statefabric.io/v1alpha1
kind: ResiliencyPolicy
metadata: {name: b-late}
spec:
  timeouts: {slow: {perTry: 10s}}
  targets: [{dependency: redis, timeout: slow}]
"#;

    #[test]
    fn a_fabric_config_sets_every_hot_part_and_removing_it_restores_the_defaults() {
        let applier = applier();
        let notes = applier.apply(&config(FABRIC)).expect("applied");
        assert!(notes.is_empty(), "{notes:?}");
        let limits = applier.hot.cache.limits();
        assert_eq!(limits.max_entries, 2);
        assert_eq!(limits.max_bytes, 1_000_000, "unset: the sidecar's own");
        assert_eq!(limits.max_age, Duration::from_secs(5));
        assert_eq!(applier.hot.locks.max_lease_ms(), 30_000);
        assert_eq!(applier.hot.locks.max_wait_ms(), crate::locks::MAX_MILLIS);
        let plan = applier.plan(&config(FABRIC)).expect("plan");
        assert_eq!(plan.log_level, "debug");
        assert!(plan.sessions.contains_key("chat"));

        // The same sidecar, its FabricConfig gone: back to its own TOML.
        let notes = applier.apply(&EffectiveConfig::default()).expect("applied");
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(applier.hot.cache.limits().max_entries, 100);
        assert_eq!(applier.hot.locks.max_lease_ms(), crate::locks::MAX_MILLIS);
        assert_eq!(
            applier
                .plan(&EffectiveConfig::default())
                .expect("plan")
                .log_level,
            "info"
        );
    }

    #[test]
    fn backends_changed_after_start_are_named_not_applied() {
        let applier = applier();
        assert!(applier.apply(&config(FABRIC)).expect("applied").is_empty());
        let moved = FABRIC.replace("redis:6379", "elsewhere:6379");
        let notes = applier.apply(&config(&moved)).expect("applied");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("FabricConfig agents: spec.backends changed"),
            "{notes:?}"
        );
    }

    #[test]
    fn policies_resolve_per_dependency_and_name_what_they_do_not_apply() {
        let applier = applier();
        let plan = applier.plan(&config(POLICY)).expect("plan");
        let (deadline, breaker) = plan.redis.expect("redis");
        assert_eq!(deadline, Duration::from_millis(150));
        assert_eq!(breaker.failure_threshold, 2);
        assert_eq!(breaker.open_for, Duration::from_secs(60));
        assert_eq!(breaker.half_open_probes, 3);
        assert_eq!(
            plan.link,
            LinkSettings {
                connect_timeout: Duration::from_secs(1),
                reconnect_min: Duration::from_secs(1),
                reconnect_max: Duration::from_secs(20),
            }
        );
        let notes = plan.notes.join("\n");
        for expected in [
            "ResiliencyPolicy a-deps: spec.targets[0].limit:",
            "ResiliencyPolicy a-deps: spec.targets[0].timeout.connect:",
            "ResiliencyPolicy a-deps: spec.targets[0].retry:",
            "ResiliencyPolicy a-deps: spec.targets[2]: policies for postgres",
            "ResiliencyPolicy b-late: spec.targets[0]: redis is already configured by ResiliencyPolicy a-deps",
        ] {
            assert!(
                notes.contains(expected),
                "{expected} missing from:\n{notes}"
            );
        }
    }

    #[test]
    fn a_refused_configuration_changes_nothing() {
        let applier = applier();
        applier.apply(&config(FABRIC)).expect("applied");
        let bad = r#"
apiVersion: statefabric.io/v1alpha1
kind: FabricConfig
metadata: {name: agents}
spec:
  default: true
  cache: {maxEntries: 7}
  sessions: {chat: {ttl: 0s}}
"#;
        let reason = applier.apply(&config(bad)).expect_err("refused");
        assert!(reason.contains("spec.sessions.chat.ttl"), "{reason}");
        assert_eq!(applier.hot.cache.limits().max_entries, 2, "unchanged");
    }
}
