//! Kubernetes Events for what the injector did to a pod, on the pod's
//! owning workload (its controller: a ReplicaSet, Job, StatefulSet …), or
//! on the pod itself when it has none: `Injected`, `Skipped` (opted out,
//! hostNetwork) and `Denied` (a Warning, with the reason). Pods that simply
//! carry no annotation get no Event — they are most pods, and the metric
//! counts them. Dry runs get none (no side effects). Published in the
//! background: an answer to the API server never waits for an Event.
//!
//! Like client-go's event spam filter, each (workload, reason) may publish
//! a burst of [`BURST`] Events and then one per [`REFILL`]: a Deployment
//! scaled to hundreds of replicas must not turn into hundreds of writes to
//! the API server (the metric still counts every review).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::time::Instant;

use crate::patch::{Decision, Denial, Skip};

/// Events a (workload, reason) may publish at once.
pub const BURST: f64 = 25.0;
/// How long until it may publish one more.
pub const REFILL: Duration = Duration::from_secs(300);
/// Buckets kept; beyond this, full ones are forgotten.
const MAX_BUCKETS: usize = 10_000;

/// Tokens left and when they were counted, per (subject, reason).
type Buckets = HashMap<(String, &'static str), (f64, Instant)>;

/// Publishes the injector's Events.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    buckets: Arc<Mutex<Buckets>>,
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
            buckets: Arc::default(),
        }
    }

    /// Takes a token for (subject, reason), if one is left.
    fn allowed(&self, subject: &ObjectReference, reason: &'static str) -> bool {
        let key = (
            format!(
                "{}/{}/{}",
                subject.namespace.as_deref().unwrap_or_default(),
                subject.kind.as_deref().unwrap_or_default(),
                subject.name.as_deref().unwrap_or_default()
            ),
            reason,
        );
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS {
            let full = |(tokens, at): &(f64, Instant)| {
                tokens + now.duration_since(*at).as_secs_f64() / REFILL.as_secs_f64() >= BURST
            };
            buckets.retain(|_, bucket| !full(bucket));
        }
        let (tokens, at) = buckets.entry(key).or_insert((BURST, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() / REFILL.as_secs_f64()).min(BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
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
        if !self.allowed(&subject, reason) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_workload_gets_a_burst_then_one_event_per_refill() {
        let client = Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("uri"),
        ))
        .expect("client");
        let events = Events::new(client, "test".into());
        let rs = ObjectReference {
            kind: Some("ReplicaSet".into()),
            name: Some("agents-1".into()),
            namespace: Some("a".into()),
            ..ObjectReference::default()
        };
        let allowed = (0..100).filter(|_| events.allowed(&rs, "Injected")).count();
        assert_eq!(allowed, 25);
        let other = ObjectReference {
            name: Some("agents-2".into()),
            ..rs.clone()
        };
        assert!(
            events.allowed(&other, "Injected"),
            "another workload: its own burst"
        );
        assert!(
            events.allowed(&rs, "Denied"),
            "another reason: its own burst"
        );
        tokio::time::advance(REFILL).await;
        assert!(events.allowed(&rs, "Injected"));
        assert!(!events.allowed(&rs, "Injected"));
    }
}
