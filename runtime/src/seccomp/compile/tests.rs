use super::*;
use oci_spec::runtime::LinuxSeccomp;
use serde_json::json;

/// Runs a compiled program on one `struct seccomp_data` (classic BPF subset that seccompiler
/// and this compiler emit) and returns the action value.
fn run(prog: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&(nr as i32).to_ne_bytes());
    data.extend_from_slice(&arch.to_ne_bytes());
    data.extend_from_slice(&0u64.to_ne_bytes());
    for a in args {
        data.extend_from_slice(&a.to_ne_bytes());
    }
    let word = |off: u32| {
        let o = off as usize;
        u32::from_ne_bytes(data[o..o + 4].try_into().unwrap())
    };
    let mut acc = 0u32;
    let mut pc = 0usize;
    loop {
        let i = &prog[pc];
        pc += 1;
        match i.code {
            0x20 => acc = word(i.k),    // LD W ABS
            0x54 => acc &= i.k,         // ALU AND K
            0x05 => pc += i.k as usize, // JA
            0x15 | 0x25 | 0x35 => {
                let taken = match i.code {
                    0x15 => acc == i.k,
                    0x25 => acc > i.k,
                    _ => acc >= i.k,
                };
                pc += if taken { i.jt } else { i.jf } as usize;
            }
            0x06 => return i.k, // RET K
            other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
        }
    }
}

const X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;

fn errno(e: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | e as u32
}

fn profile(v: serde_json::Value) -> LinuxSeccomp {
    serde_json::from_value(v).unwrap()
}

fn nr(name: &str) -> i64 {
    syscalls::number(name).unwrap()
}

/// Syscalls of Docker's default profile that exist on x86_64 (its unconditional allowlist,
/// 32-bit-only and other-arch names left out).
const DOCKER_X86_64_ALLOW: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_requeue",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
    "arch_prctl",
    "modify_ldt",
    "ptrace",
    "personality",
    "socket",
    "clone",
    "clone3",
];

/// A profile shaped like Docker's default: ERRNO(EPERM) default, the allowlist above (plus
/// 32-bit names that must be skipped), `personality` ORed over several argument values,
/// `socket` without AF_VSOCK, `clone` without namespace flags, `clone3` → ENOSYS.
fn docker_like() -> serde_json::Value {
    let mut allow: Vec<&str> = DOCKER_X86_64_ALLOW
        .iter()
        .copied()
        .filter(|n| !["personality", "socket", "clone", "clone3"].contains(n))
        .collect();
    allow.extend([
        "chown32",
        "fstat64",
        "_llseek",
        "mmap2",
        "ugetrlimit",
        "socketcall",
    ]);
    let personality: Vec<_> = [0u64, 8, 131072, 131080, 4294967295]
        .iter()
        .map(|v| {
            json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]})
        })
        .collect();
    let mut syscalls = vec![json!({"names": allow, "action": "SCMP_ACT_ALLOW"})];
    syscalls.extend(personality);
    syscalls.extend([
        json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]}),
        json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 2114060288u64, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}),
    ]);
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

#[test]
#[cfg(target_arch = "x86_64")]
fn docker_default_names_are_all_known_on_x86_64() {
    let unknown: Vec<_> = DOCKER_X86_64_ALLOW
        .iter()
        .filter(|n| syscalls::number(n).is_none())
        .collect();
    assert!(unknown.is_empty(), "missing from the table: {unknown:?}");
}

#[test]
#[cfg(target_arch = "x86_64")]
fn docker_like_profile_compiles_and_decides_like_docker() {
    let f = compile(&profile(docker_like())).unwrap();
    let p = f.instructions();
    assert!(p.len() < BPF_MAX_LEN);
    let call = |name: &str, args: [u64; 6]| run(p, X86_64, nr(name), args);
    assert_eq!(call("read", [0; 6]), ALLOW);
    assert_eq!(call("getcwd", [0; 6]), ALLOW);
    // Not in the allowlist → default ERRNO(EPERM).
    assert_eq!(call("mount", [0; 6]), errno(libc::EPERM));
    assert_eq!(call("kexec_load", [0; 6]), errno(libc::EPERM));
    // ORed argument rules.
    assert_eq!(call("personality", [8, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(call("personality", [0xffff_ffff, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(call("personality", [7, 0, 0, 0, 0, 0]), errno(libc::EPERM));
    // NE and MASKED_EQ.
    assert_eq!(call("socket", [libc::AF_INET as u64, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(call("socket", [40, 0, 0, 0, 0, 0]), errno(libc::EPERM));
    let newns = libc::CLONE_NEWNS as u64;
    assert_eq!(call("clone", [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(
        call("clone", [newns | libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
        errno(libc::EPERM)
    );
    // A second action group.
    assert_eq!(call("clone3", [0; 6]), errno(libc::ENOSYS));
    // Other ABIs are killed: i386, and x32 numbers on the x86_64 ABI.
    assert_eq!(run(p, 3 | 0x4000_0000, 4, [0; 6]), KILL_PROCESS);
    assert_eq!(
        run(p, X86_64, 0x4000_0000 | nr("read"), [0; 6]),
        KILL_PROCESS
    );
    // Newer than anything the profile names → ENOSYS (runc), so libc falls back.
    assert_eq!(run(p, X86_64, 470, [0; 6]), errno(libc::ENOSYS));
    // nr == -1 (a tracer skipping the call) reaches the default action.
    assert_eq!(run(p, X86_64, -1, [0; 6]), errno(libc::EPERM));
}

#[test]
fn actions_errno_ret_and_severity_order() {
    let f = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"names": ["uname"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["getpid"], "action": "SCMP_ACT_KILL"},
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["gettid"], "action": "SCMP_ACT_TRAP"},
            {"names": ["getuid"], "action": "SCMP_ACT_LOG"},
            {"names": ["getgid"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
            {"names": ["getcwd"], "action": "SCMP_ACT_ALLOW"},
            // Overlap: ALLOW when arg0 == 1, KILL_PROCESS unconditionally → KILL wins.
            {"names": ["dup"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
            {"names": ["dup"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["not_a_syscall_anywhere"], "action": "SCMP_ACT_ERRNO"}
        ]
    })))
    .unwrap();
    let p = f.instructions();
    let arch = run(p, 0, 0, [0; 6]); // wrong arch
    assert_eq!(arch, KILL_PROCESS);
    let native = match std::env::consts::ARCH {
        "x86_64" => X86_64,
        _ => 183 | 0x8000_0000 | 0x4000_0000,
    };
    let call = |name: &str, a0: u64| run(p, native, nr(name), [a0, 0, 0, 0, 0, 0]);
    assert_eq!(call("getcwd", 0), errno(libc::ENOSYS));
    assert_eq!(call("uname", 0), errno(libc::EPERM));
    assert_eq!(call("getpid", 0), libc::SECCOMP_RET_KILL_THREAD);
    assert_eq!(call("getppid", 0), KILL_PROCESS);
    assert_eq!(call("gettid", 0), libc::SECCOMP_RET_TRAP);
    assert_eq!(call("getuid", 0), libc::SECCOMP_RET_LOG);
    assert_eq!(call("getgid", 0), libc::SECCOMP_RET_TRACE | 7);
    assert_eq!(call("dup", 1), KILL_PROCESS);
    assert_eq!(call("read", 0), ALLOW);
}

#[test]
fn all_comparison_operators() {
    let rule = |op: &str, v: u64| {
        json!({"names": ["dup"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 1, "value": v, "valueTwo": 4, "op": op}]})
    };
    for (op, value, hits, misses) in [
        ("SCMP_CMP_EQ", 5u64, 5u64, 6u64),
        ("SCMP_CMP_NE", 5, 6, 5),
        ("SCMP_CMP_LT", 5, 4, 5),
        ("SCMP_CMP_LE", 5, 5, 6),
        ("SCMP_CMP_GT", 5, 6, 5),
        ("SCMP_CMP_GE", 5, 5, 4),
        ("SCMP_CMP_MASKED_EQ", 0xf0, 0x4, 0x40),
        ("SCMP_CMP_GT", 1 << 40, (1 << 40) + 1, 1 << 39),
    ] {
        let f = compile(&profile(
            json!({"defaultAction": "SCMP_ACT_KILL_PROCESS", "syscalls": [rule(op, value)]}),
        ))
        .unwrap();
        let native = match std::env::consts::ARCH {
            "x86_64" => X86_64,
            _ => 183 | 0x8000_0000 | 0x4000_0000,
        };
        let at = |a1: u64| run(f.instructions(), native, nr("dup"), [0, a1, 0, 0, 0, 0]);
        assert_eq!(at(hits), ALLOW, "{op} {value} vs {hits}");
        assert_eq!(at(misses), KILL_PROCESS, "{op} {value} vs {misses}");
    }
}

#[test]
fn several_args_are_anded() {
    let f = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["dup3"], "action": "SCMP_ACT_ALLOW", "args": [
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
            {"index": 2, "value": 0, "op": "SCMP_CMP_EQ"}]}]
    })))
    .unwrap();
    let native = match std::env::consts::ARCH {
        "x86_64" => X86_64,
        _ => 183 | 0x8000_0000 | 0x4000_0000,
    };
    let at = |a: [u64; 6]| run(f.instructions(), native, nr("dup3"), a);
    assert_eq!(at([1, 9, 0, 0, 0, 0]), ALLOW);
    assert_eq!(at([1, 9, 1, 0, 0, 0]), errno(libc::EPERM));
    assert_eq!(at([0, 9, 0, 0, 0, 0]), errno(libc::EPERM));
}

#[test]
fn flags_are_kept() {
    let f = compile(&profile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]
    })))
    .unwrap();
    assert_eq!(
        f.flags(),
        libc::SECCOMP_FILTER_FLAG_TSYNC
            | libc::SECCOMP_FILTER_FLAG_LOG
            | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
    );
}

#[test]
fn bad_profiles_name_the_field() {
    let err = |v| compile(&profile(v)).unwrap_err().to_string();
    let e = err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["dup"], "action": "SCMP_ACT_ERRNO"},
        {"names": ["dup"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}));
    assert!(
        e.starts_with("linux.seccomp.syscalls[1].args[0].index"),
        "{e}"
    );

    let e = err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["dup"], "action": "SCMP_ACT_NOTIFY"}]}));
    assert!(
        e.contains("SCMP_ACT_NOTIFY") && e.contains("not supported"),
        "{e}"
    );

    let e = err(json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_PPC64LE"]}));
    assert!(e.starts_with("linux.seccomp.architectures"), "{e}");

    let e = err(json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 5000}));
    assert!(e.starts_with("linux.seccomp.defaultErrnoRet"), "{e}");
}

#[test]
fn unknown_action_and_op_strings_are_reported_with_their_field() {
    let e = check_json(&json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["a"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["b"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["c"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["d"], "action": "SCMP_ACT_FOO"}]}))
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        r#"linux.seccomp.syscalls[3].action: unknown action "SCMP_ACT_FOO""#
    );

    let e = check_json(&json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["d"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]}))
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        r#"linux.seccomp.syscalls[0].args[0].op: unknown operator "SCMP_CMP_ABOUT""#
    );

    let e = check_json(&json!({"defaultAction": "ALLOW"}))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("linux.seccomp.defaultAction: unknown action"),
        "{e}"
    );
    let e =
        check_json(&json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}))
            .unwrap_err()
            .to_string();
    assert!(e.starts_with("linux.seccomp.architectures[0]"), "{e}");
    check_json(&docker_like()).unwrap();
}
