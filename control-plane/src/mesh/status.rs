//! Writes each mesh resource's status: `Ready` (or why not, naming the
//! field) and how the sidecars subscribed to this replica took the
//! configuration it is part of (applied, refused with the newest NACKs,
//! sidecars per version). The leader writes, at most once per interval,
//! and only where the status the API server has (as the reflector last saw
//! it) differs from the one computed: a status someone else overwrote is
//! written again.
//!
//! Partial: the counts are this replica's subscribers; with several
//! replicas each sees only the sidecars connected to it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use statefabric_mesh::status::{MeshStatus, Nack, READY, SidecarCounts};
use statefabric_mesh::validate::{Problem, problems};
use statefabric_mesh::{Catalog, FabricConfig, ResiliencyPolicy, Upstream};

use super::distribution::{SidecarState, Sidecars};

/// One pass over every FabricConfig, ResiliencyPolicy and Upstream.
pub async fn write(client: &Client, current: &Catalog, sidecars: &Sidecars) {
    let refused = problems(current);
    let states = sidecars.snapshot();
    write_all(client, &current.fabric_configs, &refused, &states).await;
    write_all(client, &current.policies, &refused, &states).await;
    write_all(client, &current.upstreams, &refused, &states).await;
}

/// Whether the sidecar's configuration includes this resource.
fn uses(state: &SidecarState, kind: &str, name: &str) -> bool {
    let config = &state.config;
    match kind {
        "FabricConfig" => config
            .fabric_config
            .as_ref()
            .is_some_and(|c| c.name == name),
        "ResiliencyPolicy" => config.policies.iter().any(|p| p.name == name),
        _ => config.upstreams.iter().any(|u| u.name == name),
    }
}

async fn write_all<K>(
    client: &Client,
    resources: &[K],
    refused: &[Problem],
    states: &[SidecarState],
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
        let users: Vec<&SidecarState> = states
            .iter()
            .filter(|s| s.identity.namespace == namespace && uses(s, &kind, &name))
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
                    .filter(|s| s.applied.as_deref() == Some(&s.config.version())),
            ),
            refused: count(users.iter().filter(|s| s.refused.is_some())),
            versions,
            nacks: users
                .iter()
                .filter_map(|s| {
                    s.refused.as_ref().map(|(version, reason)| Nack {
                        pod: s.identity.pod.clone(),
                        version: version.clone(),
                        reason: reason.clone(),
                    })
                })
                .take(16)
                .collect(),
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

fn count<'a>(states: impl Iterator<Item = &'a &'a SidecarState>) -> u32 {
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
