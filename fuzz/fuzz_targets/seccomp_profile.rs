//! Arbitrary JSON as `linux.seccomp`: the field-naming string checks, typed
//! deserialization, then compilation to BPF for the native architecture (never installed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::LinuxSeccomp;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Err(e) = palisade_runtime::seccomp::check_json(&value) {
        let _ = e.to_string();
        return;
    }
    let Ok(seccomp) = serde_json::from_value::<LinuxSeccomp>(value) else {
        return;
    };
    match palisade_runtime::seccomp::compile(&seccomp) {
        Ok(filter) => {
            // A compiled filter is a real BPF program: non-empty, within the kernel's limit.
            let len = filter.instructions().len();
            assert!(
                len > 0 && len <= 4096,
                "compiled filter has {len} instructions"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
