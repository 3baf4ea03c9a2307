//! Encoding with a registered schema and decoding by the schema id a
//! message carries. Fetched schemas are kept (ids are immutable in a
//! registry), so a consumer asks the registry once per writer schema.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use apache_avro::Schema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::registry::{RegistryClient, RegistryError};
use crate::wire::{self, WireError};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("registry schema {id} is not valid Avro: {reason}")]
    BadSchema { id: u32, reason: String },
    #[error("value does not fit schema {id}: {reason}")]
    Encode { id: u32, reason: String },
    #[error("message does not decode with schema {id}: {reason}")]
    Decode { id: u32, reason: String },
}

/// A registered schema to write with.
#[derive(Debug, Clone)]
pub struct WriterSchema {
    pub id: u32,
    pub schema: Arc<Schema>,
}

#[derive(Debug)]
pub struct AvroCodec {
    registry: Arc<RegistryClient>,
    schemas: RwLock<HashMap<u32, Arc<Schema>>>,
}

impl AvroCodec {
    pub fn new(registry: Arc<RegistryClient>) -> Self {
        Self {
            registry,
            schemas: RwLock::default(),
        }
    }

    /// Registers (idempotently) `schema_json` under `subject` and returns it
    /// ready to write with.
    pub async fn writer(
        &self,
        subject: &str,
        schema_json: &str,
    ) -> Result<WriterSchema, CodecError> {
        let id = self.registry.register(subject, schema_json).await?;
        let schema = Schema::parse_str(schema_json).map_err(|e| CodecError::BadSchema {
            id,
            reason: e.to_string(),
        })?;
        let schema = Arc::new(schema);
        self.schemas
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, schema.clone());
        Ok(WriterSchema { id, schema })
    }

    /// Confluent-framed Avro of `value`.
    pub fn encode<T: Serialize>(
        &self,
        writer: &WriterSchema,
        value: &T,
    ) -> Result<Vec<u8>, CodecError> {
        let fail = |reason: String| CodecError::Encode {
            id: writer.id,
            reason,
        };
        let value = apache_avro::to_value(value)
            .and_then(|v| v.resolve(&writer.schema))
            .map_err(|e| fail(e.to_string()))?;
        let body =
            apache_avro::to_avro_datum(&writer.schema, value).map_err(|e| fail(e.to_string()))?;
        Ok(wire::frame(writer.id, &body))
    }

    async fn schema(&self, id: u32) -> Result<Arc<Schema>, CodecError> {
        if let Some(schema) = self
            .schemas
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            return Ok(schema.clone());
        }
        let text = self.registry.schema(id).await?;
        let schema = Arc::new(Schema::parse_str(&text).map_err(|e| CodecError::BadSchema {
            id,
            reason: e.to_string(),
        })?);
        self.schemas
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, schema.clone());
        Ok(schema)
    }

    /// Decodes a framed message with the schema it names, resolved to
    /// `reader` when given (how a consumer on a newer schema reads older
    /// messages).
    pub async fn decode<T: DeserializeOwned>(
        &self,
        message: &[u8],
        reader: Option<&Schema>,
    ) -> Result<T, CodecError> {
        let (id, mut body) = wire::unframe(message)?;
        let writer = self.schema(id).await?;
        let fail = |reason: String| CodecError::Decode { id, reason };
        let value = apache_avro::from_avro_datum(&writer, &mut body, reader)
            .map_err(|e| fail(e.to_string()))?;
        if !body.is_empty() {
            return Err(fail(format!("{} bytes left over", body.len())));
        }
        apache_avro::from_value(&value).map_err(|e| fail(e.to_string()))
    }
}
