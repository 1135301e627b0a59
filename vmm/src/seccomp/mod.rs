//! Per-thread seccomp allow-lists (compiled with `seccompiler`).
//!
//! Each VMM thread kind gets the smallest syscall set it needs once the VM runs; the
//! filter is installed by the thread itself before it touches guest-controlled state
//! (vCPU threads before their first `KVM_RUN`). A forbidden syscall raises SIGSYS; the
//! handler reports the syscall number on stderr and exits with status 1, so a missing
//! entry is diagnosable instead of a silent kill.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule or filter is invalid (a bug in the lists below).
    #[error("cannot build the {kind:?} seccomp filter: {reason}")]
    Build {
        /// Thread kind.
        kind: ThreadKind,
        /// seccompiler's message.
        reason: String,
    },
    /// `seccomp(2)` refused the filter.
    #[error("cannot install the seccomp filter: {0}")]
    Apply(String),
    /// The SIGSYS reporter could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(String),
}

/// The kinds of VMM threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits for the end, stops threads, cleans up.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The device event loop.
    EventLoop,
    /// The control-socket thread.
    Api,
}

/// Syscalls any Rust thread needs: memory allocation, locking, signals, exit, logging.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    // Debug builds of std check fds with F_GETFD when closing them.
    libc::SYS_fcntl,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Unconditionally allowed syscalls per thread kind, on top of [`COMMON`].
fn allowed(kind: ThreadKind) -> &'static [i64] {
    match kind {
        // Joining threads, unmapping guest memory, removing the API socket.
        ThreadKind::Main => &[libc::SYS_unlink, libc::SYS_unlinkat],
        // Port/MMIO exits only touch device state; serial output and irqfds are writes.
        ThreadKind::Vcpu => &[],
        ThreadKind::EventLoop => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_preadv2,
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            // Hybrid vsock: host peers connect to our listener; guest-initiated
            // connections are made to "<uds>_<port>".
            libc::SYS_accept,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            // The vsock device removes its socket file if it is dropped here.
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
        ThreadKind::Api => &[
            libc::SYS_accept4,
            libc::SYS_accept,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
        ],
    }
}

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(allowed(kind))
        .map(|&nr| (nr, Vec::new()))
        .collect();
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(
                libc::SYS_ioctl,
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    KVM_RUN,
                )?])?],
            );
        }
        ThreadKind::EventLoop => {
            // virtio-net sets the tap's offloads to what the guest acknowledged, once per
            // driver activation; every other tap ioctl happens before the filters.
            rules.insert(
                libc::SYS_ioctl,
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::TUNSETOFFLOAD,
                )?])?],
            );
            // New sockets only for vsock's Unix-domain connections.
            rules.insert(
                libc::SYS_socket,
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::AF_UNIX as u64,
                )?])?],
            );
        }
        ThreadKind::Api => {
            // std's set_nonblocking on accepted connections.
            rules.insert(
                libc::SYS_ioctl,
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::FIONBIO,
                )?])?],
            );
        }
        ThreadKind::Main => {}
    }
    Ok(rules)
}

/// Compile the filter for `kind`.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |reason: String| SeccompError::Build { kind, reason };
    let rules = rules(kind).map_err(|e| build(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| build(e.to_string()))
}

/// All filters, compiled once before any thread starts.
#[derive(Debug)]
pub struct Filters {
    main: BpfProgram,
    vcpu: BpfProgram,
    event_loop: BpfProgram,
    api: BpfProgram,
}

impl Filters {
    /// Compile every filter and install the SIGSYS reporter.
    pub fn compile() -> Result<Self, SeccompError> {
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, report_sigsys)
            .map_err(|e| SeccompError::Handler(e.to_string()))?;
        Ok(Filters {
            main: compile(ThreadKind::Main)?,
            vcpu: compile(ThreadKind::Vcpu)?,
            event_loop: compile(ThreadKind::EventLoop)?,
            api: compile(ThreadKind::Api)?,
        })
    }

    /// The filter for `kind`.
    pub fn get(&self, kind: ThreadKind) -> BpfProgram {
        match kind {
            ThreadKind::Main => self.main.clone(),
            ThreadKind::Vcpu => self.vcpu.clone(),
            ThreadKind::EventLoop => self.event_loop.clone(),
            ThreadKind::Api => self.api.clone(),
        }
    }
}

/// Install `filter` on the calling thread.
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(|e| SeccompError::Apply(e.to_string()))
}

/// Byte offset of `si_syscall` in `siginfo_t` for SIGSYS on x86_64 (after si_signo,
/// si_errno, si_code, padding, and the 8-byte `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe only: format into a stack buffer, write(2), _exit(2).
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; the field at this
        // offset is the (int) syscall number.
        unsafe {
            (info as *const u8)
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        }
    };
    let mut buf = [0u8; 96];
    let prefix = b"palisade-vmm: seccomp: blocked syscall ";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        buf[len] = b'-';
        len += 1;
    }
    for i in (0..d).rev() {
        buf[len] = digits[i];
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_filters_compile() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::Api,
        ] {
            let prog = compile(kind).unwrap();
            assert!(!prog.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn event_loop_filter_allows_only_the_tap_offload_ioctl() {
        // virtio-net's TUNSETOFFLOAD runs on the device thread; any other ioctl (here
        // TUNSETIFF, which could attach to another interface) is refused.
        let prog = compile(ThreadKind::EventLoop).unwrap();
        // SAFETY: fork in a test; the child only makes raw syscalls and exits via _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: resetting a signal disposition in the single-threaded child.
            unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
            if seccompiler::apply_filter(&prog).is_err() {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(5) };
            }
            // SAFETY: ioctls on an invalid fd: the filter decides before the kernel
            // looks at the fd (EBADF when allowed).
            unsafe {
                if libc::ioctl(-1, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) != -1 {
                    libc::_exit(3);
                }
                libc::ioctl(-1, libc::TUNSETIFF, 0 as libc::c_ulong);
                libc::_exit(4);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn vcpu_filter_blocks_open_and_allows_write() {
        // Compile before forking: the child of a multi-threaded process must not allocate.
        let prog = compile(ThreadKind::Vcpu).unwrap();
        // Run in a child process: a filter cannot be removed from a thread.
        // SAFETY: fork in a test; the child only makes raw syscalls and exits via _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // Another test may have installed the SIGSYS reporter in this process.
            // SAFETY: resetting a signal disposition in the single-threaded child.
            unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
            if seccompiler::apply_filter(&prog).is_err() {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(5) };
            }
            // SAFETY: plain syscalls with valid arguments.
            unsafe {
                let ok = libc::write(1, b"".as_ptr().cast(), 0);
                if ok != 0 {
                    libc::_exit(3);
                }
                // openat is not allowed: the default SIGSYS action kills the child.
                libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                libc::_exit(4);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
