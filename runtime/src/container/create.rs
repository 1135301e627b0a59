//! `create`: from a bundle to an init blocked on the exec fifo, or nothing at all.

use std::{
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::PermissionsExt, net::UnixStream},
    },
    path::Path,
};

use nix::{
    fcntl::{open, OFlag},
    sys::{
        signal::{kill, Signal},
        stat::Mode,
        wait::waitpid,
    },
    unistd::{mkfifo, Pid},
};
use oci_spec::runtime::{Linux, LinuxIdMapping};

use super::{Container, Runtime};
use crate::{
    cgroups::Cgroup,
    error::{Context, Error, Result},
    hooks, namespaces,
    process::{
        channel::{self, Msg},
        child::{self, ChildConfig, InitRole, Role},
        CreateOptions, Terminal,
    },
    seccomp, spec,
    state::{self, Persisted, State, StateDir, Status, OCI_VERSION},
    utils,
};

/// Undoes a partial create when dropped before [`Cleanup::disarm`].
struct Cleanup<'a> {
    dir: &'a StateDir,
    cgroup: Option<&'a Cgroup>,
    intermediate: Option<Pid>,
    init: Option<Pid>,
    armed: bool,
}

impl Cleanup<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Both are our children (the init through CLONE_PARENT): kill and reap them so
        // that no process and no zombie is left.
        for pid in [self.init, self.intermediate].into_iter().flatten() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        if let Some(cgroup) = self.cgroup {
            if let Err(e) = cgroup.destroy() {
                tracing::warn!("removing cgroup of failed create: {e}");
            }
        }
        if let Err(e) = self.dir.remove() {
            tracing::warn!("removing state of failed create: {e}");
        }
    }
}

pub(super) fn create(
    rt: &Runtime,
    id: &str,
    bundle: &Path,
    opts: CreateOptions,
) -> Result<Container> {
    state::validate_id(id)?;
    // Everything that can be checked without side effects comes first.
    let bundle = spec::load_bundle(bundle)?;
    let spec = &bundle.spec;
    let process = spec.process().as_ref().ok_or_else(|| Error::InvalidSpec {
        field: "process".into(),
        msg: "missing".into(),
    })?;
    let default_linux = Linux::default();
    let linux = spec.linux().as_ref().unwrap_or(&default_linux);
    check_terminal(process.terminal().unwrap_or(false), &opts.terminal)?;
    // LSM labels are set by orchestrators whenever the host has the LSM; this runtime does
    // not load profiles, so say so instead of failing every CRI container.
    if let Some(profile) = process.apparmor_profile() {
        tracing::warn!(
            container = id,
            "process.apparmorProfile {profile:?} is not applied"
        );
    }
    if let Some(label) = process.selinux_label() {
        tracing::warn!(
            container = id,
            "process.selinuxLabel {label:?} is not applied"
        );
    }
    let cgroups_path = linux
        .cgroups_path()
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    let cgroup = Cgroup::new(cgroups_path.as_deref(), id)?;
    let seccomp = linux.seccomp().as_ref().map(seccomp::compile).transpose()?;
    let plan = namespaces::Plan::for_create(linux.namespaces().as_deref().unwrap_or_default());
    let spec_hooks = spec.hooks().clone().unwrap_or_default();
    #[allow(deprecated)] // prestart is deprecated but still part of the spec
    let prestart = spec_hooks.prestart().clone().unwrap_or_default();
    let create_runtime = spec_hooks.create_runtime().clone().unwrap_or_default();
    let has_hooks = !prestart.is_empty()
        || !create_runtime.is_empty()
        || spec_hooks
            .create_container()
            .as_ref()
            .is_some_and(|h| !h.is_empty())
        || spec_hooks
            .start_container()
            .as_ref()
            .is_some_and(|h| !h.is_empty());

    let dir = StateDir::new(rt.root(), id);
    dir.create(id)?;
    let mut cleanup = Cleanup {
        dir: &dir,
        cgroup: None,
        intermediate: None,
        init: None,
        armed: true,
    };
    // Recorded before any cgroup or process exists: if this process is killed half-way,
    // `delete --force` still finds the cgroup to remove.
    let mut persisted = Persisted {
        id: id.to_string(),
        bundle: bundle.path.clone(),
        rootfs: bundle.rootfs.clone(),
        pid: 0,
        pid_start_time: 0,
        created: utils::rfc3339_now(),
        paused: false,
        cgroup: cgroup.clone(),
        spec: bundle.spec.clone(),
    };
    dir.save(&persisted)?;
    cgroup.create()?;
    cleanup.cgroup = Some(&cgroup);
    if let Some(resources) = linux.resources() {
        cgroup.apply(resources)?;
    }
    let fifo = dir.fifo();
    mkfifo(&fifo, Mode::from_bits_truncate(0o622))
        .context(|| format!("mkfifo {}", fifo.display()))?;
    // The umask filtered the mode; the init may write it as any user.
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o622))
        .context(|| format!("chmod {}", fifo.display()))?;
    let state_dir_fd = open(
        &dir.path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .context(|| format!("opening {}", dir.path.display()))?;
    let console_socket = match &opts.terminal {
        Terminal::ConsoleSocket(path) => Some(
            UnixStream::connect(path)
                .context(|| format!("connecting to console socket {}", path.display()))?,
        ),
        _ => None,
    };
    let (parent_end, child_end) = channel::pair().context(|| "socketpair".into())?;
    let cfg = ChildConfig {
        role: Role::Init(InitRole {
            id,
            spec,
            rootfs: &bundle.rootfs,
            bundle: &bundle.path,
            state_dir_fd: state_dir_fd.as_raw_fd(),
            no_pivot: opts.no_pivot,
            no_new_keyring: opts.no_new_keyring,
            has_hooks,
        }),
        process,
        plan: &plan,
        cgroup: Some(&cgroup),
        stdio: stdio_fds(&opts.stdio),
        console_socket: console_socket.as_ref().map(|s| s.as_raw_fd()),
        return_master: opts.terminal == Terminal::ReturnMaster,
        preserve_fds: opts.preserve_fds,
        seccomp: seccomp.as_ref(),
        channel: &child_end,
    };
    let intermediate = child::spawn_intermediate(&cfg)?;
    drop(child_end);
    drop(console_socket);
    drop(state_dir_fd);
    cleanup.intermediate = Some(intermediate);

    let mut init_pid = None;
    let mut pty_master: Option<OwnedFd> = None;
    let state_at = |pid: i32, status: Status| State {
        oci_version: OCI_VERSION.to_string(),
        id: id.to_string(),
        pid,
        status,
        bundle: bundle.path.clone(),
        rootfs: bundle.rootfs.clone(),
        created: String::new(),
        owner: String::new(),
        annotations: spec.annotations().clone().unwrap_or_default(),
    };
    // The intermediate's `Pid` and the init's first messages race on the channel: a
    // message that needs the pid waits for it.
    let mut ready = false;
    let mut hooks_pending = false;
    while !(ready && init_pid.is_some()) {
        let msg = parent_end.recv().map_err(Error::Child)?;
        match msg {
            Some((Msg::NeedIdMaps, _)) => {
                write_id_maps(intermediate.as_raw(), linux)?;
                parent_end.send(&Msg::Ack).map_err(Error::Child)?;
            }
            Some((Msg::Pid(pid), _)) => {
                init_pid = Some(pid);
                cleanup.init = Some(Pid::from_raw(pid));
                cgroup.add_process(pid)?;
                parent_end.send(&Msg::CgroupJoined).map_err(Error::Child)?;
                // The intermediate exits right after sending the pid.
                let _ = waitpid(intermediate, None);
                cleanup.intermediate = None;
            }
            Some((Msg::RunHooks, _)) => hooks_pending = true,
            Some((Msg::PtyMaster, fd)) => pty_master = fd,
            Some((Msg::Ready, _)) => ready = true,
            Some((Msg::Error(msg), _)) => return Err(Error::Child(msg)),
            Some((Msg::Ack | Msg::HooksDone(_) | Msg::CgroupJoined, _)) => {
                return Err(Error::Child(
                    "unexpected message from container init".into(),
                ))
            }
            None => {
                return Err(Error::Child(
                    "container init exited before it was ready".into(),
                ))
            }
        }
        if let (true, Some(pid)) = (hooks_pending, init_pid) {
            hooks_pending = false;
            let json = serde_json::to_string(&state_at(pid, Status::Creating))
                .context(|| "encoding state".into())?;
            hooks::run("prestart", &prestart, &json)?;
            hooks::run("createRuntime", &create_runtime, &json)?;
            let created = serde_json::to_string(&state_at(pid, Status::Created))
                .context(|| "encoding state".into())?;
            parent_end
                .send(&Msg::HooksDone(created))
                .map_err(Error::Child)?;
        }
    }
    let pid = init_pid.ok_or_else(|| Error::Child("container init pid never arrived".into()))?;
    let (pid_start_time, _) = utils::proc_stat(pid)
        .ok_or_else(|| Error::Child("container init exited before it was ready".into()))?;
    persisted.pid = pid;
    persisted.pid_start_time = pid_start_time;
    dir.save(&persisted)?;
    if let Some(pid_file) = &opts.pid_file {
        utils::write_atomic(pid_file, pid.to_string().as_bytes())?;
    }
    parent_end.send(&Msg::Ack).map_err(Error::Child)?;
    cleanup.disarm();
    tracing::debug!(container = id, pid, bundle = %bundle.path.display(), "created");
    drop(parent_end);
    Ok(Container {
        dir,
        state: persisted,
        pty_master,
    })
}

pub(super) fn check_terminal(wanted: bool, terminal: &Terminal) -> Result<()> {
    match (wanted, terminal) {
        (true, Terminal::None) => Err(Error::InvalidSpec {
            field: "process.terminal".into(),
            msg: "a terminal needs a console socket".into(),
        }),
        (false, Terminal::ConsoleSocket(_) | Terminal::ReturnMaster) => Err(Error::InvalidSpec {
            field: "process.terminal".into(),
            msg: "is false but a console socket was given".into(),
        }),
        _ => Ok(()),
    }
}

pub(super) fn stdio_fds(stdio: &crate::process::Stdio) -> [Option<i32>; 3] {
    [
        stdio.stdin.as_ref().map(|f| f.as_raw_fd()),
        stdio.stdout.as_ref().map(|f| f.as_raw_fd()),
        stdio.stderr.as_ref().map(|f| f.as_raw_fd()),
    ]
}

fn format_map(maps: &[LinuxIdMapping]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

/// Writes the id maps of the intermediate's new user namespace (only a process outside
/// the namespace with CAP_SETUID/CAP_SETGID may map arbitrary ids).
fn write_id_maps(pid: i32, linux: &Linux) -> Result<()> {
    for (file, maps, field) in [
        ("uid_map", linux.uid_mappings(), "linux.uidMappings"),
        ("gid_map", linux.gid_mappings(), "linux.gidMappings"),
    ] {
        let maps = maps.as_deref().unwrap_or_default();
        if maps.is_empty() {
            continue;
        }
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, format_map(maps)).map_err(|e| Error::InvalidSpec {
            field: field.into(),
            msg: format!("writing {path}: {e}"),
        })?;
    }
    Ok(())
}
