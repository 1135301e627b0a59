//! A busybox OCI bundle built locally from Debian's busybox-static: a rootfs (the binary,
//! one symlink per applet, passwd/group; see [`crate::image::write_busybox_rootfs`]) and a
//! `config.json` like `runc spec` writes, with the process arguments (and any other
//! field) chosen by the test.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// A bundle directory, removed on drop.
#[derive(Debug)]
pub struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    /// A bundle whose container runs `args`.
    pub fn busybox(args: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("palisade-bundle-")
            .tempdir()
            .context("creating the bundle directory")?;
        crate::image::write_busybox_rootfs(&dir.path().join("rootfs"))?;
        let bundle = Self { dir };
        bundle.write_config(&default_config(args))?;
        Ok(bundle)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// The current `config.json`.
    pub fn config(&self) -> Result<Value> {
        let text = std::fs::read(self.config_path()).context("reading config.json")?;
        serde_json::from_slice(&text).context("parsing config.json")
    }

    pub fn write_config(&self, config: &Value) -> Result<()> {
        std::fs::write(self.config_path(), serde_json::to_vec_pretty(config)?)
            .context("writing config.json")
    }

    /// Changes `config.json` in place.
    pub fn edit(&self, change: impl FnOnce(&mut Value)) -> Result<()> {
        let mut config = self.config()?;
        change(&mut config);
        self.write_config(&config)
    }
}

/// The capabilities `runc spec` gives a container.
pub const DEFAULT_CAPS: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// A `config.json` equivalent to `runc spec` (runtime-spec 1.x, runc >= 1.1.2 defaults)
/// with `terminal: false`, a cgroup namespace, and `args` as the process.
pub fn default_config(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm"
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "palisade",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_has_rootfs_and_config() {
        let b = Bundle::busybox(&["/bin/true"]).unwrap();
        assert!(b.rootfs().join("bin/busybox").is_file());
        b.edit(|c| c["hostname"] = "x".into()).unwrap();
        let c = b.config().unwrap();
        assert_eq!(c["hostname"], "x");
        assert_eq!(c["process"]["args"][0], "/bin/true");
    }
}
