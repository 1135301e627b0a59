//! Shim configuration (`/etc/palisade/configuration.toml`) and per-pod mode selection.
//!
//! The config path is, in order: the `config_path` of the runtime options containerd
//! passes with Create (`runtimeoptions.v1.Options`, what CRI sends for a runtime handler
//! with `ConfigPath` set, and `ctr run --runtime-config-path`), `$PALISADE_CONFIG`, then
//! [`DEFAULT_CONFIG_PATH`]. A missing default file means defaults; a missing explicitly
//! named file is an error.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use protobuf::{well_known_types::any::Any, CodedInputStream};
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/palisade/configuration.toml";
pub const CONFIG_ENV: &str = "PALISADE_CONFIG";

/// The pod annotation that picks the mode, when the config allows it.
pub const MODE_ANNOTATION: &str = "io.palisade.mode";

/// CRI's annotation naming the pod a container belongs to.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid mode {0:?}: expected \"native\" or \"vm\"")]
    InvalidMode(String),
    #[error("annotation {MODE_ANNOTATION} is not allowed by the shim config (add it to shim.allowed_annotations)")]
    AnnotationNotAllowed,
    #[error("malformed runtime options: {0}")]
    RuntimeOptions(String),
}

/// How a pod is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Namespaces and cgroups on the host, through `palisade-runtime`.
    #[default]
    Native,
    /// Inside a microVM started by `palisade-vmm`.
    Vm,
}

impl FromStr for Mode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Self::Native),
            "vm" => Ok(Self::Vm),
            other => Err(ConfigError::InvalidMode(other.to_string())),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Vm => "vm",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub shim: ShimConfig,
    pub native: NativeConfig,
    pub vm: VmConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// Mode of pods that do not ask for one.
    pub default_mode: Mode,
    /// Pod annotations the shim honours; anything else is ignored. Empty by default so
    /// a pod cannot pick its own isolation unless the operator allows it.
    pub allowed_annotations: Vec<String>,
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            default_mode: Mode::Native,
            allowed_annotations: Vec::new(),
        }
    }
}

/// How native mode reaches the OCI runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `palisade-runtime` in-process.
    #[default]
    Library,
    /// A runc-compatible binary (`runtime_binary`), one execution per operation like
    /// containerd's runc shim; for comparing runtimes behind the same shim.
    Cli,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NativeConfig {
    pub engine: EngineKind,
    /// State directory of the runtime; the containerd namespace is appended.
    pub runtime_root: PathBuf,
    /// The runc-compatible binary the `cli` engine runs (`palisade` on PATH by default).
    pub runtime_binary: PathBuf,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            engine: EngineKind::Library,
            runtime_root: PathBuf::from("/run/palisade"),
            runtime_binary: PathBuf::from("palisade"),
        }
    }
}

/// VM mode: the microVM each pod runs in (see `deploy/configuration.toml`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// The `palisade-vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel (PVH `vmlinux`, built by `guest-kernel/build.sh`).
    pub kernel: PathBuf,
    /// Guest initramfs with `palisade-agent` as `/init` (`agent/build-initramfs.sh`).
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Kernel messages and the agent's log on the guest console (written to
    /// `<bundle>/vm-console.log` either way; without this the kernel is `quiet`).
    pub debug_console: bool,
    /// How long the guest may take from VMM start until the agent answers `Check`.
    pub boot_timeout_secs: u64,
    /// Bound on every agent request that is not a long poll (reads of output, waits).
    pub agent_timeout_secs: u64,
    /// Per-VM state (hybrid-vsock socket, rootfs images); kept short because the vsock
    /// socket path is limited to 108 bytes.
    pub state_dir: PathBuf,
    /// Empty virtio-blk drives attached at VM start for the pod's later containers (the
    /// VMM cannot hot-add drives): each later container's rootfs is written into one.
    pub spare_disks: u32,
    /// Size of a spare drive (sparse file); a later container's rootfs must fit.
    pub disk_size_mib: u64,
    /// Put the VMM in a cgroup of its own (under the pod's cgroup parent).
    pub vmm_cgroup: bool,
    /// With `vmm_cgroup`: limit the VMM's memory to `memory_mib` + this; 0 = no limit.
    /// Mind that guest writes to the drive images (files in `state_dir`, tmpfs on most
    /// hosts) are charged to the VMM too.
    pub vmm_cgroup_memory_overhead_mib: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vmm: PathBuf::from("/usr/local/bin/palisade-vmm"),
            kernel: PathBuf::from("/usr/share/palisade/vmlinux"),
            initramfs: PathBuf::from("/usr/share/palisade/initramfs.cpio.gz"),
            vcpus: 1,
            memory_mib: 256,
            debug_console: false,
            boot_timeout_secs: 60,
            agent_timeout_secs: 30,
            state_dir: PathBuf::from("/run/palisade/vm"),
            spare_disks: 3,
            disk_size_mib: 512,
            vmm_cgroup: true,
            vmm_cgroup_memory_overhead_mib: 0,
        }
    }
}

impl Config {
    /// Loads the config from the first of: `explicit`, `$PALISADE_CONFIG`, the default path.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(path) = explicit {
            return Self::read(path);
        }
        if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Self::read(Path::new(&path));
        }
        match std::fs::metadata(DEFAULT_CONFIG_PATH) {
            Ok(_) => Self::read(Path::new(DEFAULT_CONFIG_PATH)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: DEFAULT_CONFIG_PATH.into(),
                source,
            }),
        }
    }

    fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The mode of the pod whose (first) container carries `annotations`.
    pub fn mode_for(&self, annotations: &HashMap<String, String>) -> Result<Mode, ConfigError> {
        match annotations.get(MODE_ANNOTATION) {
            None => Ok(self.shim.default_mode),
            Some(_) if !self.annotation_allowed(MODE_ANNOTATION) => {
                Err(ConfigError::AnnotationNotAllowed)
            }
            Some(value) => value.parse(),
        }
    }

    fn annotation_allowed(&self, name: &str) -> bool {
        self.shim.allowed_annotations.iter().any(|allowed| {
            allowed == name
                || allowed
                    .strip_suffix('*')
                    .is_some_and(|prefix| name.starts_with(prefix))
        })
    }

    /// The runtime's state directory for containerd namespace `namespace`.
    pub fn runtime_root(&self, namespace: &str) -> PathBuf {
        self.native.runtime_root.join(namespace)
    }
}

/// The `config_path` of containerd's generic runtime options
/// (`runtimeoptions.v1.Options { type_url = 1; config_path = 2; config_body = 3 }`), which
/// containerd attaches to Create for non-runc runtimes. Other option types carry no path.
pub fn config_path_from_options(options: Option<&Any>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(any) = options else {
        return Ok(None);
    };
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(None);
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut config_path = None;
    loop {
        let tag = match input.read_raw_tag_or_eof() {
            Ok(Some(tag)) => tag,
            Ok(None) => break,
            Err(e) => return Err(ConfigError::RuntimeOptions(e.to_string())),
        };
        let (field, wire_type) = (tag >> 3, tag & 7);
        match (field, wire_type) {
            (2, 2) => {
                let path = input
                    .read_string()
                    .map_err(|e| ConfigError::RuntimeOptions(e.to_string()))?;
                config_path = (!path.is_empty()).then(|| PathBuf::from(path));
            }
            (_, 2) => {
                input
                    .read_bytes()
                    .map_err(|e| ConfigError::RuntimeOptions(e.to_string()))?;
            }
            (_, 0) => {
                input
                    .read_uint64()
                    .map_err(|e| ConfigError::RuntimeOptions(e.to_string()))?;
            }
            (field, wire_type) => {
                return Err(ConfigError::RuntimeOptions(format!(
                    "unexpected field {field} with wire type {wire_type}"
                )))
            }
        }
    }
    Ok(config_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_native_without_annotations() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.mode_for(&HashMap::new()).unwrap(), Mode::Native);
        let pod = HashMap::from([(MODE_ANNOTATION.to_string(), "vm".to_string())]);
        assert!(matches!(
            config.mode_for(&pod),
            Err(ConfigError::AnnotationNotAllowed)
        ));
    }

    #[test]
    fn allowed_annotation_selects_mode() {
        let config = Config::parse(
            "[shim]\ndefault_mode = \"native\"\nallowed_annotations = [\"io.palisade.*\"]\n",
        )
        .unwrap();
        let pod = HashMap::from([(MODE_ANNOTATION.to_string(), "vm".to_string())]);
        assert_eq!(config.mode_for(&pod).unwrap(), Mode::Vm);
        let bad = HashMap::from([(MODE_ANNOTATION.to_string(), "kvm".to_string())]);
        assert!(config
            .mode_for(&bad)
            .unwrap_err()
            .to_string()
            .contains("\"kvm\""));
    }

    #[test]
    fn vm_section_parses_with_defaults_for_the_rest() {
        let config = Config::parse(
            "[shim]\ndefault_mode = \"vm\"\n[vm]\nkernel = \"/k\"\nvcpus = 2\nmemory_mib = 512\n",
        )
        .unwrap();
        assert_eq!(config.shim.default_mode, Mode::Vm);
        assert_eq!(config.vm.kernel, PathBuf::from("/k"));
        assert_eq!(config.vm.vcpus, 2);
        assert_eq!(config.vm.memory_mib, 512);
        assert_eq!(config.vm.vmm, VmConfig::default().vmm);
        let err = Config::parse("[vm]\nmemory = 1\n").unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[native]\nruntime_rot = \"/x\"\n").unwrap_err();
        assert!(err.to_string().contains("runtime_rot"), "{err}");
    }

    #[test]
    fn runtime_options_config_path_is_decoded() {
        // runtimeoptions.v1.Options { type_url: "x", config_path: "/etc/p.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 11];
        value.extend_from_slice(b"/etc/p.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path_from_options(Some(&any)).unwrap(),
            Some(PathBuf::from("/etc/p.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        assert_eq!(config_path_from_options(Some(&other)).unwrap(), None);
        let truncated = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 30, b'/'],
            ..Default::default()
        };
        assert!(config_path_from_options(Some(&truncated)).is_err());
    }
}
