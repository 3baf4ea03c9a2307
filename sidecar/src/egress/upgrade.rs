//! Protocol upgrades (WebSocket) through the egress path: the agent's
//! `Connection: upgrade` request goes to the upstream over HTTP/1.1 with its
//! upgrade headers kept; when the upstream answers 101, the two upgraded
//! connections are joined and bytes flow both ways until either side
//! closes. Connection-level only: timeouts bound the handshake, not the
//! session, and nothing inside the tunnel is retried or recorded.

use std::future::Future;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use statefabric_mesh::upstream::Protocol;

use super::body::IdleBody;
use super::client::{Clients, send, to_upstream};
use super::errors::{EgressBody, EgressError};
use super::routes::Route;
use super::stack::{Answer, Call, CallNext, CallStep, call_next};

/// Whether the agent asks to switch protocols.
fn requested(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// The upstream's request: the agent's headers as the normal path builds
/// them, with the upgrade's own put back (they are hop-by-hop).
fn upstream_request(
    mut headers: HeaderMap,
    agent: &HeaderMap,
    method: http::Method,
    uri: Uri,
) -> Request<EgressBody> {
    if let Some(upgrade) = agent.get(header::UPGRADE) {
        headers.insert(header::UPGRADE, upgrade.clone());
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let mut request = Request::new(Empty::new().map_err(|never| match never {}).boxed());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// Joins the agent's connection and the upstream's once both are upgraded;
/// the 101 goes back to the agent with the upstream's headers.
fn join(
    route: &Route,
    agent: hyper::upgrade::OnUpgrade,
    mut upstream: Response<Incoming>,
) -> Result<Response<EgressBody>, EgressError> {
    let upstream_on = hyper::upgrade::on(&mut upstream);
    let name = route.name.clone();
    tokio::spawn(async move {
        match tokio::try_join!(agent, upstream_on) {
            Ok((agent, upstream)) => {
                let (mut a, mut u) = (TokioIo::new(agent), TokioIo::new(upstream));
                if let Err(err) = tokio::io::copy_bidirectional(&mut a, &mut u).await {
                    tracing::debug!(upstream = %name, error = %err, "upgraded connection ended");
                }
            }
            Err(err) => {
                tracing::warn!(upstream = %name, error = %err, "protocol upgrade failed");
            }
        }
    });
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = upstream.headers().clone();
    Ok(response)
}

/// The stack's upgrade step: a `Connection: upgrade` request is handshaken
/// over HTTP/1.1 within the route's timeouts, then the two connections are
/// joined; any other call goes on down the stack.
#[derive(Clone)]
pub(super) struct Upgrades(pub Arc<Clients>);

impl CallStep for Upgrades {
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let clients = self.0.clone();
        async move {
            if !requested(call.request.headers()) {
                return call_next(next, call).await;
            }
            let Call { route, mut request } = call;
            let agent_side = hyper::upgrade::on(&mut request);
            let mut headers = request.headers().clone();
            to_upstream(&mut headers, &route);
            let upstream = upstream_request(
                headers,
                request.headers(),
                request.method().clone(),
                request.uri().clone(),
            );
            // HTTP/1.1 only (an upgrade is an HTTP/1.1 affair), in a pool of
            // its own so the route's usual client is left as it is.
            let client = clients.upgrade_client(&Route {
                name: format!("{}#upgrade", route.name),
                protocol: Protocol::Http1,
                ..(*route).clone()
            });
            let limit = route
                .policy
                .per_try
                .map_or(route.policy.total, |t| t.min(route.policy.total));
            let response = send(&client, &route, upstream, limit).await?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                // Refused: the upstream's answer goes back as it is.
                return Ok(response.map(|body| {
                    IdleBody::new(body, route.policy.idle, route.name.clone()).boxed()
                }));
            }
            join(&route, agent_side, response)
        }
    }
}
