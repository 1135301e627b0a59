//! The hostile-input table of the reliability suite: malformed container specs, each with
//! the exact error text palisade must answer with.
//!
//! One table, two paths: `runtime/tests/lifecycle.rs` feeds every case to the `palisade`
//! CLI (`create --bundle`), and `tests/tests/reliability.rs` feeds the cases marked
//! [`SpecCase::via_shim`] through containerd and palisade's shim (`ctr run --config`, the
//! spec file used as is). Cases containerd's `ctr` would already refuse (JSON it cannot
//! parse into its own types) are CLI-only. Both paths check that nothing is left behind.

use serde_json::{json, Value};

/// How a case breaks the default busybox `config.json`.
#[derive(Clone, Copy)]
pub enum Edit {
    /// Replace the whole file with these bytes.
    Raw(&'static str),
    /// Change the JSON tree.
    Json(fn(&mut Value)),
}

/// One malformed spec and the error it must produce.
#[derive(Clone)]
pub struct SpecCase {
    /// Short name, also used in container ids.
    pub name: &'static str,
    pub edit: Edit,
    /// A substring the error must contain (the field and what is wrong with it).
    pub expected: String,
    /// Whether `ctr run --config` can carry the spec to the shim (ctr parses the file into
    /// its own Go types first).
    pub via_shim: bool,
}

impl SpecCase {
    /// Applies the edit to `config` (the default spec); `None` for a raw replacement.
    pub fn apply(&self, config: &mut Value) -> Option<&'static str> {
        match self.edit {
            Edit::Raw(text) => Some(text),
            Edit::Json(f) => {
                f(config);
                None
            }
        }
    }
}

fn case(name: &'static str, edit: Edit, expected: impl Into<String>, via_shim: bool) -> SpecCase {
    SpecCase {
        name,
        edit,
        expected: expected.into(),
        via_shim,
    }
}

fn push_mount(c: &mut Value, mount: Value) {
    if let Some(mounts) = c["mounts"].as_array_mut() {
        mounts.push(mount);
    }
}

/// The table. `mounts[7]` is the first mount after the default spec's seven.
pub fn spec_cases() -> Vec<SpecCase> {
    use Edit::{Json, Raw};
    vec![
        case(
            "badjson",
            Raw("{\"ociVersion\": "),
            "config.json: invalid JSON: EOF while parsing a value at line 1 column 15",
            false,
        ),
        case(
            "wrongtype",
            Json(|c| c["mounts"] = json!(5)),
            "invalid type: integer `5`, expected a sequence",
            false,
        ),
        case(
            "noprocess",
            Json(|c| {
                c.as_object_mut().map(|o| o.remove("process"));
            }),
            "process: missing",
            false,
        ),
        case(
            "noroot",
            Json(|c| {
                c.as_object_mut().map(|o| o.remove("root"));
            }),
            "root: missing",
            false,
        ),
        case(
            "norootfs",
            Json(|c| c["root"]["path"] = "missing".into()),
            "root.path: rootfs",
            false,
        ),
        case(
            "emptyargs",
            Json(|c| c["process"]["args"] = json!([])),
            "process.args: must not be empty",
            false,
        ),
        case(
            "noexec",
            Json(|c| c["process"]["args"] = json!(["/bin/nope"])),
            "exec \"/bin/nope\": No such file or directory",
            true,
        ),
        case(
            "cwdrelative",
            Json(|c| c["process"]["cwd"] = "tmp".into()),
            "process.cwd: tmp is not an absolute path",
            true,
        ),
        case(
            "baduid",
            Json(|c| c["process"]["user"]["uid"] = json!(-1)),
            "invalid value: integer `-1`, expected u32",
            false,
        ),
        case(
            "badns",
            Json(|c| c["linux"]["namespaces"][2]["type"] = "foo".into()),
            "linux.namespaces[2].type: unknown namespace \"foo\"",
            true,
        ),
        case(
            "dupns",
            Json(|c| {
                if let Some(ns) = c["linux"]["namespaces"].as_array_mut() {
                    ns.push(json!({"type": "pid"}));
                }
            }),
            "linux.namespaces[6].type: duplicate namespace \"pid\"",
            true,
        ),
        case(
            "nspath",
            Json(|c| c["linux"]["namespaces"][0] = json!({"type": "pid", "path": "/nonexistent/ns"})),
            "opening pid namespace /nonexistent/ns: No such file or directory",
            true,
        ),
        case(
            "mapsnouserns",
            Json(|c| {
                c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 0, "size": 1}])
            }),
            "linux.uidMappings: mappings need a user namespace in linux.namespaces",
            true,
        ),
        case(
            "badcap",
            Json(|c| c["process"]["capabilities"]["bounding"][1] = "CAP_FOO".into()),
            "process.capabilities.bounding[1]: unknown capability \"CAP_FOO\"",
            true,
        ),
        case(
            "capnotarray",
            Json(|c| c["process"]["capabilities"]["bounding"] = "CAP_CHOWN".into()),
            "process.capabilities.bounding: must be an array",
            false,
        ),
        case(
            "ambientcap",
            Json(|c| {
                c["process"]["capabilities"] = json!({"ambient": ["CAP_SYS_ADMIN"], "bounding": []})
            }),
            "process.capabilities.ambient: CAP_SYS_ADMIN must also be inheritable and permitted",
            true,
        ),
        case(
            "badrlimit",
            Json(|c| c["process"]["rlimits"] = json!([{"type": "RLIMIT_FOO", "hard": 1, "soft": 1}])),
            "process.rlimits[0].type: unknown rlimit \"RLIMIT_FOO\"",
            true,
        ),
        case(
            "rlimitsoftabovehard",
            Json(|c| {
                c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 10}])
            }),
            "process.rlimits \"RLIMIT_NOFILE\": Invalid argument",
            true,
        ),
        case(
            "oomscore",
            Json(|c| c["process"]["oomScoreAdj"] = json!(5000)),
            "process.oomScoreAdj 5000: Invalid argument",
            true,
        ),
        case(
            "negativememory",
            Json(|c| c["linux"]["resources"]["memory"] = json!({"limit": -5})),
            "linux.resources.memory.limit: -5 is invalid (use -1 for unlimited)",
            true,
        ),
        case(
            "memoryoverflow",
            Json(|c| c["linux"]["resources"]["memory"] = json!({"limit": 9223372036854775808u64})),
            "invalid value: integer `9223372036854775808`, expected i64",
            false,
        ),
        case(
            "cpuperiod",
            Json(|c| c["linux"]["resources"]["cpu"] = json!({"quota": 1000, "period": 1})),
            "cpu.cfs_period_us: Invalid argument",
            true,
        ),
        case(
            "cgrouproot",
            Json(|c| c["linux"]["cgroupsPath"] = "/..".into()),
            "linux.cgroupsPath \"/..\": resolves to the root cgroup; a container needs a cgroup of its own",
            true,
        ),
        case(
            "cgroupsystemd",
            Json(|c| c["linux"]["cgroupsPath"] = "a:b:c".into()),
            "the systemd cgroup driver (cgroupsPath \"a:b:c\" in slice:prefix:name form) is not supported",
            true,
        ),
        case(
            "mountsource",
            Json(|c| {
                push_mount(
                    c,
                    json!({"destination": "/x", "type": "bind", "source": "/nonexistent-src",
                           "options": ["rbind"]}),
                )
            }),
            "mounts[7] (/x): source /nonexistent-src: No such file or directory",
            true,
        ),
        case(
            "mountrelative",
            Json(|c| {
                push_mount(
                    c,
                    json!({"destination": "../../../etc/x", "type": "tmpfs", "source": "tmpfs"}),
                )
            }),
            "mounts[7].destination: ../../../etc/x is not an absolute path",
            true,
        ),
        case(
            "mountfstype",
            Json(|c| {
                push_mount(
                    c,
                    json!({"destination": "/x", "type": "nosuchfs", "source": "none"}),
                )
            }),
            "mounts[7] (/x): mounting nosuchfs none: No such device",
            true,
        ),
        case(
            "mountoption",
            Json(|c| {
                push_mount(
                    c,
                    json!({"destination": "/x", "type": "tmpfs", "source": "tmpfs",
                           "options": ["size=bogus"]}),
                )
            }),
            "mounts[7] (/x): mounting tmpfs tmpfs: Invalid argument",
            true,
        ),
        case(
            "hostsysctl",
            Json(|c| c["linux"]["sysctl"] = json!({"vm.swappiness": "1"})),
            "linux.sysctl: \"vm.swappiness\" is not isolated by a namespace: setting it would change the host",
            true,
        ),
        case(
            "sysctlescape",
            Json(|c| c["linux"]["sysctl"] = json!({"net/../../kernel/x": "1"})),
            "linux.sysctl: \"net/../../kernel/x\" is not a sysctl name (empty or \"..\" component)",
            true,
        ),
        case(
            "devicetype",
            Json(|c| {
                c["linux"]["devices"] =
                    json!([{"path": "/dev/x", "type": "q", "major": 1, "minor": 1}])
            }),
            "unknown variant `q`, expected one of `a`, `b`, `c`, `u`, `p`",
            false,
        ),
        case(
            "seccompaction",
            Json(|c| c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_FOO"})),
            "unknown variant `SCMP_ACT_FOO`",
            true,
        ),
        case(
            "longhostname",
            Json(|c| c["hostname"] = "h".repeat(65).into()),
            format!("hostname \"{}\": Invalid argument", "h".repeat(65)),
            true,
        ),
        case(
            "hookrelative",
            Json(|c| c["hooks"] = json!({"prestart": [{"path": "relative/hook"}]})),
            "prestart hook \"relative/hook\": executing: No such file or directory",
            true,
        ),
        case(
            "personality",
            Json(|c| c["linux"]["personality"] = json!({"domain": "LINUX32"})),
            "linux.personality: is not supported by palisade",
            true,
        ),
    ]
}

/// Container ids the CLI must refuse, with the error (containerd validates ids itself
/// before a shim sees them, so these are CLI-only).
pub fn bad_ids() -> Vec<(String, String)> {
    let long = "x".repeat(300);
    vec![
        (
            "a/b".into(),
            "invalid container id \"a/b\": must not contain \"/\"".into(),
        ),
        (
            "..".into(),
            "invalid container id \"..\": must not contain \"..\"".into(),
        ),
        (
            "x/../../etc".into(),
            "invalid container id \"x/../../etc\": must not contain \"..\"".into(),
        ),
        (
            "a b".into(),
            "invalid container id \"a b\": may only contain [A-Za-z0-9_+.:@-]".into(),
        ),
        (
            ".".into(),
            "invalid container id \".\": must not be \".\"".into(),
        ),
        (
            long.clone(),
            format!("invalid container id \"{long}\": longer than 255 bytes"),
        ),
    ]
}
