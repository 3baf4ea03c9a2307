//! Where the agent's calls go, and under which policy: the mesh
//! configuration's Upstreams, each with the ResiliencyPolicy settings its
//! targets name, resolved once per configuration (pure; hot-swapped by the
//! mesh applier). What a route cannot honour is returned as a note for the
//! ACK, never dropped silently. The stack's routing steps sit here too
//! ([`Routing`], [`RefuseUnusable`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use http::{HeaderName, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use statefabric_mesh::EffectiveConfig;
use statefabric_mesh::resiliency::{Jitter, RetryOn};
use statefabric_mesh::secrets::{self, SecretValue};
use statefabric_mesh::upstream::Protocol;
use statefabric_resilience::BreakerConfig;

use super::errors::{EgressBody, EgressError};
use super::stack::{
    Answer, Call, CallNext, CallStep, Next, RequestBody, Result as StepResult, Step, call_next,
};

/// Timeouts and retries when no policy sets them: an LLM call may take
/// minutes, but a stream silent for a minute is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Defaults {
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
pub(crate) struct RetrySettings {
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
pub(crate) struct RoutePolicy {
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
pub(crate) struct Route {
    pub name: String,
    /// Scheme and authority of the upstream.
    pub origin: Uri,
    /// The URL's path, which the agent's path is appended to (no trailing
    /// slash).
    pub base_path: String,
    pub protocol: Protocol,
    /// Added to every request (literal values, and values of Secrets —
    /// marked sensitive, so no log or debug output shows them).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The Upstream's own TLS settings; `None`: the sidecar's roots verify
    /// the URL's host.
    pub tls: Option<Arc<RouteTls>>,
    /// Why calls on this route are refused (503) instead of sent: a Secret
    /// it needs was not given. Sending without the key would only earn
    /// 401s, and a call the agent can tell apart is better.
    pub unusable: Option<String>,
    pub policy: RoutePolicy,
}

/// An Upstream's `spec.tls`, resolved.
#[derive(Clone)]
pub(crate) struct RouteTls {
    /// PEM roots that alone are trusted (from the CA Secret's `ca.crt`).
    pub ca_pem: Option<String>,
    /// The name verified in the upstream's certificate (and sent as SNI).
    pub server_name: Option<rustls_pki_types::ServerName<'static>>,
    /// Built from `ca_pem` (`None`: the sidecar's roots).
    pub client_config: Option<Arc<rustls::ClientConfig>>,
}

/// Equal settings make equal clients (the built config follows `ca_pem`).
impl PartialEq for RouteTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_pem == other.ca_pem && self.server_name == other.server_name
    }
}

impl Eq for RouteTls {}

impl std::fmt::Debug for RouteTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTls")
            .field("own_ca", &self.ca_pem.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Every route of the current configuration, by upstream name.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Routes {
    by_name: BTreeMap<String, Arc<Route>>,
}

impl Routes {
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.by_name.get(name)
    }

    pub(crate) fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    /// The route whose URL has this scheme and authority (default ports
    /// filled in) and the longest base path that `path` starts with; among
    /// equals the first by name (without a path, as for a tunnel: any
    /// route of that origin). For the forward-proxy mode, where the agent
    /// names the upstream's own URL.
    pub(crate) fn by_origin(
        &self,
        scheme: &str,
        authority: &str,
        path: Option<&str>,
    ) -> Option<&Arc<Route>> {
        let wanted = with_port(scheme, authority);
        self.by_name
            .values()
            .filter(|route| {
                route.origin.scheme_str() == Some(scheme)
                    && route
                        .origin
                        .authority()
                        .is_some_and(|a| with_port(scheme, a.as_str()) == wanted)
                    && path.is_none_or(|p| p.starts_with(route.base_path.as_str()))
            })
            .fold(None, |best: Option<&Arc<Route>>, route| match best {
                Some(b) if b.base_path.len() >= route.base_path.len() => Some(b),
                _ => Some(route),
            })
    }

    /// The routes of `config`, and what of it is not applied. `Err` names a
    /// setting that makes the configuration unusable.
    pub(crate) fn from_config(
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
    let mut missing = Vec::new();
    let mut headers = Vec::new();
    for (index, header) in spec.headers.iter().enumerate() {
        let field = format!("{at}: spec.headers[{index}]");
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|e| format!("{field}.name: {e}"))?;
        let value = match (&header.value, &header.secret_key_ref) {
            (Some(value), _) => {
                HeaderValue::from_str(value).map_err(|e| format!("{field}.value: {e}"))?
            }
            (None, Some(r)) => {
                let Some(secret) = given(config, &r.name, &r.key) else {
                    missing.push(format!("{} key {} (header {})", r.name, r.key, header.name));
                    continue;
                };
                let mut value =
                    HeaderValue::from_str(secret.expose().trim_end()).map_err(|_| {
                        // Never the value itself: it is a key.
                        format!(
                            "{field}.secretKeyRef: Secret {} key {} is not a valid header value",
                            r.name, r.key
                        )
                    })?;
                value.set_sensitive(true);
                value
            }
            (None, None) => return Err(format!("{field}: needs value or secretKeyRef")),
        };
        headers.push((name, value));
    }
    let tls = match &spec.tls {
        None => None,
        Some(tls) => {
            let ca_pem = match &tls.ca {
                None => None,
                Some(ca) => match given(config, &ca.name, secrets::CA_KEY) {
                    Some(pem) => Some(pem.expose().to_owned()),
                    None => {
                        missing.push(format!("{} key {} (spec.tls.ca)", ca.name, secrets::CA_KEY));
                        None
                    }
                },
            };
            let server_name = match &tls.server_name {
                None => None,
                Some(n) => Some(
                    rustls_pki_types::ServerName::try_from(n.clone())
                        .map_err(|e| format!("{at}: spec.tls.serverName {n}: {e}"))?,
                ),
            };
            let client_config = match &ca_pem {
                None => None,
                Some(pem) => Some(Arc::new(
                    super::tls_config_with_roots(pem.as_bytes()).map_err(|e| {
                        format!("{at}: spec.tls.ca: Secret key {}: {e:#}", secrets::CA_KEY)
                    })?,
                )),
            };
            Some(Arc::new(RouteTls {
                ca_pem,
                server_name,
                client_config,
            }))
        }
    };
    let unusable = (!missing.is_empty()).then(|| {
        let reason = format!(
            "Secret {} not given to this sidecar (it does not exist, is not labelled {}=true, or the control plane may not read it)",
            missing.join(", Secret "),
            secrets::EGRESS_LABEL
        );
        notes.push(format!("{at}: {reason}; calls are refused with 503"));
        reason
    });
    let (policy, mut more) = policy(config, name, defaults)?;
    notes.append(&mut more);
    Ok((
        Route {
            name: name.clone(),
            origin,
            base_path: url.path().trim_end_matches('/').to_owned(),
            protocol: spec.protocol,
            headers,
            tls,
            unusable,
            policy,
        },
        notes,
    ))
}

/// The value of a Secret's key, as the configuration gives it.
fn given<'a>(config: &'a EffectiveConfig, secret: &str, key: &str) -> Option<&'a SecretValue> {
    config.secrets.get(&secrets::reference(secret, key))
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
                    tokens_per_minute: l.tokens_per_minute,
                    queue: l.queue,
                    // Without a bound, a queued call waits a second at most.
                    queue_timeout: l.queue_timeout.map_or(Duration::from_secs(1), |d| d.get()),
                });
            } else {
                named("limit", &target.limit, false)?;
            }
        }
    }
    Ok((resolved, notes))
}

/// The stack's routing: `/<upstream>/<rest>?<query>` names the route;
/// the request goes on with the upstream's URI.
#[derive(Debug, Clone)]
pub(crate) struct Routing(pub Arc<arc_swap::ArcSwap<Routes>>);

impl Step<Request<Incoming>> for Routing {
    type Response = Response<EgressBody>;
    type NextRequest = Call;
    type NextResponse = Response<EgressBody>;

    fn call<S>(
        &self,
        mut request: Request<Incoming>,
        next: S,
    ) -> impl Future<Output = StepResult<Response<EgressBody>>> + Send + 'static
    where
        S: Next<Call, Response<EgressBody>>,
    {
        let routed = route_of(
            &self.0.load(),
            request.method(),
            request.version(),
            request.uri(),
        );
        async move {
            let (route, uri) = routed?;
            tracing::Span::current().record("upstream", route.name.as_str());
            *request.uri_mut() = uri;
            let request = request.map(RequestBody::Streamed);
            call_next(next, Call { route, request }).await
        }
    }
}

/// A route missing a Secret it needs refuses its calls.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefuseUnusable;

impl CallStep for RefuseUnusable {
    // Not `async fn`: the future must not borrow the step ('static).
    #[allow(clippy::manual_async_fn)]
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static {
        async move {
            if let Some(reason) = &call.route.unusable {
                return Err(EgressError::Unusable {
                    upstream: call.route.name.clone(),
                    reason: reason.clone(),
                });
            }
            call_next(next, call).await
        }
    }
}

/// `host:port`, the scheme's default port filled in.
fn with_port(scheme: &str, authority: &str) -> String {
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']');
    if has_port {
        authority.to_ascii_lowercase()
    } else {
        let port = if scheme == "https" { 443 } else { 80 };
        format!("{}:{port}", authority.to_ascii_lowercase())
    }
}

/// The route and the upstream's URI of an agent's request: by the path's
/// first segment (`/<upstream>/<rest>`); or, in the forward-proxy mode, by
/// the URL the agent names (absolute-form, from an `HTTP_PROXY` client) or
/// the host it tunnels to (`CONNECT`, from an `HTTPS_PROXY` client) — only
/// an Upstream's own origin is reachable either way. Only an HTTP/1 request
/// names a URL to proxy to by its form: every HTTP/2 request carries a
/// scheme and authority (the sidecar's own address, from an h2c or gRPC
/// client), so there the path routes.
fn route_of(
    routes: &Routes,
    method: &http::Method,
    version: http::Version,
    uri: &Uri,
) -> Result<(Arc<Route>, Uri), EgressError> {
    let known = || routes.names().into_iter().map(str::to_owned).collect();
    let http1 = version < http::Version::HTTP_2;
    let proxied = match (method, uri.scheme_str(), uri.authority()) {
        (&http::Method::CONNECT, _, Some(authority)) => Some(("https", authority, None)),
        (_, Some(scheme), Some(authority)) if http1 => Some((scheme, authority, Some(uri.path()))),
        _ => None,
    };
    if let Some((scheme, authority, path)) = proxied {
        return match routes.by_origin(scheme, authority.as_str(), path) {
            Some(route) => Ok((route.clone(), uri.clone())),
            None => Err(EgressError::UnknownUpstream {
                name: format!("{scheme}://{authority}"),
                known: known(),
            }),
        };
    }
    let path = uri.path().trim_start_matches('/');
    let (name, rest) = path.split_once('/').unwrap_or((path, ""));
    if name.is_empty() {
        return Err(EgressError::NoUpstream { known: known() });
    }
    let Some(route) = routes.get(name) else {
        return Err(EgressError::UnknownUpstream {
            name: name.to_owned(),
            known: known(),
        });
    };
    let bad = |reason: String| EgressError::BadRequest {
        upstream: route.name.clone(),
        reason,
    };
    let mut target = format!("{}/{rest}", route.base_path);
    if let Some(query) = uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = route.origin.clone().into_parts();
    parts.path_and_query = Some(
        target
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?,
    );
    let uri = Uri::from_parts(parts).map_err(|e| bad(e.to_string()))?;
    Ok((route.clone(), uri))
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
                .any(|n| n.contains("Secret openai key bearer (header Authorization)")),
            "{notes:?}"
        );
        assert!(
            openai
                .unusable
                .as_deref()
                .is_some_and(|r| r.contains("not given")),
            "without its key the route refuses calls"
        );
        assert_eq!(tools.unusable, None);
        assert_eq!(
            p.retry.as_ref().map(|r| r.budget_percent),
            Some(20),
            "the default budget"
        );
    }

    const SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: openai, labels: {statefabric.io/egress: "true"}}
stringData: {bearer: "Bearer sk-test\n"}
"#;

    #[test]
    fn a_header_from_a_labelled_secret_is_added_and_marked_sensitive() {
        let (routes, notes) =
            Routes::from_config(&config(&format!("{MESH}---{SECRET}")), Defaults::default())
                .expect("ok");
        let openai = routes.get("openai").expect("route");
        assert_eq!(openai.unusable, None, "{notes:?}");
        let (name, value) = &openai.headers[1];
        assert_eq!(name, "authorization");
        assert_eq!(value, "Bearer sk-test", "a trailing newline is dropped");
        assert!(value.is_sensitive());
        assert!(!format!("{openai:?}").contains("sk-test"));
    }

    #[test]
    fn an_upstreams_own_ca_and_server_name_are_checked_when_read() {
        let tls = |ca: &str, name: &str| {
            format!(
                r#"
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {{name: internal}}
spec:
  url: https://10.0.0.1:8443/
  tls: {{ca: {{name: internal-ca}}, serverName: "{name}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: internal-ca, labels: {{statefabric.io/egress: "true"}}}}
stringData: {{ca.crt: "{ca}"}}
"#
            )
        };
        let err = Routes::from_config(
            &config(&tls("not a certificate", "api.internal")),
            Defaults::default(),
        )
        .expect_err("no certificate");
        assert!(
            err.contains("spec.tls.ca") && err.contains("no PEM certificate"),
            "{err}"
        );
        // (A CA that parses is used against a real server: tests/tests/egress_tls.rs.)
        let err = Routes::from_config(&config(&tls("x", "not a name!")), Defaults::default())
            .expect_err("bad name");
        assert!(err.contains("spec.tls.serverName"), "{err}");
    }

    #[test]
    fn the_proxy_mode_finds_an_upstream_by_its_origin_and_longest_base_path() {
        let yaml = r#"
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: a-root}
spec: {url: "http://api.local"}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: b-v1}
spec: {url: "http://api.local:80/v1"}
---
apiVersion: statefabric.io/v1alpha1
kind: Upstream
metadata: {name: secure}
spec: {url: "https://api.local/v1"}
"#;
        let (routes, _) = Routes::from_config(&config(yaml), Defaults::default()).expect("ok");
        let name = |scheme, authority, path| {
            routes
                .by_origin(scheme, authority, path)
                .map(|r| r.name.as_str())
        };
        assert_eq!(name("http", "api.local", Some("/v1/chat")), Some("b-v1"));
        assert_eq!(name("http", "API.local:80", Some("/other")), Some("a-root"));
        assert_eq!(name("https", "api.local:443", None), Some("secure"));
        assert_eq!(name("https", "api.local", Some("/other")), None);
        assert_eq!(name("http", "api.local:8080", Some("/v1")), None);
        let (route, uri) = route_of(
            &routes,
            &http::Method::CONNECT,
            http::Version::HTTP_11,
            &"api.local:443".parse().expect("uri"),
        )
        .expect("tunnel");
        assert_eq!(
            (route.name.as_str(), uri.to_string().as_str()),
            ("secure", "api.local:443")
        );
        let err = route_of(
            &routes,
            &http::Method::GET,
            http::Version::HTTP_11,
            &"http://elsewhere.local/x".parse().expect("uri"),
        )
        .expect_err("no such origin");
        assert!(err.to_string().contains("http://elsewhere.local"), "{err}");
        // Over HTTP/2 the same form is the sidecar's own address: the path
        // names the upstream.
        let (route, uri) = route_of(
            &routes,
            &http::Method::GET,
            http::Version::HTTP_2,
            &"http://127.0.0.1:7480/b-v1/chat".parse().expect("uri"),
        )
        .expect("routed by path");
        assert_eq!(
            (route.name.as_str(), uri.to_string().as_str()),
            ("b-v1", "http://api.local:80/v1/chat")
        );
    }
}
