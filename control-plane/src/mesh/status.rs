//! Writes each mesh resource's status: `Ready` (or why not, naming the
//! field) and how the sidecars took the configuration it is part of
//! (applied, refused with the newest NACKs, settings not applied, sidecars
//! per version), counted over the subscribers of every replica (from the
//! [`Directory`](super::directory::Directory)). The leader writes, at most
//! once per interval, and only where the status the API server has (as the
//! reflector last saw it) differs from the one computed: a status someone
//! else overwrote is written again.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use statefabric_mesh::status::{MeshStatus, Nack, NotApplied, READY, SidecarCounts};
use statefabric_mesh::validate::{Problem, problems};
use statefabric_mesh::{Catalog, FabricConfig, ResiliencyPolicy, Upstream};

use super::directory::SidecarRecord;

/// One pass over every FabricConfig, ResiliencyPolicy and Upstream.
pub async fn write(client: &Client, current: &Catalog, sidecars: &[SidecarRecord]) {
    let refused = problems(current);
    write_all(client, &current.fabric_configs, &refused, sidecars).await;
    write_all(client, &current.policies, &refused, sidecars).await;
    write_all(client, &current.upstreams, &refused, sidecars).await;
}

async fn write_all<K>(
    client: &Client,
    resources: &[K],
    refused: &[Problem],
    states: &[SidecarRecord],
) where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug
        + HasMeshStatus,
{
    let kind = K::kind(&()).to_string();
    for resource in resources {
        let namespace = resource.namespace().unwrap_or_default();
        let name = resource.name_any();
        let problem = refused
            .iter()
            .find(|p| p.kind == kind && p.namespace == namespace && p.name == name);
        let users: Vec<&SidecarRecord> = states
            .iter()
            .filter(|s| s.namespace == namespace && s.uses(&kind, &name))
            .collect();
        // A sidecar's notes name their resource first: `Kind name: field …`.
        let prefix = format!("{kind} {name}:");
        let not_applied: Vec<NotApplied> = users
            .iter()
            .filter(|s| s.applied.as_deref() == Some(&s.sent))
            .flat_map(|s| {
                s.not_applied
                    .iter()
                    .filter(|note| note.starts_with(&prefix))
                    .map(|note| NotApplied {
                        pod: s.pod.clone(),
                        setting: note.clone(),
                    })
            })
            .collect();
        let mut versions: BTreeMap<String, u32> = BTreeMap::new();
        for state in &users {
            if let Some(version) = &state.applied {
                *versions.entry(version.clone()).or_default() += 1;
            }
        }
        let counts = SidecarCounts {
            applied: count(
                users
                    .iter()
                    .filter(|s| s.applied.as_deref() == Some(&s.sent)),
            ),
            refused: count(users.iter().filter(|s| s.refused.is_some())),
            not_applied: u32::try_from(
                not_applied
                    .iter()
                    .map(|n| &n.pod)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len(),
            )
            .unwrap_or(u32::MAX),
            versions,
            nacks: users
                .iter()
                .filter_map(|s| {
                    s.refused.as_ref().map(|r| Nack {
                        pod: s.pod.clone(),
                        version: r.version.clone(),
                        reason: r.reason.clone(),
                    })
                })
                .take(16)
                .collect(),
            not_applied_settings: not_applied.into_iter().take(16).collect(),
        };
        let previous = resource.mesh_status();
        let ready = match problem {
            None => ("True", "Valid", "accepted".to_owned()),
            Some(p) => ("False", "Invalid", format!("{}: {}", p.field, p.message)),
        };
        let generation = resource.meta().generation;
        let status = MeshStatus {
            observed_generation: generation,
            conditions: vec![condition(
                previous
                    .map(|p| p.conditions.as_slice())
                    .unwrap_or_default(),
                ready,
                generation,
            )],
            sidecars: Some(counts),
        };
        if previous == Some(&status) {
            continue;
        }
        let Ok(value) = serde_json::to_value(&status) else {
            continue;
        };
        let api: Api<K> = Api::namespaced(client.clone(), &namespace);
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": value })),
            )
            .await
        {
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%kind, %namespace, %name, error = %err, "writing status");
            }
        }
    }
}

fn count<'a>(states: impl Iterator<Item = &'a &'a SidecarRecord>) -> u32 {
    u32::try_from(states.count()).unwrap_or(u32::MAX)
}

/// `Ready` as it is now, keeping the transition time while it holds.
pub(super) fn condition(
    previous: &[Condition],
    (status, reason, message): (&str, &str, String),
    generation: Option<i64>,
) -> Condition {
    let before = previous
        .iter()
        .find(|c| c.type_ == READY)
        .filter(|c| c.status == status);
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: before
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now())),
    }
}

/// The kinds whose status is a [`MeshStatus`].
pub trait HasMeshStatus {
    /// The status as last read (none before the first write).
    fn mesh_status(&self) -> Option<&MeshStatus>;
}

impl HasMeshStatus for FabricConfig {
    fn mesh_status(&self) -> Option<&MeshStatus> {
        self.status.as_ref()
    }
}

impl HasMeshStatus for ResiliencyPolicy {
    fn mesh_status(&self) -> Option<&MeshStatus> {
        self.status.as_ref()
    }
}

impl HasMeshStatus for Upstream {
    fn mesh_status(&self) -> Option<&MeshStatus> {
        self.status.as_ref()
    }
}
