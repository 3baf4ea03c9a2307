//! Versioned definitions. A (name, version) pair is immutable once
//! registered: an instance records the version it started on and is always
//! driven by exactly that definition, while new instances take the latest.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::definition::Definition;
use crate::validate::DefinitionError;

/// Definitions by name and version.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    definitions: BTreeMap<(String, u32), Arc<Definition>>,
}

impl Registry {
    /// Adds a definition. Registering the same version again is accepted
    /// only if it is identical.
    pub fn register(&mut self, definition: Definition) -> Result<Arc<Definition>, DefinitionError> {
        let key = (definition.name.clone(), definition.version);
        if let Some(existing) = self.definitions.get(&key) {
            if **existing == definition {
                return Ok(existing.clone());
            }
            return Err(DefinitionError::new(
                &definition.name,
                None,
                format!(
                    "version {} is already registered with different content; publish a new version",
                    definition.version
                ),
            ));
        }
        let definition = Arc::new(definition);
        self.definitions.insert(key, definition.clone());
        Ok(definition)
    }

    /// The definition `name` at `version`.
    pub fn get(&self, name: &str, version: u32) -> Option<Arc<Definition>> {
        self.definitions.get(&(name.to_owned(), version)).cloned()
    }

    /// The highest version of `name` (what new sagas start on).
    pub fn latest(&self, name: &str) -> Option<Arc<Definition>> {
        self.definitions
            .range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX))
            .next_back()
            .map(|(_, d)| d.clone())
    }

    /// Every (name, version) registered, in order.
    pub fn names(&self) -> impl Iterator<Item = (&str, u32)> {
        self.definitions.keys().map(|(n, v)| (n.as_str(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin;

    #[test]
    fn versions_are_immutable_and_latest_wins_for_new_instances() {
        let mut registry = Registry::default();
        let v1 = builtin::plan_code_critique();
        registry.register(v1.clone()).expect("v1");
        registry
            .register(v1.clone())
            .expect("same content again is fine");
        let mut changed = v1.clone();
        changed.stuck_after *= 2;
        let err = registry
            .register(changed.clone())
            .expect_err("same version, other content");
        assert!(err.to_string().contains("already registered"), "{err}");
        changed.version = 2;
        registry.register(changed).expect("v2");
        assert_eq!(registry.latest(&v1.name).map(|d| d.version), Some(2));
        assert_eq!(
            registry.get(&v1.name, 1).map(|d| d.stuck_after),
            Some(v1.stuck_after)
        );
    }
}
