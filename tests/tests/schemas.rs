//! The Avro schemas against the real Schema Registry (Apicurio's Confluent
//! API): registration is idempotent and sets BACKWARD compatibility; an
//! incompatible change is refused and a compatible one accepted; messages
//! round-trip in the Confluent wire format, decoded by the id they carry,
//! with the schema fetched once; bad messages get clear errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use statefabric_schema::catalog::{self, SCHEMAS};
use statefabric_schema::messages::EventEnvelope;
use statefabric_schema::{AvroCodec, CodecError, RegistryClient, RegistryError};
use statefabric_tests as env;

fn registry() -> Arc<RegistryClient> {
    Arc::new(RegistryClient::new(
        &env::registry_url(),
        Duration::from_secs(10),
    ))
}

fn envelope_schema() -> &'static str {
    SCHEMAS
        .iter()
        .find(|(f, _)| *f == "event_envelope.avsc")
        .map(|(_, s)| *s)
        .expect("envelope")
}

/// The envelope under a subject of this test's own, so evolution tests do
/// not touch the real subjects.
fn private_subject() -> String {
    format!("test-{}.EventEnvelope", uuid::Uuid::new_v4().simple())
}

fn envelope() -> EventEnvelope {
    EventEnvelope {
        event_id: uuid::Uuid::new_v4().to_string(),
        tenant_id: "acme".into(),
        stream_id: "task-42".into(),
        stream_type: "task".into(),
        version: 3,
        commit_position: 1017,
        event_type: "TaskPlanned".into(),
        content_type: "application/json".into(),
        payload: br#"{"steps":["reproduce","fix"]}"#.to_vec(),
        metadata: BTreeMap::from([("correlation_id".into(), "c-1".into())]),
        vector_clock: BTreeMap::from([("planner".into(), 7)]),
        recorded_at: 1_795_000_000_000,
    }
}

#[tokio::test]
async fn every_schema_registers_idempotently_with_backward_compatibility() -> anyhow::Result<()> {
    let registry = registry();
    let first = catalog::register_all(&registry).await?;
    let again = catalog::register_all(&registry).await?;
    assert_eq!(first, again, "same schemas, same ids");
    assert_eq!(first.len(), SCHEMAS.len());
    for subject in first.keys() {
        assert_eq!(
            registry.compatibility(subject).await?.as_deref(),
            Some("BACKWARD"),
            "{subject}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_incompatible_change_is_refused_and_a_compatible_one_accepted() -> anyhow::Result<()> {
    let registry = registry();
    let subject = private_subject();
    registry.set_compatibility(&subject, "BACKWARD").await?;
    let v1 = registry.register(&subject, envelope_schema()).await?;
    let mut schema: serde_json::Value = serde_json::from_str(envelope_schema())?;
    let fields = schema["fields"].as_array_mut().expect("fields");
    // A new required field: a new reader could not read old messages.
    fields.push(serde_json::json!({"name": "priority", "type": "int"}));
    let err = registry
        .register(&subject, &schema.to_string())
        .await
        .expect_err("incompatible");
    assert!(matches!(err, RegistryError::Incompatible { .. }), "{err}");
    assert!(err.to_string().contains("not compatible"), "{err}");
    // With a default, old messages read as priority 0: accepted.
    let fields = schema["fields"].as_array_mut().expect("fields");
    fields.pop();
    fields.push(serde_json::json!({"name": "priority", "type": "int", "default": 0}));
    let v2 = registry.register(&subject, &schema.to_string()).await?;
    assert_ne!(v1, v2);
    // A type change of an existing field is refused too.
    let fields = schema["fields"].as_array_mut().expect("fields");
    fields[4] = serde_json::json!({"name": "version", "type": "string"});
    assert!(matches!(
        registry.register(&subject, &schema.to_string()).await,
        Err(RegistryError::Incompatible { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn messages_round_trip_by_schema_id_and_the_schema_is_fetched_once() -> anyhow::Result<()> {
    let subject = private_subject();
    let producer = AvroCodec::new(registry());
    let writer = producer.writer(&subject, envelope_schema()).await?;
    let sent = envelope();
    let bytes = producer.encode(&writer, &sent)?;
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(
        u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
        writer.id
    );

    // A consumer that has never seen the schema.
    let registry = registry();
    let consumer = AvroCodec::new(registry.clone());
    let received: EventEnvelope = consumer.decode(&bytes, None).await?;
    assert_eq!(received, sent);
    let after_first = registry.requests();
    for _ in 0..10 {
        let again: EventEnvelope = consumer.decode(&bytes, None).await?;
        assert_eq!(again, sent);
    }
    assert_eq!(
        registry.requests(),
        after_first,
        "schema kept after the first fetch"
    );
    Ok(())
}

#[tokio::test]
async fn bad_messages_get_clear_errors() -> anyhow::Result<()> {
    let codec = AvroCodec::new(registry());
    let bad: [(&[u8], &str); 3] = [
        (&[], "too short"),
        (&[9, 0, 0, 0, 1, 2], "magic byte"),
        (&[0, 0x7f, 0xff, 0xff, 0xf0, 1], "not in the registry"),
    ];
    for (bytes, expected) in bad {
        let err = codec
            .decode::<EventEnvelope>(bytes, None)
            .await
            .expect_err("bad");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
    // A real id with a body that is not this schema's data.
    let writer = codec.writer(&private_subject(), envelope_schema()).await?;
    let mut truncated = codec.encode(&writer, &envelope())?;
    truncated.truncate(12);
    let err = codec
        .decode::<EventEnvelope>(&truncated, None)
        .await
        .expect_err("truncated");
    assert!(matches!(err, CodecError::Decode { .. }), "{err}");
    // A value that does not fit the schema is refused before it is sent.
    let err = codec
        .encode(&writer, &serde_json::json!({"event_id": 5}))
        .expect_err("misfit");
    assert!(matches!(err, CodecError::Encode { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_cli_registers_the_schemas() -> anyhow::Result<()> {
    let output = tokio::process::Command::new(env::binary("fabric"))
        .args(["schemas", "register", "--registry", &env::registry_url()])
        .output()
        .await?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout)?;
    assert_eq!(stdout.lines().count(), SCHEMAS.len(), "{stdout}");
    assert!(
        stdout.contains("io.statefabric.v1.SagaCommand\t"),
        "{stdout}"
    );
    let output = tokio::process::Command::new(env::binary("fabric"))
        .args([
            "schemas",
            "register",
            "--registry",
            "http://127.0.0.1:1/nowhere",
        ])
        .output()
        .await?;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("registry unavailable"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
