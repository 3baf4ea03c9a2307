//! The schemas, embedded from `schemas/avro/`, and the idempotent step that
//! registers them: each subject (the record's full name) is set to BACKWARD
//! compatibility — consumers on a new schema can read everything written
//! with the old ones — and the schema is registered (an unchanged schema
//! keeps its id; an incompatible change is refused by the registry).

use std::collections::BTreeMap;

use crate::registry::{RegistryClient, RegistryError};

/// (file, Avro JSON) of every message the system emits.
pub const SCHEMAS: &[(&str, &str)] = &[
    (
        "event_envelope.avsc",
        include_str!("../../../schemas/avro/event_envelope.avsc"),
    ),
    (
        "saga_command.avsc",
        include_str!("../../../schemas/avro/saga_command.avsc"),
    ),
    (
        "saga_reply.avsc",
        include_str!("../../../schemas/avro/saga_reply.avsc"),
    ),
    (
        "saga_state_changed.avsc",
        include_str!("../../../schemas/avro/saga_state_changed.avsc"),
    ),
    (
        "context_changed.avsc",
        include_str!("../../../schemas/avro/context_changed.avsc"),
    ),
    (
        "dead_letter.avsc",
        include_str!("../../../schemas/avro/dead_letter.avsc"),
    ),
];

/// The compatibility rule every subject gets.
pub const COMPATIBILITY: &str = "BACKWARD";

/// Why the catalog could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A schema file of ours does not parse.
    #[error("schemas/avro/{file} is not a valid Avro schema: {reason}")]
    BadSchema {
        /// The file under `schemas/avro/`.
        file: String,
        /// What the parser said.
        reason: String,
    },
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The subject of a schema under RecordNameStrategy: its full name.
pub fn subject(schema_json: &str) -> Result<String, String> {
    let schema = apache_avro::Schema::parse_str(schema_json).map_err(|e| e.to_string())?;
    match &schema {
        apache_avro::Schema::Record(record) => Ok(record.name.fullname(None)),
        other => Err(format!("top level must be a record, not {other:?}")),
    }
}

/// Registers every schema; safe to run again. Returns subject → id.
pub async fn register_all(
    registry: &RegistryClient,
) -> Result<BTreeMap<String, u32>, CatalogError> {
    let mut ids = BTreeMap::new();
    for (file, schema) in SCHEMAS {
        let subject = subject(schema).map_err(|reason| CatalogError::BadSchema {
            file: (*file).to_owned(),
            reason,
        })?;
        registry.set_compatibility(&subject, COMPATIBILITY).await?;
        let id = registry.register(&subject, schema).await?;
        ids.insert(subject, id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_parses_and_names_its_subject() {
        let subjects: Vec<String> = SCHEMAS
            .iter()
            .map(|(file, s)| subject(s).unwrap_or_else(|e| panic!("{file}: {e}")))
            .collect();
        assert_eq!(
            subjects,
            [
                "io.statefabric.v1.EventEnvelope",
                "io.statefabric.v1.SagaCommand",
                "io.statefabric.v1.SagaReply",
                "io.statefabric.v1.SagaStateChanged",
                "io.statefabric.v1.ContextChanged",
                "io.statefabric.v1.DeadLetter",
            ]
        );
    }
}
