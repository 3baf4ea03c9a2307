//! `POST /mutate`: an `admission.k8s.io/v1` AdmissionReview in, the review
//! with its response out. Errors become answers in one place
//! ([`answer`]): a pod denied names the annotation or the reason; a body
//! that is not JSON gets 415, a malformed review 400 with what is wrong.
//! `dryRun` requests are answered the same and have no side effects (no
//! Event; the metrics count them apart).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use crate::events::Events;
use crate::patch::{Decision, Denial, Injection, NamespaceInfo, decide};

/// The labels of `injector_reviews`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// injected, unchanged, skipped, denied, error
    pub outcome: &'static str,
    /// The skip or denial reason (empty otherwise).
    pub reason: &'static str,
    /// Whether the review was a dry run (`true`/`false`).
    pub dry_run: &'static str,
}

/// What the handler needs; shared by every request.
#[derive(Clone)]
pub struct Webhook {
    /// The decision's inputs.
    pub injection: Arc<Injection>,
    /// Namespaces as watched (labels and annotations for the decision).
    pub namespaces: Store<Namespace>,
    /// The API server.
    pub client: Client,
    /// Reviews answered, by outcome.
    pub reviews: Family<OutcomeLabels, Counter>,
    /// Publishes the Events of what was done to a pod.
    pub events: Events,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("injection", &self.injection)
            .finish_non_exhaustive()
    }
}

/// The webhook's routes: `POST /mutate` (AdmissionReview v1).
pub fn router(webhook: Webhook) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .with_state(webhook)
}

/// The review as the API server wants it back.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: &'static str,
    kind: &'static str,
    response: Answer,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Refusal>,
    /// Base64 of the JSON Patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct Refusal {
    code: u16,
    reason: &'static str,
    message: String,
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

async fn mutate(State(webhook): State<Webhook>, headers: HeaderMap, body: Bytes) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().map(str::trim) == Some("application/json"));
    if !json {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "an AdmissionReview is sent as application/json",
        )
            .into_response();
    }
    // Parsed straight into a Pod: the webhook is registered for pods only,
    // and one pass over the body is the bulk of a review's cost.
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(err) => return bad_request(format!("not an AdmissionReview of a Pod: {err}")),
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(err) => return bad_request(format!("the AdmissionReview has no request: {err}")),
    };
    let dry_run = if request.dry_run { "true" } else { "false" };
    let (decision, answer) = webhook.review(&request).await;
    if let Some(pod) = &request.object
        && !request.dry_run
    {
        let namespace = request.namespace.as_deref().unwrap_or_default();
        webhook.events.record(pod, namespace, &decision);
    }
    let (outcome, reason) = match &decision {
        Ok(Decision::Inject(_)) => ("injected", ""),
        Ok(Decision::Unchanged) => ("unchanged", ""),
        Ok(Decision::Skip(skip)) => ("skipped", skip.as_str()),
        Err(denial) => ("denied", denial_reason(denial)),
    };
    webhook
        .reviews
        .get_or_create(&OutcomeLabels {
            outcome,
            reason,
            dry_run,
        })
        .inc();
    match &decision {
        Ok(Decision::Inject(_)) => tracing::info!(
            namespace = request.namespace.as_deref().unwrap_or_default(),
            name = request.name,
            dry_run = request.dry_run,
            "sidecar injected"
        ),
        Err(denial) => tracing::info!(
            namespace = request.namespace.as_deref().unwrap_or_default(),
            name = request.name,
            reason = %denial,
            "pod denied"
        ),
        Ok(_) => {}
    }
    axum::Json(Review {
        api_version: "admission.k8s.io/v1",
        kind: "AdmissionReview",
        response: answer,
    })
    .into_response()
}

fn denial_reason(denial: &Denial) -> &'static str {
    match denial {
        Denial::Annotation(_) => "annotation",
        Denial::NoTenant { .. } => "no_tenant",
        Denial::Forged(_) => "forged_sidecar",
        Denial::ReservedVolume(_) => "reserved_volume",
        Denial::CredentialsReference(..) => "credentials_reference",
        Denial::NoSpec => "no_spec",
    }
}

impl Webhook {
    /// Decides for one request; the answer echoes its uid.
    async fn review(&self, request: &AdmissionRequest<Pod>) -> (Result<Decision, Denial>, Answer) {
        // Only pod creation is ours; anything else the API server sends
        // (a misconfigured rule) is let through untouched.
        let is_pod_create = request.kind.kind == "Pod" && request.operation == Operation::Create;
        let decision = match (&request.object, is_pod_create) {
            (Some(pod), true) => {
                let namespace = self
                    .namespace(request.namespace.as_deref().unwrap_or_default())
                    .await;
                decide(pod, &namespace, &self.injection)
            }
            _ => Ok(Decision::Unchanged),
        };
        let answer = answer(request.uid.clone(), &decision);
        (decision, answer)
    }

    /// The namespace's labels and annotations, from the watched copy, or
    /// asked for when it is too new to have been seen.
    async fn namespace(&self, name: &str) -> NamespaceInfo {
        let maps = |n: &Namespace| {
            (
                n.metadata.labels.clone().unwrap_or_default(),
                n.metadata.annotations.clone().unwrap_or_default(),
            )
        };
        let (labels, annotations) = match self.namespaces.get(&ObjectRef::new(name)) {
            Some(found) => maps(&found),
            None => Api::<Namespace>::all(self.client.clone())
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .map(|n| maps(&n))
                .unwrap_or((BTreeMap::new(), BTreeMap::new())),
        };
        NamespaceInfo {
            name: name.to_owned(),
            labels,
            annotations,
        }
    }
}

/// A decision as the response to the API server.
fn answer(uid: String, decision: &Result<Decision, Denial>) -> Answer {
    match decision {
        Ok(Decision::Inject(ops)) => Answer {
            uid,
            allowed: true,
            status: None,
            patch: Some(
                base64::engine::general_purpose::STANDARD
                    .encode(serde_json::to_vec(ops).unwrap_or_default()),
            ),
            patch_type: Some("JSONPatch"),
        },
        Ok(Decision::Skip(_) | Decision::Unchanged) => Answer {
            uid,
            allowed: true,
            status: None,
            patch: None,
            patch_type: None,
        },
        Err(denial) => Answer {
            uid,
            allowed: false,
            status: Some(Refusal {
                code: 403,
                reason: "Forbidden",
                message: format!("statefabric injector: {denial}"),
            }),
            patch: None,
            patch_type: None,
        },
    }
}
