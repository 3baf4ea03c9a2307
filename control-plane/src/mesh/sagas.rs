//! SagaDefinitions into the saga engine (leader only): each resource's
//! spec, checked by the saga validator, is registered as a new immutable
//! version whenever it differs from the newest version of that name; the
//! registered version, or the validator's error naming the step, goes into
//! the resource's status. Running sagas keep the version they started on.
//! Definition names are the engine's, shared by all namespaces.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use statefabric_mesh::status::SagaDefinitionStatus;
use statefabric_mesh::{Catalog, SagaDefinition};
use statefabric_saga_engine::engine::Engine;

use super::status::condition;

/// One pass over every SagaDefinition.
pub async fn register_all(client: &Client, current: &Catalog, engine: &Engine) {
    for saga in &current.sagas {
        let status = register(engine, saga).await;
        if saga.status.as_ref() == Some(&status) {
            continue;
        }
        let namespace = saga.namespace().unwrap_or_default();
        let api: Api<SagaDefinition> = Api::namespaced(client.clone(), &namespace);
        if let Err(err) = api
            .patch_status(
                &saga.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
        {
            tracing::warn!(%namespace, name = %saga.name_any(), error = %err, "writing SagaDefinition status");
        }
    }
}

/// Registers the resource's definition if it is new, and says how it went.
async fn register(engine: &Engine, saga: &SagaDefinition) -> SagaDefinitionStatus {
    let name = saga.name_any();
    let generation = saga.meta().generation;
    let previous = saga
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let latest = engine.registry().latest(&name);
    let outcome = match saga
        .spec
        .to_definition(&name, latest.as_ref().map_or(1, |d| d.version))
    {
        Err(err) => {
            let field = err
                .step
                .as_ref()
                .map_or_else(|| "spec".to_owned(), |step| format!("spec.steps.{step}"));
            Err(format!("{field}: {}", err.problem))
        }
        Ok(candidate) => match latest {
            Some(latest) if *latest == candidate => Ok(latest.version),
            _ => {
                let mut next = candidate;
                next.version = latest.map_or(1, |d| d.version + 1);
                let version = next.version;
                match engine.register(next).await {
                    Ok(_) => {
                        tracing::info!(%name, version, "registered a saga definition from its resource");
                        Ok(version)
                    }
                    Err(err) => Err(format!("spec: not registered: {err}")),
                }
            }
        },
    };
    let (ready, registered_version) = match outcome {
        Ok(version) => (
            (
                "True",
                "Registered",
                format!("registered as version {version}"),
            ),
            Some(version),
        ),
        Err(message) => (
            ("False", "Invalid", message),
            saga.status.as_ref().and_then(|s| s.registered_version),
        ),
    };
    SagaDefinitionStatus {
        observed_generation: generation,
        conditions: vec![condition(previous, ready, generation)],
        registered_version,
    }
}
