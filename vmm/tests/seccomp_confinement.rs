//! VMM confinement (issue 8): the seccomp filters the VMM installs on its threads stop a
//! thread at its first syscall outside the thread kind's allow-list.
//!
//! Each case re-executes this binary as `child <kind> <syscall>`. The child does what
//! `Vmm::run` does — `seccomp::Filters::compile()` (the real filters plus the SIGSYS
//! reporter), then `seccomp::apply(&filters.get(kind))` on a fresh thread — writes a
//! marker (an allowed syscall), then makes the forbidden syscall with arguments that would
//! only fail with EFAULT/EBADF if it were allowed, and writes a second marker. The parent
//! asserts the child died at the forbidden call: exit status 1 from the VMM's SIGSYS
//! reporter, its message naming the syscall number, the first marker present and the
//! second absent. A control case (no forbidden call) must survive, so the test cannot
//! pass by the filter killing everything. No root or KVM needed.

use std::process::Command;

use palisade_vmm::seccomp::{self, Filters, ThreadKind};

const APPLIED: &str = "filter-applied";
const SURVIVED: &str = "survived-forbidden-syscall";

fn kind_by_name(name: &str) -> Option<ThreadKind> {
    Some(match name {
        "main" => ThreadKind::Main,
        "vcpu" => ThreadKind::Vcpu,
        "event-loop" => ThreadKind::EventLoop,
        "api" => ThreadKind::Api,
        _ => return None,
    })
}

/// Syscall number and a harmless invocation (bad pointers/fds) of each forbidden call.
fn forbidden(name: &str) -> Option<(i64, fn() -> i64)> {
    // SAFETY (all): raw syscalls whose pointer arguments are null and fd arguments invalid,
    // so an allowed call fails with EFAULT/EBADF without side effects.
    Some(match name {
        "execve" => (libc::SYS_execve, || unsafe {
            libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize)
        }),
        "openat" => (libc::SYS_openat, || unsafe {
            libc::syscall(libc::SYS_openat, libc::AT_FDCWD, 0usize, 0, 0)
        }),
        "mount" => (libc::SYS_mount, || unsafe {
            libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize)
        }),
        "ptrace" => (libc::SYS_ptrace, || unsafe {
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKDATA, 0, 0usize, 0usize)
        }),
        "socket" => (libc::SYS_socket, || unsafe {
            libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0)
        }),
        // The vCPU filter admits ioctl only with request KVM_RUN.
        "ioctl-tcgets" => (libc::SYS_ioctl, || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, libc::TCGETS, 0usize)
        }),
        _ => return None,
    })
}

fn say(text: &str) {
    let line = format!("{text}\n");
    // SAFETY: write(2) of a valid buffer to stdout (allowed for every thread kind).
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

fn child(kind: &str, call: &str) -> i32 {
    let Some(kind) = kind_by_name(kind) else {
        eprintln!("unknown thread kind {kind}");
        return 90;
    };
    let filters = match Filters::compile() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("compiling the filters: {e}");
            return 91;
        }
    };
    let filter = filters.get(kind);
    let call = call.to_string();
    let thread = std::thread::spawn(move || {
        if let Err(e) = seccomp::apply(&filter) {
            eprintln!("applying the filter: {e}");
            return 92;
        }
        say(APPLIED);
        if let Some((_, invoke)) = forbidden(&call) {
            invoke();
        }
        say(SURVIVED);
        0
    });
    thread.join().unwrap_or(93)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let code = child(&args[2], &args[3]);
        std::process::exit(code);
    }

    let exe = std::env::current_exe().expect("test binary path");
    let run = |kind: &str, call: &str| {
        Command::new(&exe)
            .args(["child", kind, call])
            .output()
            .expect("re-executing the test binary")
    };

    // Control: the filter alone does not kill a thread that stays inside its list.
    for kind in ["main", "vcpu", "event-loop", "api"] {
        let out = run(kind, "none");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(SURVIVED),
            "{kind}: control case died ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut cases = 0;
    for (kind, calls) in [
        (
            "main",
            &["execve", "openat", "mount", "ptrace", "socket"][..],
        ),
        (
            "vcpu",
            &[
                "execve",
                "openat",
                "mount",
                "ptrace",
                "socket",
                "ioctl-tcgets",
            ][..],
        ),
        ("event-loop", &["execve", "openat", "mount", "ptrace"][..]),
        (
            "api",
            &["execve", "openat", "mount", "ptrace", "socket"][..],
        ),
    ] {
        for call in calls {
            let (nr, _) = forbidden(call).expect("known syscall");
            let out = run(kind, call);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let report = format!("palisade-vmm: seccomp: blocked syscall {nr}");
            assert_eq!(
                out.status.code(),
                Some(1),
                "{kind}/{call}: expected the SIGSYS reporter's exit 1, got {}: {stdout} {stderr}",
                out.status
            );
            assert!(stderr.contains(&report), "{kind}/{call}: stderr {stderr:?}");
            assert!(
                stdout.contains(APPLIED),
                "{kind}/{call}: filter never applied"
            );
            assert!(
                !stdout.contains(SURVIVED),
                "{kind}/{call}: the thread ran on after the forbidden syscall"
            );
            println!("{kind}: {call} (syscall {nr}) killed");
            cases += 1;
        }
    }
    println!("PALISADE-REL vmm-seccomp faults={cases}");
}
