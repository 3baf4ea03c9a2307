//! Kubernetes Events for what the injector did to a pod, on the pod's
//! owning workload (its controller: a ReplicaSet, Job, StatefulSet …), or
//! on the pod itself when it has none: `Injected`, `Skipped` (opted out,
//! hostNetwork) and `Denied` (a Warning, with the reason). Pods that simply
//! carry no annotation get no Event — they are most pods, and the metric
//! counts them. Dry runs get none (no side effects). Published in the
//! background: an answer to the API server never waits for an Event.

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::patch::{Decision, Denial, Skip};

/// Publishes the injector's Events.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// `instance`: this replica (its pod name, else host name).
    pub fn new(client: Client, instance: String) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "statefabric-injector".to_owned(),
                    instance: Some(instance),
                },
            ),
        }
    }

    /// Records what was decided for `pod` (created in `namespace`).
    pub fn record(&self, pod: &Pod, namespace: &str, decision: &Result<Decision, Denial>) {
        let (type_, reason, note) = match decision {
            Ok(Decision::Inject(_)) => (
                EventType::Normal,
                "Injected",
                "the Statefabric sidecar was added".to_owned(),
            ),
            Ok(Decision::Skip(skip @ (Skip::OptedOut | Skip::HostNetwork))) => (
                EventType::Normal,
                "Skipped",
                format!("no Statefabric sidecar: {}", skip.as_str()),
            ),
            Err(denial) => (EventType::Warning, "Denied", denial.to_string()),
            Ok(Decision::Skip(_) | Decision::Unchanged) => return,
        };
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "InjectSidecar".to_owned(),
            secondary: None,
        };
        let subject = subject(pod, namespace);
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(err) = recorder.publish(&event, &subject).await {
                tracing::warn!(error = %err, "publishing an Event");
            }
        });
    }
}

/// The pod's controller, or the pod (named, or by the name it will get a
/// prefix of).
fn subject(pod: &Pod, namespace: &str) -> ObjectReference {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match owner {
        Some(owner) => ObjectReference {
            api_version: Some(owner.api_version.clone()),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: Some(namespace.to_owned()),
            uid: Some(owner.uid.clone()),
            ..ObjectReference::default()
        },
        None => ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: pod
                .metadata
                .name
                .clone()
                .or_else(|| pod.metadata.generate_name.clone()),
            namespace: Some(namespace.to_owned()),
            ..ObjectReference::default()
        },
    }
}
