#![no_main]
//! The task-key parser reads keys agents send back (`saga/step/visit/
//! attempt[/undo]`, step names may hold `/`): it never panics, and a key it
//! accepts prints as a key that parses to the same task.

use libfuzzer_sys::fuzz_target;
use statefabric_saga::TaskKey;

fuzz_target!(|key: &str| {
    if let Ok(parsed) = key.parse::<TaskKey>() {
        let printed = parsed.to_string();
        let again: TaskKey = match printed.parse() {
            Ok(again) => again,
            Err(e) => panic!("{key:?} parsed, but its printed form {printed:?} does not: {e}"),
        };
        assert_eq!(again, parsed, "{key:?} -> {printed:?} names another task");
    }
});
