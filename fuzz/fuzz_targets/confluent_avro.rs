#![no_main]
//! Kafka messages in the Confluent wire format with Avro bodies, as every
//! consumer of ours decodes them (`statefabric_schema::codec::AvroCodec::
//! decode`: unframe, decode with the writer's schema, nothing left over,
//! then into the typed message) — for each of our three message schemas.
//! Never panics, never allocates without bound; a message that decodes
//! encodes back to bytes that decode to the same message.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};
use statefabric_schema::codec::{AvroCodec, WriterSchema};
use statefabric_schema::messages::{
    EventEnvelope, SagaCommand, SagaReply, event_envelope_schema, saga_command_schema,
    saga_reply_schema,
};
use statefabric_schema::registry::RegistryClient;
use statefabric_schema::wire;

/// Our three schemas, parsed once.
fn schemas() -> &'static [Arc<Schema>; 3] {
    static SCHEMAS: OnceLock<[Arc<Schema>; 3]> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        [
            event_envelope_schema(),
            saga_command_schema(),
            saga_reply_schema(),
        ]
        .map(|(_, json)| Arc::new(Schema::parse_str(json).expect("our schema parses")))
    })
}

fn writer(which: usize, id: u32) -> WriterSchema {
    WriterSchema {
        id,
        schema: schemas()[which].clone(),
    }
}

/// What `AvroCodec::decode` does once the writer's schema is known.
fn decode<T: DeserializeOwned>(writer: &WriterSchema, mut body: &[u8]) -> Option<T> {
    let value = GenericDatumReader::builder(&writer.schema)
        .build()
        .and_then(|datum| datum.read_value(&mut body))
        .ok()?;
    if !body.is_empty() {
        return None;
    }
    apache_avro::from_value(&value).ok()
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    writer: &WriterSchema,
    body: &[u8],
) {
    let Some(message) = decode::<T>(writer, body) else {
        return;
    };
    // Encoding needs no registry once the writer is known; this one is never called.
    let codec = AvroCodec::new(Arc::new(RegistryClient::new(
        "http://127.0.0.1:9",
        Duration::from_secs(1),
    )));
    let framed = codec
        .encode(writer, &message)
        .expect("a decoded message encodes");
    let (id, again) = wire::unframe(&framed).expect("our frame unframes");
    assert_eq!(id, writer.id);
    assert_eq!(decode::<T>(writer, again).as_ref(), Some(&message));
}

fuzz_target!(|message: &[u8]| {
    let Ok((id, body)) = wire::unframe(message) else {
        return;
    };
    match id % 3 {
        0 => round_trip::<EventEnvelope>(&writer(0, id), body),
        1 => round_trip::<SagaCommand>(&writer(1, id), body),
        _ => round_trip::<SagaReply>(&writer(2, id), body),
    }
});
