//! Code that runs in the forked processes: the intermediate (namespaces) and the container
//! process (rootfs, console, credentials, capabilities, seccomp, exec).
//!
//! Nothing here logs or panics on purpose (a fork of a multi-threaded caller must not take
//! locks other threads may have held at the fork, such as the logger's): the only way out
//! is `_exit`, with the reason sent to the caller over the channel first.

use std::{
    ffi::CString,
    os::{fd::RawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{fcntl, openat, FcntlArg, FdFlag, OFlag},
    sched::CloneFlags,
    sys::stat::{umask, Mode},
    unistd::{chdir, execve, getpid, setgroups, setresgid, setresuid, setsid, Gid, Uid},
};
use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Process, Spec};

use super::{
    channel::{Channel, Msg},
    fork, tty,
};
use crate::{
    capabilities, cgroups::Cgroup, hooks, namespaces, rootfs, seccomp::CompiledFilter,
    state::EXEC_FIFO,
};

/// Default `PATH` when the process environment has none (runc's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What kind of container process is being made.
pub(crate) enum Role<'a> {
    /// The container's init.
    Init(InitRole<'a>),
    /// A process exec'd into a running container.
    Exec,
}

pub(crate) struct InitRole<'a> {
    pub id: &'a str,
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    pub bundle: &'a Path,
    /// `O_PATH` fd of the state directory (holds the exec fifo).
    pub state_dir_fd: RawFd,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
    /// The spec has prestart/createRuntime/createContainer/startContainer hooks: the init
    /// stops before `pivot_root` to let the caller run its hooks and get the state.
    pub has_hooks: bool,
}

/// Everything the forked processes need; lives in the caller's memory and is copied by
/// the fork.
pub(crate) struct ChildConfig<'a> {
    pub role: Role<'a>,
    pub process: &'a Process,
    pub plan: &'a namespaces::Plan,
    pub cgroup: Option<&'a Cgroup>,
    pub stdio: [Option<RawFd>; 3],
    pub console_socket: Option<RawFd>,
    /// Send the pty master back over the channel.
    pub return_master: bool,
    pub preserve_fds: u32,
    pub seccomp: Option<&'a CompiledFilter>,
    pub channel: &'a Channel,
}

impl ChildConfig<'_> {
    fn keep_fds(&self) -> Vec<RawFd> {
        let mut keep: Vec<RawFd> = (3..3 + self.preserve_fds as RawFd).collect();
        keep.push(self.channel.raw_fd());
        keep.extend(self.stdio.iter().flatten());
        keep.extend(self.console_socket);
        if let Role::Init(init) = &self.role {
            keep.push(init.state_dir_fd);
        }
        keep
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the process without running atexit handlers or destructors,
    // which belong to the caller's copy of the program.
    unsafe { libc::_exit(code) }
}

/// Forks the intermediate process, which runs `cfg` and never returns; the caller gets its
/// pid.
pub(crate) fn spawn_intermediate(cfg: &ChildConfig) -> crate::error::Result<nix::unistd::Pid> {
    use crate::error::Context;
    // SAFETY: the child only runs `run_intermediate`, which never returns and only uses
    // memory copied by the fork; it takes no lock another thread of the caller may have held
    // at the fork (see the module docs), which is what a fork of a multi-threaded process
    // requires.
    match unsafe { nix::unistd::fork() }.context(|| "fork".into())? {
        nix::unistd::ForkResult::Child => run_intermediate(cfg),
        nix::unistd::ForkResult::Parent { child } => Ok(child),
    }
}

/// Entry point of the intermediate process (after `fork` in the caller).
fn run_intermediate(cfg: &ChildConfig) -> ! {
    match intermediate(cfg) {
        Ok(()) => exit(0),
        Err(msg) => {
            let _ = cfg.channel.send(&Msg::Error(msg));
            exit(1)
        }
    }
}

fn intermediate(cfg: &ChildConfig) -> Result<(), String> {
    fork::close_fds_except(&cfg.keep_fds());
    // An exec'd process joins the container's cgroup here, before it exists. The init is
    // moved by the caller while it sets up its rootfs (see `CgroupGate`).
    if let (Some(cgroup), Role::Exec) = (cfg.cgroup, &cfg.role) {
        join_cgroup(cgroup)?;
    }
    // Open every namespace file before entering any (paths may resolve differently after).
    let to_join = cfg.plan.open()?;
    if cfg.plan.new_user {
        namespaces::create(CloneFlags::CLONE_NEWUSER)?;
        cfg.channel.send(&Msg::NeedIdMaps)?;
        expect_ack(cfg.channel)?;
        // Become the namespace's root so that files we create are owned by a mapped id.
        setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .map_err(|e| format!("setresgid(0) in the user namespace: {}", e.desc()))?;
        setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .map_err(|e| format!("setresuid(0) in the user namespace: {}", e.desc()))?;
    }
    for (typ, fd) in &to_join {
        namespaces::join(*typ, fd)?;
    }
    drop(to_join);
    // The init's cgroup namespace is created after it joined its cgroup (the namespace is
    // rooted where its creator is).
    let mut unshare = cfg.plan.unshare;
    if matches!(cfg.role, Role::Init(_)) {
        unshare.remove(CloneFlags::CLONE_NEWCGROUP);
    }
    namespaces::create(unshare)?;
    if let Role::Init(init) = &cfg.role {
        write_time_offsets(init.spec, cfg.plan)?;
    }
    match fork::clone_parent()? {
        Some(pid) => cfg.channel.send(&Msg::Pid(pid)),
        None => run_container_process(cfg),
    }
}

/// `Cgroup::add_process` for ourselves, without its logging: after a fork of a
/// multi-threaded caller, the logger's lock may be held by a thread that does not exist
/// here, and taking it would hang forever.
fn join_cgroup(cgroup: &Cgroup) -> Result<(), String> {
    let pid = getpid().as_raw().to_string();
    for dir in cgroup.dirs() {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, &pid)
            .map_err(|e| format!("joining cgroup: writing {}: {e}", procs.display()))?;
    }
    Ok(())
}

fn expect_ack(channel: &Channel) -> Result<(), String> {
    match channel.recv()? {
        Some((Msg::Ack, _)) => Ok(()),
        Some((other, _)) => Err(format!("unexpected message {other:?}")),
        None => Err("the runtime went away".into()),
    }
}

/// `linux.timeOffsets` must be written before the first process enters the new time
/// namespace, i.e. before the clone.
fn write_time_offsets(spec: &Spec, plan: &namespaces::Plan) -> Result<(), String> {
    let Some(offsets) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.time_offsets().as_ref())
    else {
        return Ok(());
    };
    if !plan
        .unshare
        .contains(namespaces::clone_flag(LinuxNamespaceType::Time))
    {
        return Ok(());
    }
    let mut text = String::new();
    for (clock, off) in offsets {
        text.push_str(&format!(
            "{clock} {} {}\n",
            off.secs().unwrap_or(0),
            off.nanosecs().unwrap_or(0)
        ));
    }
    std::fs::write("/proc/self/timens_offsets", text).map_err(|e| format!("linux.timeOffsets: {e}"))
}

/// Entry point of the container process (after `clone_parent` in the intermediate).
fn run_container_process(cfg: &ChildConfig) -> ! {
    let Err(msg) = container_process(cfg);
    if cfg.channel.send(&Msg::Error(msg.clone())).is_err() {
        // Nobody listens any more (after `Ready`): the container's stderr is the only
        // place left for the reason.
        let line = format!("palisade: {msg}\n");
        // SAFETY: writes a valid buffer to fd 2.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }
    exit(127)
}

fn sys(what: &str) -> impl FnOnce(Errno) -> String + '_ {
    move |e| format!("{what}: {}", e.desc())
}

/// The init's wait for its cgroup. Moving a process between v1 cgroups costs the kernel
/// an RCU grace period (milliseconds), so the caller does it while the init mounts its
/// rootfs; the init only waits where it needs the result: before mounting
/// `/sys/fs/cgroup`, and in any case before running hooks or the user's program.
struct CgroupGate<'a> {
    channel: &'a Channel,
    new_cgroup_ns: bool,
    /// `/proc/self/cgroup` as read after the join, before the cgroup namespace exists.
    membership: std::cell::OnceCell<String>,
}

impl CgroupGate<'_> {
    fn wait(&self) -> Result<String, String> {
        if let Some(m) = self.membership.get() {
            return Ok(m.clone());
        }
        match self.channel.recv()? {
            Some((Msg::CgroupJoined, _)) => {}
            Some((other, _)) => return Err(format!("unexpected message {other:?}")),
            None => return Err("the runtime went away".into()),
        }
        // Still the host's /proc (before pivot_root), where our host pid is known.
        let membership = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        if self.new_cgroup_ns {
            namespaces::create(CloneFlags::CLONE_NEWCGROUP)?;
        }
        let _ = self.membership.set(membership.clone());
        Ok(membership)
    }
}

fn container_process(cfg: &ChildConfig) -> Result<std::convert::Infallible, String> {
    let process = cfg.process;
    // Move the stdio fds out of the way of 0-2 and the preserved fds first, so that the
    // dup2s below cannot overwrite each other.
    let lowest = 3 + cfg.preserve_fds as RawFd;
    let mut stdio = [None; 3];
    for (i, fd) in cfg.stdio.iter().enumerate() {
        if let Some(fd) = fd {
            stdio[i] = Some(
                fcntl(fd_ref(*fd), FcntlArg::F_DUPFD_CLOEXEC(lowest))
                    .map_err(sys("duplicating stdio"))?,
            );
        }
    }
    let terminal = process.terminal().unwrap_or(false);
    if matches!(cfg.role, Role::Init(_)) || terminal {
        setsid().map_err(sys("setsid"))?;
    }
    let mut state_json = String::new();
    if let Role::Init(init) = &cfg.role {
        if !init.no_new_keyring {
            join_session_keyring(init.id)?;
        }
        let gate = CgroupGate {
            channel: cfg.channel,
            new_cgroup_ns: cfg.plan.unshare.contains(CloneFlags::CLONE_NEWCGROUP),
            membership: std::cell::OnceCell::new(),
        };
        let wait_for_cgroup = || gate.wait();
        let rootfs_cfg = rootfs::RootfsConfig {
            spec: init.spec,
            rootfs: init.rootfs,
            bundle: init.bundle,
            in_user_ns: cfg.plan.new_user
                || cfg
                    .plan
                    .join
                    .iter()
                    .any(|(t, _)| *t == LinuxNamespaceType::User),
            cgroup_membership: &wait_for_cgroup,
        };
        umask(Mode::empty());
        rootfs::prepare(&rootfs_cfg)?;
        gate.wait()?;
        if init.has_hooks {
            cfg.channel.send(&Msg::RunHooks)?;
            state_json = match cfg.channel.recv()? {
                Some((Msg::HooksDone(state), _)) => state,
                Some((other, _)) => return Err(format!("unexpected message {other:?}")),
                None => return Err("the runtime went away".into()),
            };
            let create_container = init
                .spec
                .hooks()
                .as_ref()
                .and_then(|h| h.create_container().clone())
                .unwrap_or_default();
            hooks::run("createContainer", &create_container, &state_json)
                .map_err(|e| e.to_string())?;
        }
        rootfs::switch_root(init.rootfs, init.no_pivot)?;
        rootfs::finish(init.spec)?;
        rootfs::set_names(init.spec)?;
        if let Some(adj) = process.oom_score_adj() {
            std::fs::write("/proc/self/oom_score_adj", adj.to_string())
                .map_err(|e| format!("process.oomScoreAdj {adj}: {e}"))?;
        }
    }
    if terminal {
        let mount_console = matches!(cfg.role, Role::Init(_));
        tty::setup(
            cfg.console_socket,
            cfg.return_master.then_some(cfg.channel),
            mount_console,
            process.console_size().as_ref(),
        )?;
    } else if cfg.console_socket.is_some() || cfg.return_master {
        return Err("a terminal was requested but process.terminal is false".into());
    }
    if !terminal {
        for (i, fd) in stdio.iter().enumerate() {
            if let Some(fd) = fd {
                fork::dup2(*fd, i as RawFd).map_err(sys("dup2 stdio"))?;
            }
        }
    }
    set_rlimits(process)?;
    let no_new_privs = process.no_new_privileges().unwrap_or(false);
    if no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(sys("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    }
    // Without no_new_privs a seccomp filter can only be installed with CAP_SYS_ADMIN,
    // which the credentials below may drop: install it now (what runc does).
    if let (false, Some(filter)) = (no_new_privs, cfg.seccomp) {
        filter
            .install()
            .map_err(|e| format!("installing seccomp filter: {e}"))?;
    }
    set_credentials(process)?;
    let mask = process.user().umask().unwrap_or(0o022);
    umask(Mode::from_bits_truncate(mask));
    chdir(process.cwd().as_path())
        .map_err(|e| format!("chdir to cwd {:?}: {}", process.cwd(), e.desc()))?;

    let args = process.args().clone().unwrap_or_default();
    let env = process.env().clone().unwrap_or_default();
    let arg0 = args.first().cloned().unwrap_or_default();
    let path = find_executable(&arg0, &env)?;
    let c_args = cstrings(&args)?;
    let c_env = cstrings(&env)?;

    if let Role::Init(init) = &cfg.role {
        cfg.channel.send(&Msg::Ready)?;
        // Only block on the fifo once the caller has recorded us in state.json: if it dies
        // before that, nothing could ever find (and delete) this process, so give up.
        expect_ack(cfg.channel)?;
        wait_for_start(init.state_dir_fd)?;
        let start_container = init
            .spec
            .hooks()
            .as_ref()
            .and_then(|h| h.start_container().clone())
            .unwrap_or_default();
        hooks::run("startContainer", &start_container, &state_json).map_err(|e| e.to_string())?;
    }
    if let (true, Some(filter)) = (no_new_privs, cfg.seccomp) {
        filter
            .install()
            .map_err(|e| format!("installing seccomp filter: {e}"))?;
    }
    for fd in 3..lowest {
        let _ = fcntl(fd_ref(fd), FcntlArg::F_SETFD(FdFlag::empty()));
    }
    fork::cloexec_from(lowest as u32);
    fork::reset_signals();
    let err = execve(&path, &c_args, &c_env).unwrap_err();
    Err(format!("exec {arg0:?}: {}", err.desc()))
}

fn fd_ref(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the fds passed here stay open for the life of this (short-lived, exec-bound)
    // process.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

fn cstrings(list: &[String]) -> Result<Vec<CString>, String> {
    list.iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains a NUL byte")))
        .collect()
}

/// Resolves `arg0` like `execvp` would, but with the container's `PATH`, so that a missing
/// program is reported at create (`exec "/bin/nope": No such file or directory`) rather
/// than after start.
fn find_executable(arg0: &str, env: &[String]) -> Result<CString, String> {
    let executable = |p: &Path| -> Result<(), Errno> {
        let meta = std::fs::metadata(p)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOENT)))?;
        if meta.is_dir() {
            return Err(Errno::EACCES);
        }
        nix::unistd::access(p, nix::unistd::AccessFlags::X_OK)
    };
    if arg0.contains('/') {
        executable(Path::new(arg0)).map_err(|e| format!("exec {arg0:?}: {}", e.desc()))?;
        return CString::new(arg0).map_err(|_| format!("{arg0:?} contains a NUL byte"));
    }
    let path_var = env
        .iter()
        .rev()
        .find_map(|v| v.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = PathBuf::from(dir).join(arg0);
        if executable(&candidate).is_ok() {
            return CString::new(candidate.as_os_str().as_bytes())
                .map_err(|_| format!("{arg0:?} contains a NUL byte"));
        }
    }
    Err(format!("exec {arg0:?}: executable file not found in $PATH"))
}

/// Blocks on the exec fifo until `start` opens it for reading, then tells it we are going.
fn wait_for_start(state_dir_fd: RawFd) -> Result<(), String> {
    let fd = loop {
        match openat(
            fd_ref(state_dir_fd),
            EXEC_FIFO,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(sys("opening exec fifo"))?,
        }
    };
    nix::unistd::write(&fd, b"0").map_err(sys("writing exec fifo"))?;
    // SAFETY: state_dir_fd is ours and not used after this point.
    unsafe { libc::close(state_dir_fd) };
    Ok(())
}

/// Gives the container its own session keyring, so that it cannot see or use the
/// host's (runc does the same unless `--no-new-keyring`).
fn join_session_keyring(id: &str) -> Result<(), String> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    let name = CString::new(format!("_ses.{id}")).map_err(|_| "container id contains NUL")?;
    // SAFETY: keyctl(JOIN_SESSION_KEYRING) reads the NUL-terminated name only.
    let rc = unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, name.as_ptr()) };
    if rc < 0 {
        let e = Errno::last();
        // Kernels without keyrings, or seccomp-restricted hosts: nothing to isolate.
        if e != Errno::ENOSYS && e != Errno::EPERM && e != Errno::EACCES {
            return Err(format!("joining a session keyring: {}", e.desc()));
        }
    }
    Ok(())
}

fn rlimit_resource(typ: PosixRlimitType) -> libc::__rlimit_resource_t {
    match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

fn set_rlimits(process: &Process) -> Result<(), String> {
    for rl in process.rlimits().iter().flatten() {
        let limit = libc::rlimit {
            rlim_cur: rl.soft(),
            rlim_max: rl.hard(),
        };
        // SAFETY: `limit` is a valid rlimit for the duration of the call.
        if unsafe { libc::setrlimit(rlimit_resource(rl.typ()), &limit) } != 0 {
            return Err(format!(
                "process.rlimits {}: {}",
                serde_json::to_string(&rl.typ()).unwrap_or_default(),
                Errno::last().desc()
            ));
        }
    }
    Ok(())
}

/// Bounding set, user and groups, then the other capability sets.
fn set_credentials(process: &Process) -> Result<(), String> {
    let caps = process.capabilities().as_ref();
    if let Some(caps) = caps {
        capabilities::drop_bounding(caps)?;
    }
    let user = process.user();
    // Keep the permitted set across the uid change; the capability sets are set exactly
    // afterwards.
    nix::sys::prctl::set_keepcaps(true).map_err(sys("prctl(PR_SET_KEEPCAPS)"))?;
    let gids: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    match setgroups(&gids) {
        // In a user namespace whose setgroups is denied, only an empty list is possible.
        Err(Errno::EPERM) if gids.is_empty() => {}
        other => other.map_err(sys("setgroups (process.user.additionalGids)"))?,
    }
    let gid = Gid::from_raw(user.gid());
    setresgid(gid, gid, gid).map_err(|e| format!("setgid {}: {}", user.gid(), e.desc()))?;
    let uid = Uid::from_raw(user.uid());
    setresuid(uid, uid, uid).map_err(|e| format!("setuid {}: {}", user.uid(), e.desc()))?;
    nix::sys::prctl::set_keepcaps(false).map_err(sys("prctl(PR_SET_KEEPCAPS)"))?;
    if let Some(caps) = caps {
        capabilities::apply(caps)?;
    }
    Ok(())
}
