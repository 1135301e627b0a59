//! Arbitrary bytes as a bundle's `config.json`, through the runtime's loading path up to
//! (not including) creating anything: JSON parse with field-naming prechecks, typed
//! deserialization, semantic validation, and — since `create` compiles it before forking —
//! the seccomp profile when one is present. Every input must end in `Ok` or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = palisade_runtime::spec::parse(data) else {
        return;
    };
    let valid = palisade_runtime::spec::validate(&spec).is_ok();
    // The error text is what users see; formatting it must not panic either.
    if let Err(e) = palisade_runtime::spec::validate(&spec) {
        let _ = e.to_string();
    }
    if valid {
        if let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            if let Err(e) = palisade_runtime::seccomp::compile(seccomp) {
                let _ = e.to_string();
            }
        }
    }
});
