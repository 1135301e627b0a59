//! Creating container processes: the forked intermediate that enters namespaces, the
//! `CLONE_PARENT` fork that makes the container process a child of the caller, and the
//! setup the container process does on itself before `execve`.
//!
//! ```text
//!  caller (maybe multi-threaded)          intermediate (fork)            container process
//!  ─────────────────────────────          ───────────────────            ─────────────────
//!  fork ───────────────────────────────▶  close stray fds
//!                                         [exec: join cgroup]
//!                                         [unshare user ns] ─NeedIdMaps▶
//!  write uid/gid maps ─────────Ack──────▶ setns / unshare
//!                                         clone(CLONE_PARENT) ─────────▶ (child of caller)
//!  ◀───────────────────────────Pid(n)──── exit(0)                        mounts ...
//!  waitpid(intermediate)
//!  [init: move n into its cgroup] ────────────────────CgroupJoined────▶ unshare cgroup ns,
//!                                                                        /sys/fs/cgroup, /dev
//!  prestart/createRuntime hooks ◀──────────────────────────RunHooks───── (if any hooks)
//!  ───────────────────────────HooksDone(state)────────────────────────▶ createContainer hooks
//!                                                                        pivot_root, caps, user
//!  ◀─────────────────────────────────────────────────────────Ready────
//!  write state.json ─────────────────────────────────────────Ack──────▶ open exec.fifo (blocks)
//! ```
//! Messages travel over a `SOCK_SEQPACKET` socket pair ([`channel`]); a container
//! process's failure arrives as `Error(text)` and becomes [`Error::Child`](crate::Error::Child).

pub mod channel;
pub(crate) mod child;
pub(crate) mod fork;
pub(crate) mod tty;

use std::{os::fd::OwnedFd, path::PathBuf};

use oci_spec::runtime::Process;

/// The standard streams of a container process. `None` means the stream is inherited from
/// the calling process.
#[derive(Debug, Default)]
pub struct Stdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// How a process that asks for a terminal (`process.terminal: true`) gets it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Terminal {
    /// No terminal is set up (an error if the process asks for one).
    #[default]
    None,
    /// The pty master is sent with `SCM_RIGHTS` to the Unix socket at this path (runc's
    /// `--console-socket`, what containerd's shim and `ctr run -t` use).
    ConsoleSocket(PathBuf),
    /// The pty master is returned to the caller
    /// ([`Container::take_pty_master`](crate::Container::take_pty_master),
    /// [`ExecHandle::pty_master`]).
    ReturnMaster,
}

/// Options of [`Runtime::create`](crate::Runtime::create).
#[derive(Debug, Default)]
pub struct CreateOptions {
    pub stdio: Stdio,
    pub terminal: Terminal,
    /// Where to write the init's pid (atomically), like `runc create --pid-file`.
    pub pid_file: Option<PathBuf>,
    /// Use `MS_MOVE` + `chroot` instead of `pivot_root` (for a rootfs on a ramfs).
    pub no_pivot: bool,
    /// Do not give the container a new session keyring.
    pub no_new_keyring: bool,
    /// Pass the caller's file descriptors 3 .. 3+N to the container process.
    pub preserve_fds: u32,
}

/// Options of [`Container::exec`](crate::Container::exec).
#[derive(Debug)]
pub struct ExecOptions {
    /// The process to run (args, env, cwd, user, capabilities, rlimits, ...).
    pub process: Process,
    pub stdio: Stdio,
    pub terminal: Terminal,
    pub pid_file: Option<PathBuf>,
    pub preserve_fds: u32,
}

impl ExecOptions {
    pub fn new(process: Process) -> Self {
        Self {
            process,
            stdio: Stdio::default(),
            terminal: Terminal::None,
            pid_file: None,
            preserve_fds: 0,
        }
    }
}

/// A process started by [`Container::exec`](crate::Container::exec). It is a child of the
/// caller, which must `waitpid` it.
#[derive(Debug)]
pub struct ExecHandle {
    pub pid: i32,
    /// The pty master with [`Terminal::ReturnMaster`].
    pub pty_master: Option<OwnedFd>,
}
