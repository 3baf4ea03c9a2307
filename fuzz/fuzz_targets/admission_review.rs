#![no_main]
//! The injector's mutating webhook reads AdmissionReviews of pods written by
//! anyone allowed to create a pod: parsing them and deciding
//! (`statefabric_injector::patch::decide`) never panics, and when it
//! injects, its JSON Patch applies to the very pod it was made for, the
//! result is still a Pod, and deciding again on it changes nothing (the API
//! server reinvokes webhooks).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use libfuzzer_sys::fuzz_target;
use statefabric_injector::config::SidecarTemplate;
use statefabric_injector::patch::{Decision, Injection, NamespaceInfo, decide};

fn injection() -> &'static Injection {
    static INJECTION: OnceLock<Injection> = OnceLock::new();
    INJECTION.get_or_init(|| Injection::new(SidecarTemplate::default(), "statefabric-system"))
}

fuzz_target!(|body: &[u8]| {
    let Some((&choice, body)) = body.split_first() else {
        return;
    };
    let Ok(review) = serde_json::from_slice::<AdmissionReview<Pod>>(body) else {
        return;
    };
    let Ok(request): Result<AdmissionRequest<Pod>, _> = review.try_into() else {
        return;
    };
    let Some(pod) = request.object else {
        return;
    };
    let mut annotations = BTreeMap::new();
    match choice % 4 {
        0 => {}
        1 => {
            annotations.insert("statefabric.io/inject".to_owned(), "true".to_owned());
        }
        2 => {
            annotations.insert("statefabric.io/inject".to_owned(), "false".to_owned());
        }
        _ => {
            annotations.insert("statefabric.io/inject".to_owned(), "maybe".to_owned());
        }
    }
    let mut labels = BTreeMap::new();
    if choice & 4 == 0 {
        labels.insert("statefabric.io/tenant".to_owned(), "tenant-a".to_owned());
    }
    let namespace = NamespaceInfo {
        name: request
            .namespace
            .clone()
            .unwrap_or_else(|| "agents".to_owned()),
        labels,
        annotations,
    };
    let Ok(Decision::Inject(operations)) = decide(&pod, &namespace, injection()) else {
        return;
    };
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(operations))
        .expect("the injector's patch is a JSON Patch");
    let mut value = serde_json::to_value(&pod).expect("a pod serializes");
    if let Err(e) = json_patch::patch(&mut value, &patch) {
        panic!("the injector's patch does not apply to its own pod: {e}");
    }
    let patched: Pod = serde_json::from_value(value).expect("the patched pod is a Pod");
    assert_eq!(
        decide(&patched, &namespace, injection()),
        Ok(Decision::Unchanged),
        "deciding again on the injected pod changed something"
    );
});
