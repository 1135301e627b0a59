//! The two forks of process creation and the fd hygiene around them.

use std::os::fd::RawFd;

/// `clone(CLONE_PARENT | SIGCHLD)` without a new stack: like `fork`, but the child's parent
/// is our parent. Called by the single-threaded intermediate so that the container process
/// becomes a child of the library's caller (runc's nsexec does the same).
///
/// Returns `Some(child pid)` in the parent and `None` in the child.
pub fn clone_parent() -> Result<Option<i32>, String> {
    // SAFETY: a raw clone without CLONE_VM and with a null stack behaves like fork(2): the
    // child gets a copy-on-write copy of our memory and continues on its copy of this
    // stack. The caller is single-threaded (the intermediate), so no lock can be held by
    // a thread that does not exist in the child.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match ret {
        -1 => Err(format!(
            "clone(CLONE_PARENT): {}",
            nix::errno::Errno::last().desc()
        )),
        0 => Ok(None),
        pid => Ok(Some(pid as i32)),
    }
}

/// Closes every fd except `keep` (and 0-2). The caller may be multi-threaded: fds another
/// thread opened at the moment of the fork (e.g. the sync socket of a different container)
/// must not be held by our processes, or the peers would never see EOF.
pub fn close_fds_except(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd > 2)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut start = 3u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > start {
            close_range(start, fd - 1, 0);
        }
        start = fd.saturating_add(1);
    }
}

/// Marks every fd from `first` on close-on-exec, right before `execve`.
pub fn cloexec_from(first: u32) {
    close_range(first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
}

fn close_range(first: u32, last: u32, flags: libc::c_uint) {
    // SAFETY: close_range only affects our fd table; the ranges exclude every fd that is
    // still used after this point.
    unsafe {
        libc::syscall(libc::SYS_close_range, first, last, flags);
    }
}

/// `dup2(2)` on raw fds: the container process manages its fd table by number.
pub fn dup2(old: RawFd, new: RawFd) -> nix::Result<()> {
    // SAFETY: dup2 only changes our fd table; `new` is a stdio slot we are filling.
    let rc = unsafe { libc::dup2(old, new) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Restores default signal dispositions and an empty signal mask: both survive `execve`,
/// and the caller's (Rust ignores SIGPIPE, tokio blocks signals in threads) must not leak
/// into the container.
pub fn reset_signals() {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL has no memory-safety preconditions; invalid signal
        // numbers (32, 33 are glibc-reserved) just fail with EINVAL.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let empty = nix::sys::signal::SigSet::empty();
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&empty),
        None,
    );
}
