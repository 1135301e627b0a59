//! `linux.resources.unified`: raw v2 `file → value` writes. The key must name a plain file
//! of the container's cgroup (no `/`, no `..`), of a controller enabled there (or a `cgroup.*`
//! core file), and never one that moves or kills processes.

use std::collections::HashMap;

use crate::cgroups::{fs::Setting, CgroupError};

const FORBIDDEN: &[&str] = &["cgroup.procs", "cgroup.threads", "cgroup.kill"];

/// Validates the map against the controllers enabled in the cgroup and returns the writes
/// sorted by key (deterministic order).
pub(crate) fn settings(
    unified: &HashMap<String, String>,
    enabled_controllers: &[String],
) -> Result<Vec<Setting>, CgroupError> {
    let mut keys: Vec<&String> = unified.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let bad = |msg: String| CgroupError::Resource {
            field: format!("linux.resources.unified[{key:?}]"),
            msg,
        };
        if key.is_empty() || key.contains('/') || key.contains('\0') || key == "." || key == ".." {
            return Err(bad(
                "must be a file name inside the container's cgroup".into()
            ));
        }
        let Some((controller, _)) = key.split_once('.') else {
            return Err(bad("must be <controller>.<file>, e.g. memory.high".into()));
        };
        if FORBIDDEN.contains(&key.as_str()) {
            return Err(bad(
                "moving or killing processes is not a resource setting".into()
            ));
        }
        if controller != "cgroup" && !enabled_controllers.iter().any(|c| c == controller) {
            return Err(bad(format!(
                "controller {controller:?} is not enabled in the container's cgroup"
            )));
        }
        out.push(Setting::new(key.as_str(), &unified[key]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn valid_keys_are_written_sorted() {
        let enabled = vec!["memory".to_string(), "pids".to_string()];
        let s = settings(&map(&[("pids.max", "10"), ("memory.high", "1G")]), &enabled).unwrap();
        assert_eq!(
            s,
            [
                Setting::new("memory.high", "1G"),
                Setting::new("pids.max", "10")
            ]
        );
    }

    #[test]
    fn path_escapes_and_dangerous_keys_are_rejected() {
        let enabled = vec!["memory".to_string()];
        for key in [
            "../x",
            "../../etc/passwd",
            "memory/../../x",
            "..",
            "",
            "cgroup.procs",
            "cgroup.kill",
            "io.max",
            "nodot",
        ] {
            let e = settings(&map(&[(key, "1")]), &enabled)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("linux.resources.unified["), "{key}: {e}");
        }
    }
}
