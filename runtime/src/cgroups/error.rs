//! Errors of the cgroup manager. Each names the controller and the file (or the spec field)
//! involved, e.g. `cgroup memory: write 100 to /sys/fs/cgroup/memory/x/memory.limit_in_bytes:
//! Device or resource busy`.

use std::{io, path::PathBuf};

/// Everything the cgroup manager can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Writing a value to a cgroup file failed.
    #[error("cgroup {controller}: write {value} to {}: {}", path.display(), os_text(source))]
    Write {
        controller: &'static str,
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },

    /// Reading a cgroup file failed.
    #[error("cgroup {controller}: read {}: {}", path.display(), os_text(source))]
    Read {
        controller: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A cgroup (or `/proc`) file had content we could not understand.
    #[error("cgroup: parse {}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },

    /// Any other filesystem or system-call failure (mkdir, rmdir, open, kill, ...).
    #[error("cgroup: {context}: {}", os_text(source))]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// A `linux.resources` value that is invalid or cannot be honoured; `field` is the JSON
    /// path of the offending value, e.g. `linux.resources.memory.swap`.
    #[error("{field}: {msg}")]
    Resource { field: String, msg: String },

    /// `linux.cgroupsPath` is unusable.
    #[error("linux.cgroupsPath {path:?}: {msg}")]
    InvalidPath { path: String, msg: String },

    /// A controller needed for a requested resource is not mounted/enabled.
    #[error("{field}: cgroup controller {controller:?} is not available on this host")]
    ControllerMissing {
        field: &'static str,
        controller: &'static str,
    },

    /// No cgroup filesystem is mounted at all.
    #[error("cgroup: no cgroup or cgroup2 filesystem found in /proc/self/mountinfo")]
    NotMounted,

    /// A feature deliberately not implemented (e.g. the systemd cgroup driver).
    #[error("{0} is not supported")]
    Unsupported(String),

    /// Freezing (or a wait on the cgroup) did not finish in time.
    #[error("cgroup {controller}: timed out waiting for {what} in {}", path.display())]
    Timeout {
        controller: &'static str,
        what: &'static str,
        path: PathBuf,
    },

    /// Processes were still alive after `destroy` killed them.
    #[error("cgroup: {} still has processes {pids:?} after SIGKILL", path.display())]
    Busy { path: PathBuf, pids: Vec<i32> },

    /// A `bpf(2)` operation for the cgroup v2 device filter failed.
    #[error("cgroup devices: bpf({op}): {}", os_text(source))]
    Bpf {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The errno text without Rust's ` (os error N)` suffix, so messages read like the shell's.
pub(crate) fn os_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_error_names_controller_file_value_and_errno() {
        let e = CgroupError::Write {
            controller: "memory",
            path: "/sys/fs/cgroup/memory/x/memory.limit_in_bytes".into(),
            value: "100".into(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        };
        assert_eq!(
            e.to_string(),
            "cgroup memory: write 100 to /sys/fs/cgroup/memory/x/memory.limit_in_bytes: \
             Device or resource busy"
        );
    }
}
