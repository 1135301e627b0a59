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

/// How much of the end of the guest console a death report reads: a panic report is a few
/// KiB; the guest controls the file's size.
const CONSOLE_SCAN_BYTES: u64 = 64 * 1024;
/// Longest guest-written text quoted in a message (the guest controls it).
const QUOTE_MAX: usize = 200;

/// Why the VMM exited, for the error that reports the pod's VM gone: the guest kernel's
/// panic line from `console_log` when there is one, else what palisade-vmm's exit
/// `status` (as the reaper reports it: code, or 128 + signal) means.
pub fn exit_reason(status: u32, console_log: &Path) -> String {
    if let Some(panic) = guest_panic(console_log) {
        return format!("guest kernel panic: {panic} (palisade-vmm exit status {status})");
    }
    match status {
        0 => "the guest shut down or reset (palisade-vmm exit status 0)".into(),
        1 => "palisade-vmm failed (exit status 1, see its log)".into(),
        2 => "guest failure: the guest triple-faulted (palisade-vmm exit status 2)".into(),
        s if s > 128 => format!("palisade-vmm was killed by signal {}", s - 128),
        s => format!("palisade-vmm exited with status {s}"),
    }
}

/// The guest kernel's `Kernel panic - not syncing: ...` line near the end of its console
/// log, printable ASCII only and bounded (guest-written text).
fn guest_panic(console_log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(console_log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_SCAN_BYTES)))
        .ok()?;
    let mut bytes = Vec::new();
    file.take(CONSOLE_SCAN_BYTES).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().rev().find(|l| l.contains("Kernel panic - "))?;
    let start = line.find("Kernel panic - ").unwrap_or(0);
    Some(
        line[start..]
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(QUOTE_MAX)
            .collect::<String>()
            .trim_end()
            .to_string(),
    )
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
    fn exit_reason_names_a_guest_panic_from_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut text = "x".repeat(100_000);
        text.push_str(
            "\n[ 12.5] sysrq: Trigger a crash\n[ 12.6] Kernel panic - not syncing: sysrq triggered crash\x07\r\n[ 12.7] CPU: 0 PID: 9\n",
        );
        std::fs::write(&log, text).unwrap();
        assert_eq!(
            exit_reason(0, &log),
            "guest kernel panic: Kernel panic - not syncing: sysrq triggered crash (palisade-vmm exit status 0)"
        );
    }

    #[test]
    fn exit_reason_bounds_what_the_guest_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, format!("Kernel panic - {}\n", "A".repeat(10_000))).unwrap();
        let reason = exit_reason(0, &log);
        assert!(reason.len() < QUOTE_MAX + 80, "{reason}");
    }

    #[test]
    fn exit_reason_without_a_panic_says_what_the_vmm_status_means() {
        let none = Path::new("/nonexistent/console.log");
        assert_eq!(
            exit_reason(137, none),
            "palisade-vmm was killed by signal 9"
        );
        assert!(exit_reason(2, none).contains("triple-faulted"));
        assert!(exit_reason(0, none).contains("shut down or reset"));
        assert!(exit_reason(1, none).contains("failed"));
        assert_eq!(exit_reason(7, none), "palisade-vmm exited with status 7");
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
