//! The pod's `palisade-vmm` process: its command line, its state directory (hybrid-vsock
//! socket, drive images), and the record in the bundle that lets `shim delete` clean up
//! after a shim that died.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tracing::warn;

use crate::config::VmConfig;

/// Guest context id of the VM's vsock device (one VM per VMM: any id ≥ 3 works).
const GUEST_CID: u32 = 3;
/// Written into the bundle: `<state dir>\n<vmm pid>\n`.
pub const RECORD_FILE: &str = "palisade-vm";
pub const CONSOLE_LOG: &str = "vm-console.log";
pub const VMM_LOG: &str = "vmm.log";

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("vm.{field} = {path}: {why}")]
    Config {
        field: &'static str,
        path: PathBuf,
        why: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// Where one VM keeps its files.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub path: PathBuf,
}

impl VmDir {
    /// Creates `<state_dir>/<name>` (fresh).
    pub fn create(state_dir: &Path, name: &str) -> Result<Self, VmmError> {
        let path = state_dir.join(name);
        if path.exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(Self { path })
    }

    pub fn vsock_socket(&self) -> PathBuf {
        self.path.join("vsock")
    }

    pub fn drive_image(&self, index: usize) -> PathBuf {
        self.path.join(format!("disk{index}.img"))
    }

    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("removing {}: {e}", self.path.display());
            }
        }
    }
}

/// Checks that the configured files exist, naming the missing one.
pub fn check_config(config: &VmConfig) -> Result<(), VmmError> {
    for (field, path) in [
        ("vmm", &config.vmm),
        ("kernel", &config.kernel),
        ("initramfs", &config.initramfs),
    ] {
        if !path.is_file() {
            return Err(VmmError::Config {
                field,
                path: path.clone(),
                why: "no such file".into(),
            });
        }
    }
    Ok(())
}

/// The VMM's command line for `config`, with `drives` attached read-write in order.
pub fn command(config: &VmConfig, dir: &VmDir, drives: &[PathBuf], bundle: &Path) -> Command {
    let mut cmdline = String::from("console=ttyS0 reboot=k panic=-1 pci=off");
    if !config.debug_console {
        cmdline.push_str(" quiet");
    }
    let mut cmd = Command::new(&config.vmm);
    cmd.arg("--kernel")
        .arg(&config.kernel)
        .arg("--initrd")
        .arg(&config.initramfs)
        .arg("--vcpus")
        .arg(config.vcpus.to_string())
        .arg("--mem-mib")
        .arg(config.memory_mib.to_string())
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--vsock-cid")
        .arg(GUEST_CID.to_string())
        .arg("--vsock-uds")
        .arg(dir.vsock_socket())
        .arg("--serial-output")
        .arg(bundle.join(CONSOLE_LOG));
    for (i, image) in drives.iter().enumerate() {
        cmd.arg("--block")
            .arg(format!("path={},id=drive{i}", image.display()));
    }
    cmd
}

/// Starts the VMM (stdin closed, its own log in the bundle) in a process group of its
/// own, so signals meant for the shim do not reach it. Blocking: call it under the
/// reaper's child guard.
pub fn spawn(mut cmd: Command, bundle: &Path) -> Result<u32, VmmError> {
    let log_path = bundle.join(VMM_LOG);
    let log = File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(io(format!("duplicating {}", log_path.display())))?;
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0);
    let child = cmd.spawn().map_err(io("starting palisade-vmm"))?;
    // The shim's reaper collects its exit (the shim is a subreaper waiting on every child).
    Ok(child.id())
}

/// Records the VM in the bundle for [`cleanup_after_dead_shim`].
pub fn write_record(bundle: &Path, dir: &VmDir, pid: u32) -> Result<(), VmmError> {
    let path = bundle.join(RECORD_FILE);
    std::fs::write(&path, format!("{}\n{pid}\n", dir.path.display()))
        .map_err(io(format!("writing {}", path.display())))
}

/// The last `lines` lines of a log file, joined with " | " (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

pub fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Whether `pid` still runs `palisade-vmm`-like: it exists and its command line names
/// the VM's state dir (so a recycled pid is never killed).
fn is_our_vmm(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let needle = dir.as_os_str().as_encoded_bytes();
            cmdline.windows(needle.len().max(1)).any(|w| w == needle)
        })
        .unwrap_or(false)
}

/// What a shim that died left of its VM (recorded in `bundle`): kills the VMM and removes
/// the VM's state dir. Used by `shim delete`.
pub fn cleanup_after_dead_shim(bundle: &Path) {
    let record = bundle.join(RECORD_FILE);
    let Ok(text) = std::fs::read_to_string(&record) else {
        return;
    };
    let mut lines = text.lines();
    let (Some(dir), Some(pid)) = (lines.next(), lines.next()) else {
        return;
    };
    let dir = PathBuf::from(dir);
    if let Ok(pid) = pid.parse::<u32>() {
        if is_our_vmm(pid, &dir) {
            kill(pid);
        }
    }
    // Only ever a directory of the VM's own (a file name under the state dir).
    if dir.file_name().is_some() {
        VmDir { path: dir }.remove();
    }
    let _ = std::fs::remove_file(record);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_carries_the_config_and_drives() {
        let config = VmConfig {
            vcpus: 2,
            memory_mib: 300,
            ..Default::default()
        };
        let dir = VmDir {
            path: "/run/palisade/vm/x".into(),
        };
        let cmd = command(&config, &dir, &[dir.drive_image(0)], Path::new("/b"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--vcpus 2 --mem-mib 300"), "{joined}");
        assert!(
            joined.contains("--vsock-uds /run/palisade/vm/x/vsock"),
            "{joined}"
        );
        assert!(joined.contains("--block path=/run/palisade/vm/x/disk0.img,id=drive0"));
        assert!(joined.contains("--serial-output /b/vm-console.log"));
        assert!(args.iter().any(|a| a.ends_with(" quiet")));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "a\nb\n\nc\n").unwrap();
        assert_eq!(tail(&log, 2), "b | c");
        assert_eq!(tail(&dir.path().join("none"), 2), "");
    }

    #[test]
    fn missing_files_are_named() {
        let config = VmConfig {
            vmm: "/nonexistent/palisade-vmm".into(),
            ..Default::default()
        };
        let err = check_config(&config).unwrap_err().to_string();
        assert!(err.contains("vm.vmm = /nonexistent/palisade-vmm"), "{err}");
    }

    #[test]
    fn dead_shim_cleanup_removes_the_vm_dir_and_record() {
        let state = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        let dir = VmDir::create(state.path(), "pod").unwrap();
        std::fs::write(dir.drive_image(0), b"x").unwrap();
        // A pid that is not a VMM of this dir (our own) must survive.
        write_record(bundle.path(), &dir, std::process::id()).unwrap();
        cleanup_after_dead_shim(bundle.path());
        assert!(!dir.path.exists());
        assert!(!bundle.path().join(RECORD_FILE).exists());
    }
}
