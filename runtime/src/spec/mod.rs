//! Loading and validating a bundle's `config.json`.
//!
//! The JSON is first checked as an untyped tree for the mistakes users make most (unknown
//! namespace or capability names, bad rlimit types), so that the error names the field
//! (`linux.namespaces[2].type: unknown namespace "foo"`) instead of a serde position; then
//! it is deserialized into `oci_spec::runtime::Spec` and checked semantically.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde_json::Value;

use crate::error::{Error, Result};

/// Name of the spec file inside a bundle.
pub const CONFIG_FILE: &str = "config.json";

/// A validated spec with its bundle and absolute rootfs path.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub path: PathBuf,
    pub rootfs: PathBuf,
    pub spec: Spec,
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::InvalidSpec {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Reads `<bundle>/config.json`, validates it and resolves the rootfs against the bundle.
pub fn load_bundle(bundle: &Path) -> Result<Bundle> {
    let bundle = std::path::absolute(bundle).map_err(|source| Error::Io {
        context: format!("bundle {}", bundle.display()),
        source,
    })?;
    let config = bundle.join(CONFIG_FILE);
    let text = std::fs::read(&config).map_err(|e| Error::Config {
        path: config.clone(),
        msg: e.to_string(),
    })?;
    let spec = parse(&text).map_err(|e| match e {
        Error::Json { source, .. } => Error::Config {
            path: config.clone(),
            msg: format!("invalid JSON: {source}"),
        },
        other => other,
    })?;
    let rootfs = rootfs_path(&bundle, &spec)?;
    validate(&spec)?;
    Ok(Bundle {
        path: bundle,
        rootfs,
        spec,
    })
}

/// Parses spec JSON, with field-naming errors for the common mistakes.
pub fn parse(text: &[u8]) -> Result<Spec> {
    let value: Value = serde_json::from_slice(text).map_err(|source| Error::Json {
        context: "config.json".into(),
        source,
    })?;
    precheck(&value)?;
    serde_json::from_value(value).map_err(|source| Error::Json {
        context: "config.json".into(),
        source,
    })
}

fn namespace_type(name: &str) -> Option<LinuxNamespaceType> {
    Some(match name {
        "mount" => LinuxNamespaceType::Mount,
        "cgroup" => LinuxNamespaceType::Cgroup,
        "uts" => LinuxNamespaceType::Uts,
        "ipc" => LinuxNamespaceType::Ipc,
        "user" => LinuxNamespaceType::User,
        "pid" => LinuxNamespaceType::Pid,
        "network" => LinuxNamespaceType::Network,
        "time" => LinuxNamespaceType::Time,
        _ => return None,
    })
}

/// Checks on the untyped JSON tree, naming the offending field.
fn precheck(value: &Value) -> Result<()> {
    if !value.is_object() {
        return Err(invalid("config.json", "must be a JSON object"));
    }
    if let Some(namespaces) = value.pointer("/linux/namespaces").and_then(Value::as_array) {
        let mut seen = HashSet::new();
        for (i, ns) in namespaces.iter().enumerate() {
            let field = format!("linux.namespaces[{i}].type");
            let name = ns
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(&field, "missing or not a string"))?;
            if namespace_type(name).is_none() {
                return Err(invalid(field, format!("unknown namespace {name:?}")));
            }
            if !seen.insert(name.to_string()) {
                return Err(invalid(field, format!("duplicate namespace {name:?}")));
            }
        }
    }
    if let Some(sets) = value
        .pointer("/process/capabilities")
        .and_then(Value::as_object)
    {
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            let Some(list) = sets.get(set) else { continue };
            let list = list.as_array().ok_or_else(|| {
                invalid(format!("process.capabilities.{set}"), "must be an array")
            })?;
            for (i, cap) in list.iter().enumerate() {
                let field = format!("process.capabilities.{set}[{i}]");
                let name = cap
                    .as_str()
                    .ok_or_else(|| invalid(&field, "must be a string"))?;
                if crate::capabilities::parse(name).is_none() {
                    return Err(invalid(field, format!("unknown capability {name:?}")));
                }
            }
        }
    }
    if let Some(rlimits) = value.pointer("/process/rlimits").and_then(Value::as_array) {
        for (i, rlimit) in rlimits.iter().enumerate() {
            let field = format!("process.rlimits[{i}].type");
            let typ = rlimit.get("type").cloned().unwrap_or(Value::Null);
            if serde_json::from_value::<oci_spec::runtime::PosixRlimitType>(typ.clone()).is_err() {
                return Err(invalid(field, format!("unknown rlimit {typ}")));
            }
        }
    }
    Ok(())
}

fn rootfs_path(bundle: &Path, spec: &Spec) -> Result<PathBuf> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid("root", "missing"))?;
    let path = bundle.join(root.path());
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(_) => Err(invalid(
            "root.path",
            format!("rootfs {} is not a directory", path.display()),
        )),
        Err(e) => Err(invalid(
            "root.path",
            format!("rootfs {}: {e}", path.display()),
        )),
    }
}

/// Semantic checks of a parsed spec.
pub fn validate(spec: &Spec) -> Result<()> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("process", "missing"))?;
    validate_process(process, "process")?;
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| invalid("linux", "missing"))?;
    // Fields this runtime does not implement: refused rather than silently ignored.
    for (field, present) in [
        ("process.scheduler", process.scheduler().is_some()),
        ("process.ioPriority", process.io_priority().is_some()),
        (
            "process.execCPUAffinity",
            process.exec_cpu_affinity().is_some(),
        ),
        ("linux.intelRdt", linux.intel_rdt().is_some()),
        ("linux.memoryPolicy", linux.memory_policy().is_some()),
        ("linux.personality", linux.personality().is_some()),
        (
            "linux.netDevices",
            linux.net_devices().as_ref().is_some_and(|d| !d.is_empty()),
        ),
    ] {
        if present {
            return Err(invalid(field, "is not supported by palisade"));
        }
    }
    let namespaces = linux.namespaces().clone().unwrap_or_default();
    let has = |t: LinuxNamespaceType| namespaces.iter().any(|n| n.typ() == t);
    // Without a private mount namespace every mount of the container would land on the
    // host and outlive it.
    if !has(LinuxNamespaceType::Mount) {
        return Err(invalid("linux.namespaces", "a mount namespace is required"));
    }
    for (i, ns) in namespaces.iter().enumerate() {
        if let Some(path) = ns.path() {
            if !path.is_absolute() {
                return Err(invalid(
                    format!("linux.namespaces[{i}].path"),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
    }
    let user_ns = has(LinuxNamespaceType::User);
    let maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty());
    if maps && !user_ns {
        return Err(invalid(
            "linux.uidMappings",
            "mappings need a user namespace in linux.namespaces",
        ));
    }
    if spec.hostname().is_some() && !has(LinuxNamespaceType::Uts) {
        return Err(invalid("hostname", "setting it needs a uts namespace"));
    }
    if spec.domainname().is_some() && !has(LinuxNamespaceType::Uts) {
        return Err(invalid("domainname", "setting it needs a uts namespace"));
    }
    for key in linux.sysctl().iter().flat_map(|s| s.keys()) {
        validate_sysctl(key, has)?;
    }
    for (i, mount) in spec.mounts().iter().flatten().enumerate() {
        if !mount.destination().is_absolute() {
            return Err(invalid(
                format!("mounts[{i}].destination"),
                format!("{} is not an absolute path", mount.destination().display()),
            ));
        }
        if let Some(options) = mount.options() {
            for opt in options {
                if opt == "idmap" || opt == "ridmap" {
                    return Err(invalid(
                        format!("mounts[{i}].options"),
                        format!("{opt:?} is not supported"),
                    ));
                }
            }
        }
    }
    for (i, dev) in linux.devices().iter().flatten().enumerate() {
        if !dev.path().starts_with("/dev") {
            return Err(invalid(
                format!("linux.devices[{i}].path"),
                format!("{} is not under /dev", dev.path().display()),
            ));
        }
    }
    Ok(())
}

/// IPC sysctls the IPC namespace isolates (besides `fs.mqueue.*`), as runc's list.
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// A `linux.sysctl` key must name a sysctl that one of the container's own namespaces
/// isolates: any other (e.g. `vm.swappiness`) is global, and writing it would change
/// the host. The key must also be a plain name: it becomes a path under /proc/sys.
fn validate_sysctl(key: &str, has: impl Fn(LinuxNamespaceType) -> bool) -> Result<()> {
    let field = "linux.sysctl";
    if key
        .split(['.', '/'])
        .any(|c| c.is_empty() || c.contains('\0'))
    {
        return Err(invalid(
            field,
            format!("{key:?} is not a sysctl name (empty or \"..\" component)"),
        ));
    }
    // `net/ipv4/ip_forward` and `net.ipv4.ip_forward` name the same sysctl.
    let dotted = key.replace('/', ".");
    let (namespace, name) =
        if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.") {
            (LinuxNamespaceType::Ipc, "an ipc")
        } else if dotted.starts_with("net.") {
            (LinuxNamespaceType::Network, "a network")
        } else if dotted == "kernel.hostname" || dotted == "kernel.domainname" {
            (LinuxNamespaceType::Uts, "a uts")
        } else {
            return Err(invalid(
                field,
                format!("{key:?} is not isolated by a namespace: setting it would change the host"),
            ));
        };
    if !has(namespace) {
        return Err(invalid(
            field,
            format!("{key:?} needs {name} namespace in linux.namespaces"),
        ));
    }
    Ok(())
}

/// Checks a process (the init's or an exec's).
pub fn validate_process(process: &oci_spec::runtime::Process, field: &str) -> Result<()> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid(format!("{field}.args"), "must not be empty"));
    }
    if !process.cwd().is_absolute() {
        return Err(invalid(
            format!("{field}.cwd"),
            format!("{} is not an absolute path", process.cwd().display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(mutate: impl FnOnce(&mut Value)) -> Result<Spec> {
        let mut v = serde_json::to_value(Spec::default()).unwrap();
        mutate(&mut v);
        let spec = parse(&serde_json::to_vec(&v).unwrap())?;
        validate(&spec)?;
        Ok(spec)
    }

    #[test]
    fn default_spec_is_valid() {
        with(|_| {}).unwrap();
    }

    #[test]
    fn unknown_namespace_names_the_field() {
        let err = with(|v| v["linux"]["namespaces"][2]["type"] = "foo".into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "linux.namespaces[2].type: unknown namespace \"foo\""
        );
    }

    #[test]
    fn unknown_capability_names_the_field() {
        let err = with(|v| {
            v["process"]["capabilities"]["bounding"][1] = "CAP_FOO".into();
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "process.capabilities.bounding[1]: unknown capability \"CAP_FOO\""
        );
    }

    #[test]
    fn missing_mount_namespace_is_rejected() {
        let err = with(|v| {
            let ns = v["linux"]["namespaces"].as_array_mut().unwrap();
            ns.retain(|n| n["type"] != "mount");
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "linux.namespaces: a mount namespace is required"
        );
    }

    #[test]
    fn empty_args_are_rejected() {
        let err = with(|v| v["process"]["args"] = serde_json::json!([])).unwrap_err();
        assert_eq!(err.to_string(), "process.args: must not be empty");
    }

    #[test]
    fn sysctls_outside_the_containers_namespaces_are_refused() {
        let set = |key: &str| {
            let key = key.to_string();
            with(move |v| v["linux"]["sysctl"] = serde_json::json!({ key: "1" }))
                .and_then(|spec| validate(&spec))
        };
        let err = set("vm.swappiness").unwrap_err();
        assert_eq!(
            err.to_string(),
            "linux.sysctl: \"vm.swappiness\" is not isolated by a namespace: setting it would change the host"
        );
        let err = set("net/../../kernel/x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "linux.sysctl: \"net/../../kernel/x\" is not a sysctl name (empty or \"..\" component)"
        );
        assert!(set("kernel.shmmax").is_ok());
        assert!(set("fs.mqueue.msg_max").is_ok());
        assert!(set("kernel.hostname").is_ok());
        let err = with(|v| {
            v["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
            let ns = v["linux"]["namespaces"].as_array_mut().unwrap();
            ns.retain(|n| n["type"] != "network");
        })
        .and_then(|spec| validate(&spec))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "linux.sysctl: \"net.ipv4.ip_forward\" needs a network namespace in linux.namespaces"
        );
    }

    #[test]
    fn bad_rlimit_names_the_field() {
        let err = with(|v| {
            v["process"]["rlimits"] =
                serde_json::json!([{"type": "RLIMIT_FOO", "hard": 1, "soft": 1}]);
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "process.rlimits[0].type: unknown rlimit \"RLIMIT_FOO\""
        );
    }
}
