//! OCI seccomp profile → classic BPF, and its installation.
//!
//! [`compile`] runs in the runtime (before any fork) and turns `linux.seccomp` into a
//! [`CompiledFilter`]; [`CompiledFilter::install`] runs in the container's process right
//! before `execve` and is a single `seccomp(2)` call (no allocation, no locks), so it is safe
//! after `fork` in a multi-threaded caller. It needs either `no_new_privs` set or
//! `CAP_SYS_ADMIN` in the caller, as the kernel requires.
//!
//! Semantics (runc/libseccomp compatible where it matters):
//! * `defaultAction`/`defaultErrnoRet`; per rule `SCMP_ACT_ERRNO` (errnoRet, default EPERM),
//!   `KILL` (= `KILL_THREAD`), `KILL_THREAD`, `KILL_PROCESS`, `TRAP`, `ALLOW`, `LOG`, `TRACE`
//!   (errnoRet is the tracer's data, default EPERM). `SCMP_ACT_NOTIFY` is not supported.
//! * `args` of one rule are ANDed; several rules for the same syscall are ORed. When rules
//!   with different actions match the same call, the most severe action wins (the kernel's
//!   own precedence between stacked filters: KILL_PROCESS > KILL_THREAD > TRAP > ERRNO >
//!   TRACE > LOG > ALLOW). Rules whose action equals the default action are dropped (runc).
//! * Syscall names unknown on the native architecture are skipped with a warning.
//! * Unless the default action allows, a syscall numbered above every syscall the profile
//!   names returns ENOSYS (runc does the same), so a libc tries its fallback for calls
//!   newer than the profile (e.g. `clone3` → `clone`).
//! * Only the native architecture is filtered (`architectures` must include it, or be
//!   empty); calls through another ABI (i386 `int 0x80`, x32) are killed, as libseccomp does
//!   for architectures absent from a filter.
//! * `flags`: `SECCOMP_FILTER_FLAG_TSYNC`, `_LOG`, `_SPEC_ALLOW` are passed to seccomp(2).
//!
//! Unknown action, operator, architecture or flag *strings* make the typed spec fail to
//! parse; [`check_json`] walks the raw JSON first so that the error names the field, e.g.
//! `linux.seccomp.syscalls[3].action: unknown action "SCMP_ACT_FOO"`.

mod compile;
pub mod syscalls;

use std::io;

pub use compile::{check_json, compile};

/// Errors of compiling or installing a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A value of `linux.seccomp` is invalid; `field` is its JSON path.
    #[error("{field}: {msg}")]
    Invalid { field: String, msg: String },

    /// A valid but unimplemented feature (`SCMP_ACT_NOTIFY`).
    #[error("{0} is not supported")]
    Unsupported(String),

    /// seccompiler refused the rules (e.g. the program is longer than the kernel allows).
    #[error("linux.seccomp: {0}")]
    Compile(String),

    /// The seccomp(2) call failed.
    #[error("seccomp(SECCOMP_SET_MODE_FILTER): {}", os_text(.0))]
    Install(#[source] io::Error),

    /// With `SECCOMP_FILTER_FLAG_TSYNC`, another thread could not be synchronized.
    #[error("seccomp(SECCOMP_SET_MODE_FILTER) with TSYNC: thread {0} cannot be synchronized")]
    ThreadSync(i64),
}

/// The errno text without Rust's ` (os error N)` suffix.
fn os_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// A compiled profile: the BPF program and the seccomp(2) flags to install it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFilter {
    program: Vec<seccompiler::sock_filter>,
    flags: libc::c_ulong,
}

/// `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const seccompiler::sock_filter,
}

impl CompiledFilter {
    /// The BPF instructions.
    pub fn instructions(&self) -> &[seccompiler::sock_filter] {
        &self.program
    }

    /// The `SECCOMP_FILTER_FLAG_*` bits.
    pub fn flags(&self) -> libc::c_ulong {
        self.flags
    }

    /// Installs the filter on the calling thread (all threads with TSYNC). Does not
    /// allocate on success; set `no_new_privs` first unless the caller has CAP_SYS_ADMIN.
    pub fn install(&self) -> Result<(), SeccompError> {
        let prog = SockFprog {
            // compile() guarantees at most BPF_MAXINSNS (4096) instructions.
            len: self.program.len() as libc::c_ushort,
            filter: self.program.as_ptr(),
        };
        // SAFETY: `prog` points to `len` valid instructions that outlive the call; the kernel
        // copies the program and does not keep the pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const SockFprog,
            )
        };
        match rc {
            0 => Ok(()),
            rc if rc < 0 => Err(SeccompError::Install(io::Error::last_os_error())),
            tid => Err(SeccompError::ThreadSync(tid)),
        }
    }
}
