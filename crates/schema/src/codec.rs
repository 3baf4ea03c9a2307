//! Encoding with a registered schema and decoding by the schema id a
//! message carries. Fetched schemas are kept (ids are immutable in a
//! registry), so a consumer asks the registry once per writer schema.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::NamesRef;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::registry::{RegistryClient, RegistryError};
use crate::wire::{self, WireError};

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The message is not in the Confluent wire format.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The writer's schema could not be fetched.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The registry's schema does not parse.
    #[error("registry schema {id} is not valid Avro: {reason}")]
    BadSchema {
        /// The schema id.
        id: u32,
        /// What the parser said.
        reason: String,
    },
    /// The value does not fit the schema it is written with.
    #[error("value does not fit schema {id}: {reason}")]
    Encode {
        /// The schema id.
        id: u32,
        /// What does not fit.
        reason: String,
    },
    /// The body does not decode with its writer's schema (or into the type).
    #[error("message does not decode with schema {id}: {reason}")]
    Decode {
        /// The writer's schema id.
        id: u32,
        /// What failed.
        reason: String,
    },
}

/// A registered schema to write with.
#[derive(Debug, Clone)]
pub struct WriterSchema {
    /// Its id in the registry (what the wire header carries).
    pub id: u32,
    /// The parsed schema.
    pub schema: Arc<Schema>,
}

/// Avro in the Confluent wire format, with the writers' schemas fetched
/// from the registry by id and cached.
#[derive(Debug)]
pub struct AvroCodec {
    registry: Arc<RegistryClient>,
    schemas: RwLock<HashMap<u32, Arc<Schema>>>,
}

impl AvroCodec {
    /// A codec fetching schemas from `registry`.
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
        // Straight from the value's serde form, checked against the schema
        // field by field as it is written: no intermediate `Value`, no
        // schema resolution per message (that was most of the relay's
        // encoding time).
        let mut body = Vec::with_capacity(256);
        // Our schemas name no types defined elsewhere: no names to resolve.
        apache_avro::write_avro_datum_ref(&writer.schema, &NamesRef::new(), value, &mut body)
            .map_err(|e| fail(e.to_string()))?;
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
        // apache-avro 0.22 bounds what a block count may make it allocate
        // (0.21 reserved a map of any size a message claimed: a 39-byte
        // message asked for 43 GB, found by fuzz/fuzz_targets/confluent_avro).
        let value = GenericDatumReader::builder(&writer)
            .maybe_reader_schema(reader)
            .build()
            .and_then(|datum| datum.read_value(&mut body))
            .map_err(|e| fail(e.to_string()))?;
        if !body.is_empty() {
            return Err(fail(format!("{} bytes left over", body.len())));
        }
        apache_avro::from_value(&value).map_err(|e| fail(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::messages::{
        EventEnvelope, Outcome, SagaCommand, SagaReply, event_envelope_schema, saga_command_schema,
        saga_reply_schema,
    };
    use apache_avro::writer::datum::GenericDatumWriter;

    fn codec() -> AvroCodec {
        // Never called: encoding needs no registry once the writer is known.
        AvroCodec::new(Arc::new(RegistryClient::new(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
        )))
    }

    fn writer((_, json): (&str, &str)) -> WriterSchema {
        WriterSchema {
            id: 7,
            schema: Arc::new(Schema::parse_str(json).expect("schema")),
        }
    }

    /// The message as the generic path writes it (serde value, resolved to
    /// the schema, then encoded).
    fn generic<T: Serialize>(writer: &WriterSchema, value: &T) -> Vec<u8> {
        let value = apache_avro::to_value(value)
            .and_then(|v| v.resolve(&writer.schema))
            .expect("resolves");
        let datum = GenericDatumWriter::builder(&writer.schema)
            .build()
            .and_then(|w| w.write_value_to_vec(value))
            .expect("encodes");
        wire::frame(writer.id, &datum)
    }

    fn round_trip<T>(writer: &WriterSchema, value: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let bytes = codec().encode(writer, value).expect("encodes");
        // Equal up to the order of map entries (the generic path goes
        // through a hash map; Avro gives map order no meaning).
        assert_eq!(bytes.len(), generic(writer, value).len());
        let (id, mut body) = wire::unframe(&bytes).expect("framed");
        assert_eq!(id, writer.id);
        let decoded = GenericDatumReader::builder(&writer.schema)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .expect("decodes");
        assert!(body.is_empty());
        assert_eq!(
            &apache_avro::from_value::<T>(&decoded).expect("fits"),
            value
        );
    }

    #[test]
    fn every_message_encodes_like_the_generic_path_and_decodes_back() {
        round_trip(
            &writer(event_envelope_schema()),
            &EventEnvelope {
                event_id: "e-1".into(),
                tenant_id: "acme".into(),
                stream_id: "order-1".into(),
                stream_type: "order".into(),
                version: 3,
                commit_position: 1 << 40,
                event_type: "Placed".into(),
                content_type: "application/json".into(),
                payload: br#"{"total":5}"#.to_vec(),
                metadata: BTreeMap::from([("traceparent".into(), "00-ab".into())]),
                vector_clock: BTreeMap::from([("a".into(), 2), ("b".into(), -1)]),
                recorded_at: 1_764_000_000_000,
            },
        );
        round_trip(
            &writer(saga_command_schema()),
            &SagaCommand {
                idempotency_key: "s/plan/1/1".into(),
                tenant_id: "acme".into(),
                saga_id: "s".into(),
                step: "plan".into(),
                visit: 1,
                attempt: 2,
                compensation: true,
                agent_type: "planner".into(),
                action: "plan".into(),
                input: b"{}".to_vec(),
                timeout_ms: 30_000,
                issued_at: 0,
            },
        );
        for (outcome, output, error) in [
            (Outcome::Completed, Some(b"[1]".to_vec()), None),
            (Outcome::Failed, None, Some("boom".to_owned())),
        ] {
            round_trip(
                &writer(saga_reply_schema()),
                &SagaReply {
                    idempotency_key: "k".into(),
                    tenant_id: "acme".into(),
                    saga_id: "s".into(),
                    outcome,
                    output,
                    error,
                    agent: "coder-0".into(),
                    answered_at: 9,
                },
            );
        }
    }

    #[test]
    fn a_value_that_does_not_fit_is_refused() {
        let writer = writer(event_envelope_schema());
        for misfit in [
            serde_json::json!({"event_id": 5}),
            serde_json::json!("text"),
            serde_json::json!({"event_id": "e"}),
        ] {
            let err = codec().encode(&writer, &misfit).expect_err("misfit");
            assert!(matches!(err, CodecError::Encode { id: 7, .. }), "{err}");
        }
    }
}
