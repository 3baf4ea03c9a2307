#![no_main]
//! Saga definitions arrive as YAML or JSON from operators (`fabric sagas`,
//! the control plane's API): parsing and validation never panic, and a
//! definition that validates, written out as JSON, validates again as the
//! same saga (what the store keeps and reloads).

use libfuzzer_sys::fuzz_target;
use statefabric_saga::Definition;

fn reloads(definition: &Definition) {
    let json = serde_json::to_string(definition).expect("a definition serializes");
    let again = match Definition::from_json(&json) {
        Ok(again) => again,
        Err(e) => panic!("a valid definition does not reload from its JSON: {e}\n{json}"),
    };
    assert_eq!(again.name, definition.name);
    assert_eq!(
        again.steps.keys().collect::<Vec<_>>(),
        definition.steps.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        serde_json::to_string(&again).ok(),
        Some(json.clone()),
        "{json}"
    );
}

fuzz_target!(|text: &str| {
    if let Ok(definition) = Definition::from_yaml(text) {
        reloads(&definition);
    }
    if let Ok(definition) = Definition::from_json(text) {
        reloads(&definition);
    }
});
