//! Compiled seccomp profiles installed for real in forked children. No root needed (the
//! child sets no_new_privs), but CI runs it as root like everything else.

use oci_spec::runtime::LinuxSeccomp;
use palisade_runtime::seccomp::{compile, CompiledFilter};
use serde_json::json;

/// Forks; the child sets no_new_privs, installs `filter` (allocation-free, safe after fork in
/// the multi-threaded test harness), runs `body` and `_exit`s with its result. Returns the
/// child's wait status.
fn run_filtered(filter: &CompiledFilter, body: fn() -> i32) -> i32 {
    // SAFETY: the child only makes raw syscalls (prctl, seccomp, body's, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: prctl with integer arguments; _exit never returns.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                libc::_exit(200);
            }
            if filter.install().is_err() {
                libc::_exit(201);
            }
            libc::_exit(body());
        }
    }
    let mut status = 0;
    // SAFETY: `status` is a writable int; `pid` is our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

/// `errno` of the last failed call.
fn errno() -> i32 {
    // SAFETY: reading this thread's errno.
    unsafe { *libc::__errno_location() }
}

fn getcwd_errno() -> i32 {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length.
    let rc = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
    if rc >= 0 {
        0
    } else {
        errno()
    }
}

fn uname_errno() -> i32 {
    // SAFETY: utsname is plain data; the kernel fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a writable utsname.
    if unsafe { libc::uname(&mut u) } == 0 {
        0
    } else {
        errno()
    }
}

fn getppid_then_exit() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::syscall(libc::SYS_getppid) };
    0
}

/// execs `/bin/busybox mkdir /tmp/palisade-seccomp-test-mkdir` (busybox-static, which the CI
/// installs); returns only if exec failed.
fn exec_busybox_mkdir() -> i32 {
    let argv = [
        c"mkdir".as_ptr(),
        c"/tmp/palisade-seccomp-test-mkdir".as_ptr(),
        std::ptr::null(),
    ];
    // SAFETY: NUL-terminated literals and a NULL-terminated argv.
    unsafe { libc::execv(c"/bin/busybox".as_ptr(), argv.as_ptr()) };
    127
}

fn profile(v: serde_json::Value) -> LinuxSeccomp {
    serde_json::from_value(v).unwrap()
}

#[test]
fn errno_actions_return_the_profiles_errno() {
    let filter = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"names": ["uname"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["no_such_call"], "action": "SCMP_ACT_ERRNO"}
        ]
    })))
    .unwrap();
    let s = run_filtered(&filter, getcwd_errno);
    assert!(libc::WIFEXITED(s), "status {s:#x}");
    assert_eq!(libc::WEXITSTATUS(s), libc::ENOSYS);
    let s = run_filtered(&filter, uname_errno);
    assert!(libc::WIFEXITED(s), "status {s:#x}");
    assert_eq!(libc::WEXITSTATUS(s), libc::EPERM);
}

#[test]
fn default_errno_with_an_allowlist() {
    // Default deny with ENOSYS, allow what exiting needs plus uname only when its argument
    // is non-NULL (an argument condition) — getcwd falls to the default.
    let filter = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "syscalls": [
            {"names": ["exit", "exit_group", "prctl", "seccomp"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["uname"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_NE"}]}
        ]
    })))
    .unwrap();
    let s = run_filtered(&filter, getcwd_errno);
    assert_eq!(libc::WEXITSTATUS(s), libc::ENOSYS);
    let s = run_filtered(&filter, uname_errno);
    assert!(libc::WIFEXITED(s), "status {s:#x}");
    assert_eq!(libc::WEXITSTATUS(s), 0, "uname(non-NULL) is allowed");
}

#[test]
fn kill_process_kills_with_sigsys() {
    let filter = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC"],
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}]
    })))
    .unwrap();
    let s = run_filtered(&filter, getppid_then_exit);
    assert!(libc::WIFSIGNALED(s), "status {s:#x}");
    assert_eq!(libc::WTERMSIG(s), libc::SIGSYS);
}

#[test]
fn trap_delivers_sigsys() {
    let filter = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_TRAP"}]
    })))
    .unwrap();
    // SIGSYS's default disposition terminates the process.
    let s = run_filtered(&filter, getppid_then_exit);
    assert!(libc::WIFSIGNALED(s), "status {s:#x}");
    assert_eq!(libc::WTERMSIG(s), libc::SIGSYS);
}

#[test]
fn filter_survives_execve_of_a_real_program() {
    let dir = std::path::Path::new("/tmp/palisade-seccomp-test-mkdir");
    let _ = std::fs::remove_dir(dir);
    // What static busybox needs to start and exit, default EPERM; mkdir is not allowed.
    let startup = [
        "execve",
        "brk",
        "arch_prctl",
        "set_tid_address",
        "set_robust_list",
        "rseq",
        "prlimit64",
        "getrandom",
        "mprotect",
        "mmap",
        "munmap",
        "readlink",
        "getuid",
        "prctl",
        "write",
        "writev",
        "exit",
        "exit_group",
        "rt_sigprocmask",
        "rt_sigaction",
    ];
    let denying = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": startup, "action": "SCMP_ACT_ALLOW"}]
    })))
    .unwrap();
    let s = run_filtered(&denying, exec_busybox_mkdir);
    assert!(libc::WIFEXITED(s), "status {s:#x}");
    assert_eq!(
        libc::WEXITSTATUS(s),
        1,
        "busybox mkdir must fail with EPERM"
    );
    assert!(!dir.exists());

    let mut with_mkdir: Vec<&str> = startup.to_vec();
    with_mkdir.extend(["mkdir", "mkdirat"]);
    let allowing = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": with_mkdir, "action": "SCMP_ACT_ALLOW"}]
    })))
    .unwrap();
    let s = run_filtered(&allowing, exec_busybox_mkdir);
    assert!(libc::WIFEXITED(s), "status {s:#x}");
    assert_eq!(libc::WEXITSTATUS(s), 0);
    assert!(dir.is_dir());
    std::fs::remove_dir(dir).unwrap();
}
