//! `CONNECT` tunnels of the forward-proxy mode (an `HTTPS_PROXY` client):
//! the agent asks for a tunnel to an Upstream's host, and the sidecar
//! joins the agent's connection to a TCP connection of its own there. The
//! lesser mode: TLS runs end to end, so the sidecar sees no request — it
//! adds no header (the agent must hold the key), retries and records
//! nothing, and applies only what works on a connection: the upstream's
//! concurrency and rate limits (a slot held for the tunnel's life), its
//! circuit breaker and connect timeout, and the byte counts.

use std::future::Future;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::breaker::{Breakers, for_route};
use super::errors::EgressError;
use super::limits::{Limiters, admit};
use super::metrics::EgressMetrics;
use super::stack::{Answer, Call, CallNext, CallStep, call_next};

#[derive(Clone)]
pub(super) struct Tunnels {
    limiters: Arc<Limiters>,
    breakers: Arc<Breakers>,
    metrics: EgressMetrics,
}

impl Tunnels {
    pub(super) fn new(
        limiters: Arc<Limiters>,
        breakers: Arc<Breakers>,
        metrics: EgressMetrics,
    ) -> Self {
        Self {
            limiters,
            breakers,
            metrics,
        }
    }
}

impl CallStep for Tunnels {
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let this = self.clone();
        async move {
            if call.request.method() != Method::CONNECT {
                return call_next(next, call).await;
            }
            let Call { route, mut request } = call;
            let authority = request
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default();
            let slot = admit(&this.limiters, &this.metrics, &route).await?;
            let breaker = for_route(&this.breakers, &route, &this.metrics);
            let permit = match &breaker {
                Some(b) => Some(b.permit().ok_or_else(|| EgressError::CircuitOpen {
                    upstream: route.name.clone(),
                })?),
                None => None,
            };
            let connected = tokio::time::timeout(
                route.policy.connect,
                tokio::net::TcpStream::connect(authority.as_str()),
            )
            .await;
            let upstream = match connected {
                Ok(Ok(stream)) => {
                    if let Some(permit) = permit {
                        permit.success();
                    }
                    stream
                }
                failed => {
                    if let Some(permit) = permit {
                        permit.failure();
                    }
                    return Err(match failed {
                        Ok(Err(err)) => EgressError::Connect {
                            upstream: route.name.clone(),
                            reason: format!("{authority}: {err}"),
                            unanswered: true,
                        },
                        _ => EgressError::Timeout {
                            upstream: route.name.clone(),
                            seconds: route.policy.connect.as_secs_f64(),
                        },
                    });
                }
            };
            let _ = upstream.set_nodelay(true);
            let agent_side = hyper::upgrade::on(&mut request);
            let (sent, received) = (
                this.metrics.bytes(&route.name, "sent"),
                this.metrics.bytes(&route.name, "received"),
            );
            let name = route.name.clone();
            tokio::spawn(async move {
                // The slot is held for as long as the tunnel is open.
                let _slot = slot;
                match agent_side.await {
                    Ok(upgraded) => {
                        let (mut agent, mut upstream) = (TokioIo::new(upgraded), upstream);
                        match tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
                            Ok((to_upstream, to_agent)) => {
                                sent.inc_by(to_upstream);
                                received.inc_by(to_agent);
                            }
                            Err(err) => {
                                tracing::debug!(upstream = %name, error = %err, "tunnel ended");
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(upstream = %name, error = %err, "CONNECT tunnel not established");
                    }
                }
            });
            let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
            *response.status_mut() = StatusCode::OK;
            Ok(response)
        }
    }
}
