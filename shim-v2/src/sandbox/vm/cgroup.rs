//! The VMM's own cgroup: the pod's microVM is accounted and limited like a container.
//!
//! Placement: next to the sandbox container's cgroup, i.e. under the pod's cgroup parent,
//! when the spec's `linux.cgroupsPath` names one (`/kubepods/burstable/pod<uid>/<id>` →
//! `/kubepods/burstable/pod<uid>/vmm-<id>`), else `/palisade/vmm-<id>`. The directories are
//! made by palisade-runtime's cgroup manager (v1, v2, hybrid). The VMM joins it between
//! fork and exec (it writes `0` to `cgroup.procs`), so everything it allocates is charged
//! there. Device access is limited to the runtime's default devices plus `/dev/kvm` and
//! `/dev/net/tun`; a memory limit (guest RAM + `vmm_cgroup_memory_overhead_mib`) is set
//! only when configured. Removed with the VM, on a failed boot, and by `shim delete` after
//! a shim that died (from a record in the bundle).

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path, process::Command};

use oci_spec::runtime::{
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxResources,
    LinuxResourcesBuilder,
};
use palisade_runtime::cgroups::{Cgroup, CgroupError, DEFAULT_PARENT};
use tracing::warn;

use crate::config::VmConfig;

/// Written into the bundle: the cgroup as JSON, for [`cleanup_after_dead_shim`].
pub const RECORD_FILE: &str = "palisade-vmm-cgroup";

/// `/dev/kvm` and `/dev/net/tun` (character devices 10:232 and 10:200).
const VMM_DEVICES: [(i64, i64); 2] = [(10, 232), (10, 200)];

#[derive(Debug, thiserror::Error)]
pub enum VmmCgroupError {
    #[error("the VMM's cgroup {path}: {source}")]
    Cgroup { path: String, source: CgroupError },
    #[error("the VMM's cgroup {path}: {why}")]
    Other { path: String, why: String },
}

/// The `cgroupsPath` of the VMM of the pod whose sandbox container is `sandbox_id` and
/// whose spec says `container_path`.
pub fn vmm_cgroups_path(container_path: Option<&str>, sandbox_id: &str) -> String {
    let name = format!("vmm-{sandbox_id}");
    match container_path.filter(|p| !p.is_empty()) {
        // systemd's `slice:prefix:name` is not a path (and not supported by the runtime).
        Some(p) if !p.contains(':') => match p.trim_end_matches('/').rsplit_once('/') {
            Some(("", _)) => format!("/{name}"),
            Some((parent, _)) => format!("{parent}/{name}"),
            // A relative single component: a sibling below the caller's cgroup.
            None => name,
        },
        _ => format!("/{DEFAULT_PARENT}/{name}"),
    }
}

/// The resources applied to the VMM's cgroup.
fn resources(config: &VmConfig) -> Result<LinuxResources, String> {
    let devices = VMM_DEVICES
        .iter()
        .map(|&(major, minor)| {
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(major)
                .minor(minor)
                .access("rwm")
                .build()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = LinuxResourcesBuilder::default().devices(devices);
    if config.vmm_cgroup_memory_overhead_mib > 0 {
        let mib = u64::from(config.memory_mib) + config.vmm_cgroup_memory_overhead_mib;
        let bytes = i64::try_from(mib << 20).map_err(|e| e.to_string())?;
        builder = builder.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    builder.build().map_err(|e| e.to_string())
}

/// The VMM's cgroup, created and configured.
#[derive(Debug, Clone)]
pub struct VmmCgroup {
    cgroup: Cgroup,
}

impl VmmCgroup {
    /// Creates the cgroup at `cgroups_path` with the resources of `config`. Blocking.
    pub fn create(config: &VmConfig, cgroups_path: &str) -> Result<Self, VmmCgroupError> {
        let err = |source| VmmCgroupError::Cgroup {
            path: cgroups_path.to_owned(),
            source,
        };
        let resources = resources(config).map_err(|why| VmmCgroupError::Other {
            path: cgroups_path.to_owned(),
            why,
        })?;
        // The id only names the default path, which `cgroups_path` never leaves to it.
        let cgroup = Cgroup::new(Some(cgroups_path), "vmm").map_err(err)?;
        cgroup.create().map_err(err)?;
        if let Err(e) = cgroup.apply(&resources) {
            let _ = cgroup.destroy();
            return Err(err(e));
        }
        Ok(Self { cgroup })
    }

    /// `cgroups_path` as the runtime names it (e.g. `/palisade/vmm-pod`).
    pub fn path(&self) -> &str {
        self.cgroup.path()
    }

    /// Makes the child of `cmd` join the cgroup before it execs.
    pub fn join_on_exec(&self, cmd: &mut Command) -> Result<(), VmmCgroupError> {
        let procs: Vec<CString> = self
            .cgroup
            .dirs()
            .into_iter()
            .map(|dir| CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| VmmCgroupError::Other {
                path: self.path().to_owned(),
                why: e.to_string(),
            })?;
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only async-signal-safe calls are made (open,
        // write, close) on paths prepared before the fork; nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0": the writing process itself.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Records the cgroup in `bundle` for [`cleanup_after_dead_shim`].
    pub fn write_record(&self, bundle: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(&self.cgroup).map_err(std::io::Error::other)?;
        std::fs::write(bundle.join(RECORD_FILE), json)
    }

    /// Kills what is left in the cgroup and removes it and the record. Blocking.
    pub fn destroy(&self, bundle: &Path) {
        if let Err(e) = self.cgroup.destroy() {
            warn!(cgroup = self.path(), "removing the VMM's cgroup: {e}");
        }
        let _ = std::fs::remove_file(bundle.join(RECORD_FILE));
    }
}

/// Removes the VMM cgroup a dead shim recorded in `bundle` (after the VMM was killed).
pub fn cleanup_after_dead_shim(bundle: &Path) {
    let Ok(json) = std::fs::read(bundle.join(RECORD_FILE)) else {
        return;
    };
    match serde_json::from_slice::<Cgroup>(&json) {
        Ok(cgroup) => VmmCgroup { cgroup }.destroy(bundle),
        Err(e) => {
            warn!("{}: {e}", bundle.join(RECORD_FILE).display());
            let _ = std::fs::remove_file(bundle.join(RECORD_FILE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_goes_next_to_the_sandbox_container() {
        assert_eq!(
            vmm_cgroups_path(Some("/kubepods/burstable/pod12/abc"), "abc"),
            "/kubepods/burstable/pod12/vmm-abc"
        );
        assert_eq!(vmm_cgroups_path(Some("/abc"), "abc"), "/vmm-abc");
        assert_eq!(vmm_cgroups_path(Some("k8s/abc/"), "abc"), "k8s/vmm-abc");
        assert_eq!(vmm_cgroups_path(Some("abc"), "abc"), "vmm-abc");
        assert_eq!(vmm_cgroups_path(None, "abc"), "/palisade/vmm-abc");
        assert_eq!(vmm_cgroups_path(Some(""), "abc"), "/palisade/vmm-abc");
        assert_eq!(
            vmm_cgroups_path(Some("kubepods.slice:cri-containerd:abc"), "abc"),
            "/palisade/vmm-abc"
        );
    }

    #[test]
    fn memory_is_limited_only_when_configured() {
        let mut config = VmConfig::default();
        let r = resources(&config).unwrap();
        assert!(r.memory().is_none());
        assert_eq!(r.devices().as_ref().unwrap().len(), 2);
        config.memory_mib = 256;
        config.vmm_cgroup_memory_overhead_mib = 64;
        let r = resources(&config).unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(320 << 20));
    }

    /// Needs root and a cgroup filesystem (CI runs as root): a real child joins the
    /// cgroup before exec, and destroy removes it with the process in it.
    #[test]
    fn a_child_joins_before_exec_and_destroy_removes_everything() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let bundle = tempfile::tempdir().unwrap();
        let name = format!("/palisade-test/vmm-unit-{}", std::process::id());
        let config = VmConfig {
            vmm_cgroup_memory_overhead_mib: 32,
            ..Default::default()
        };
        let cgroup = VmmCgroup::create(&config, &name).unwrap();
        cgroup.write_record(bundle.path()).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        cgroup.join_on_exec(&mut cmd).unwrap();
        let mut child = cmd.spawn().unwrap();
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(own.contains(&format!("{name}\n")), "{own}");
        let dirs: Vec<_> = cgroup
            .cgroup
            .dirs()
            .into_iter()
            .map(Path::to_path_buf)
            .collect();
        assert!(dirs.iter().all(|d| d.exists()));
        // A shim that died: the record is all that is left.
        cleanup_after_dead_shim(bundle.path());
        let status = child.wait().unwrap();
        assert!(!status.success(), "the cgroup's process was killed");
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
        assert!(!bundle.path().join(RECORD_FILE).exists());
        for dir in &dirs {
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}
