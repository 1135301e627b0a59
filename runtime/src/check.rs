//! `palisade check`: can this host run palisade's VM mode? A readiness report over the
//! facts VM mode depends on — the kind of KVM, whether the configured guest kernel can
//! boot on it, vsock, the cgroup mode, containerd — with a verdict.
//!
//! Every probe reads from a [`HostRoot`] so tests can run them against a fake `/sys` and
//! `/proc`.

use std::{
    fmt,
    path::{Path, PathBuf},
};

/// Defaults of the shim's `[vm]` section (shim-v2/src/config.rs, deploy/configuration.toml).
const DEFAULT_VMM: &str = "/usr/local/bin/palisade-vmm";
const DEFAULT_KERNEL: &str = "/usr/share/palisade/vmlinux";
const DEFAULT_INITRAMFS: &str = "/usr/share/palisade/initramfs.cpio.gz";
pub const DEFAULT_CONFIG_PATH: &str = "/etc/palisade/configuration.toml";
/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)`; every KVM answers 12.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: i32 = 12;
/// Strings only a PVM-enlightened guest kernel carries (CONFIG_PVM_GUEST: the early setup
/// code's symbol, or the option itself in an embedded config).
const PVM_GUEST_MARKERS: &[&[u8]] = &[b"pvm_early_setup", b"CONFIG_PVM_GUEST=y"];

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Where the probes look (`/` on a real host).
#[derive(Debug, Clone)]
pub struct HostRoot(pub PathBuf);

impl HostRoot {
    fn path(&self, absolute: &str) -> PathBuf {
        self.0.join(absolute.trim_start_matches('/'))
    }
}

/// Which KVM this host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// VT-x or AMD-V: any x86-64 guest kernel runs.
    Hardware { vendor: &'static str },
    /// kvm-pvm (Pagetable-based VM): KVM without hardware virtualisation; only
    /// PVM-enlightened guest kernels run at all.
    Pvm,
    /// `/dev/kvm` works, but the backend is none of the above.
    Unknown,
    /// No usable `/dev/kvm`.
    None { why: String },
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hardware { vendor } => write!(f, "hardware ({vendor})"),
            Self::Pvm => f.write_str("kvm-pvm"),
            Self::Unknown => f.write_str("unknown backend"),
            Self::None { why } => write!(f, "none ({why})"),
        }
    }
}

/// Opens `/dev/kvm` and asks its API version.
fn kvm_api_version(dev: &Path) -> Result<i32, String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an integer; the fd
    // is open for the duration of the call.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version < 0 {
        return Err(format!(
            "{}: KVM_GET_API_VERSION: {}",
            dev.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(version)
}

/// Classifies KVM from the loaded (or built-in) KVM modules in sysfs, the CPU flags and
/// `/dev/kvm` itself. kvm-pvm registers as module `kvm_pvm` (built in here: it shows in
/// /sys/module, not /proc/modules) and the CPU shows no vmx/svm flag.
pub fn kvm_kind(root: &HostRoot) -> KvmKind {
    let dev = root.path("/dev/kvm");
    if !dev.exists() {
        return KvmKind::None {
            why: "no /dev/kvm".into(),
        };
    }
    if root.0 == Path::new("/") {
        match kvm_api_version(&dev) {
            Ok(KVM_API_VERSION) => {}
            Ok(v) => {
                return KvmKind::None {
                    why: format!("/dev/kvm speaks API {v}, not {KVM_API_VERSION}"),
                }
            }
            Err(why) => return KvmKind::None { why },
        }
    }
    let module = |name: &str| root.path(&format!("/sys/module/{name}")).exists();
    let cpu_flags = std::fs::read_to_string(root.path("/proc/cpuinfo")).unwrap_or_default();
    let has_flag = |flag: &str| {
        cpu_flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    };
    if module("kvm_pvm") {
        return KvmKind::Pvm;
    }
    if module("kvm_intel") && has_flag("vmx") {
        return KvmKind::Hardware {
            vendor: "Intel VT-x",
        };
    }
    if module("kvm_amd") && has_flag("svm") {
        return KvmKind::Hardware { vendor: "AMD-V" };
    }
    KvmKind::Unknown
}

/// The cgroup layout at /sys/fs/cgroup.
pub fn cgroup_mode(root: &HostRoot) -> &'static str {
    let base = root.path("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        "v2 (unified)"
    } else if base.join("unified/cgroup.controllers").exists() {
        "hybrid (v1 controllers + cgroup2 at /sys/fs/cgroup/unified)"
    } else if base.exists() {
        "v1"
    } else {
        "none mounted"
    }
}

/// What VM mode needs from the shim config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    pub config: Option<PathBuf>,
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl VmSettings {
    /// The `[vm]` section of the shim config at `path` (or the default path, where a
    /// missing file means defaults, as for the shim).
    pub fn load(path: Option<&Path>) -> Result<Self, CheckError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => match std::env::var_os("PALISADE_CONFIG").filter(|p| !p.is_empty()) {
                Some(p) => (PathBuf::from(p), true),
                None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Self::parse("", None)
            }
            Err(source) => return Err(CheckError::Read { path, source }),
        };
        Self::parse(&text, Some(&path))
    }

    pub fn parse(text: &str, path: Option<&Path>) -> Result<Self, CheckError> {
        let shown = path.map(Path::to_path_buf).unwrap_or_default();
        let value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| CheckError::Parse {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        let vm = value.get("vm").and_then(|v| v.as_table());
        let get = |key: &str, default: &str| -> Result<PathBuf, CheckError> {
            match vm.and_then(|t| t.get(key)) {
                None => Ok(PathBuf::from(default)),
                Some(toml::Value::String(s)) => Ok(PathBuf::from(s)),
                Some(_) => Err(CheckError::Parse {
                    path: shown.clone(),
                    message: format!("vm.{key} must be a string"),
                }),
            }
        };
        Ok(Self {
            config: path.map(Path::to_path_buf),
            vmm: get("vmm", DEFAULT_VMM)?,
            kernel: get("kernel", DEFAULT_KERNEL)?,
            initramfs: get("initramfs", DEFAULT_INITRAMFS)?,
        })
    }
}

/// Whether a guest kernel image carries PVM guest support.
pub fn kernel_has_pvm_guest(kernel: &Path) -> Result<bool, CheckError> {
    let bytes = std::fs::read(kernel).map_err(|source| CheckError::Read {
        path: kernel.to_path_buf(),
        source,
    })?;
    Ok(PVM_GUEST_MARKERS
        .iter()
        .any(|m| bytes.windows(m.len()).any(|w| w == *m)))
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub items: Vec<Item>,
    pub kvm: KvmKind,
}

impl Report {
    /// VM mode can work only if every item is fine.
    pub fn vm_ready(&self) -> bool {
        self.items.iter().all(|i| i.ok)
    }

    pub fn problems(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| !i.ok)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in &self.items {
            writeln!(
                f,
                "{:<5} {:<14} {}",
                if item.ok { "ok" } else { "FAIL" },
                item.name,
                item.detail
            )?;
        }
        if self.vm_ready() {
            writeln!(f, "VM mode: ready")
        } else {
            let why: Vec<_> = self.problems().map(|i| i.name).collect();
            writeln!(f, "VM mode: NOT ready ({})", why.join(", "))
        }
    }
}

/// Runs every probe.
pub fn run(root: &HostRoot, settings: &VmSettings, containerd_version: Option<String>) -> Report {
    let mut items = Vec::new();
    let kvm = kvm_kind(root);
    items.push(Item {
        name: "kvm",
        ok: matches!(kvm, KvmKind::Hardware { .. } | KvmKind::Pvm),
        detail: kvm.to_string(),
    });

    let kernel = &settings.kernel;
    let kernel_item = match (&kvm, kernel.is_file()) {
        (_, false) => Item {
            name: "guest-kernel",
            ok: false,
            detail: format!("{} does not exist (vm.kernel)", kernel.display()),
        },
        (KvmKind::Pvm, true) => match kernel_has_pvm_guest(kernel) {
            Ok(true) => Item {
                name: "guest-kernel",
                ok: true,
                detail: format!("{}: PVM-enlightened (CONFIG_PVM_GUEST)", kernel.display()),
            },
            Ok(false) => Item {
                name: "guest-kernel",
                ok: false,
                detail: format!(
                    "{} cannot boot on kvm-pvm: it is a stock kernel (no CONFIG_PVM_GUEST). \
                     kvm-pvm exposes no VT-x/AMD-V; it runs only guests enlightened for PVM, \
                     and a stock kernel falls back to instruction emulation, which fails \
                     (measured here: KVM emulation failure in the decompressor after ~60 s). \
                     Build the guest kernel from a PVM guest tree (guest-kernel/README) or use \
                     a host with hardware virtualisation",
                    kernel.display()
                ),
            },
            Err(e) => Item {
                name: "guest-kernel",
                ok: false,
                detail: e.to_string(),
            },
        },
        (KvmKind::Hardware { .. }, true) => Item {
            name: "guest-kernel",
            ok: true,
            detail: format!(
                "{} (any x86-64 kernel boots on hardware KVM)",
                kernel.display()
            ),
        },
        (_, true) => Item {
            name: "guest-kernel",
            ok: false,
            detail: format!("{}: no KVM to boot it on", kernel.display()),
        },
    };
    items.push(kernel_item);

    for (name, path, key) in [
        ("initramfs", &settings.initramfs, "vm.initramfs"),
        ("vmm", &settings.vmm, "vm.vmm"),
    ] {
        items.push(Item {
            name,
            ok: path.is_file(),
            detail: if path.is_file() {
                path.display().to_string()
            } else {
                format!("{} does not exist ({key})", path.display())
            },
        });
    }

    let vhost = root.path("/dev/vhost-vsock").exists();
    items.push(Item {
        name: "vsock",
        ok: true,
        detail: format!(
            "hybrid vsock over a Unix socket (palisade-vmm's own device; no vhost-vsock needed; /dev/vhost-vsock {})",
            if vhost { "present" } else { "absent" }
        ),
    });
    items.push(Item {
        name: "cgroups",
        ok: true,
        detail: cgroup_mode(root).to_string(),
    });
    items.push(Item {
        name: "containerd",
        ok: containerd_version.is_some(),
        detail: containerd_version.unwrap_or_else(|| "not found on PATH".into()),
    });
    if let Some(config) = &settings.config {
        items.insert(
            0,
            Item {
                name: "config",
                ok: true,
                detail: config.display().to_string(),
            },
        );
    }
    Report { items, kvm }
}

/// `containerd --version`, if containerd is on PATH.
pub fn containerd_version() -> Option<String> {
    let out = std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(modules: &[&str], flags: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for m in modules {
            std::fs::create_dir_all(dir.path().join("sys/module").join(m)).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(
            dir.path().join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu {flags} sse\n"),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("dev")).unwrap();
        std::fs::write(dir.path().join("dev/kvm"), "").unwrap();
        dir
    }

    #[test]
    fn kvm_kinds_are_told_apart() {
        let pvm = fake_host(&["kvm", "kvm_pvm"], "hypervisor");
        assert_eq!(kvm_kind(&HostRoot(pvm.path().into())), KvmKind::Pvm);
        let amd = fake_host(&["kvm", "kvm_amd"], "svm");
        assert_eq!(
            kvm_kind(&HostRoot(amd.path().into())),
            KvmKind::Hardware { vendor: "AMD-V" }
        );
        let intel = fake_host(&["kvm", "kvm_intel"], "vmx");
        assert!(matches!(
            kvm_kind(&HostRoot(intel.path().into())),
            KvmKind::Hardware { .. }
        ));
        let none = tempfile::tempdir().unwrap();
        assert!(matches!(
            kvm_kind(&HostRoot(none.path().into())),
            KvmKind::None { .. }
        ));
    }

    #[test]
    fn stock_kernel_on_pvm_is_not_ready_and_says_why() {
        let host = fake_host(&["kvm_pvm"], "");
        let kernel = host.path().join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF...Linux version 6.12").unwrap();
        let files = host.path().join("f");
        std::fs::write(&files, "").unwrap();
        let settings = VmSettings {
            config: None,
            vmm: files.clone(),
            kernel: kernel.clone(),
            initramfs: files,
        };
        let report = run(
            &HostRoot(host.path().into()),
            &settings,
            Some("containerd 1.6".into()),
        );
        assert!(!report.vm_ready());
        let text = report.to_string();
        assert!(text.contains("kvm-pvm"), "{text}");
        assert!(text.contains("cannot boot on kvm-pvm"), "{text}");
        assert!(text.contains("VM mode: NOT ready (guest-kernel)"), "{text}");

        std::fs::write(&kernel, b"..pvm_early_setup..").unwrap();
        let report = run(&HostRoot(host.path().into()), &settings, Some("c".into()));
        assert!(report.vm_ready(), "{report}");
    }

    #[test]
    fn settings_come_from_the_vm_section() {
        let s = VmSettings::parse("[vm]\nkernel = \"/k\"\nvcpus = 2\n", None).unwrap();
        assert_eq!(s.kernel, PathBuf::from("/k"));
        assert_eq!(s.vmm, PathBuf::from(DEFAULT_VMM));
        let err = VmSettings::parse("[vm]\nkernel = 3\n", None).unwrap_err();
        assert!(err.to_string().contains("vm.kernel"), "{err}");
        assert!(VmSettings::parse("[vm", None).is_err());
    }

    #[test]
    fn cgroup_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot(dir.path().into());
        assert_eq!(cgroup_mode(&root), "none mounted");
        std::fs::create_dir_all(dir.path().join("sys/fs/cgroup/unified")).unwrap();
        std::fs::write(
            dir.path().join("sys/fs/cgroup/unified/cgroup.controllers"),
            "",
        )
        .unwrap();
        assert!(cgroup_mode(&root).starts_with("hybrid"));
    }
}
