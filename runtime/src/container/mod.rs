//! The container lifecycle: [`Runtime`] (a state root) creates and loads [`Container`]s;
//! a container is started, signalled, paused, updated, exec'd into and deleted.

mod create;
mod exec;

use std::{
    fs,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{open, OFlag},
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::{signal::kill as send_signal, stat::Mode},
    unistd::Pid,
};
use oci_spec::runtime::{LinuxResources, Spec};

use crate::{
    cgroups::{self, Cgroup},
    error::{Context, Error, Result},
    hooks,
    process::{CreateOptions, ExecHandle, ExecOptions},
    state::{self, Persisted, State, StateDir, Status, OCI_VERSION},
    utils, Signal,
};

/// How long `delete --force` waits for the container's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle on a state root directory (runc's `--root`), where each container has a
/// directory named by its id.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
}

impl Runtime {
    /// Opens (and creates if needed, mode 0711) the state root.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&root)
            .context(|| format!("creating state root {}", root.display()))?;
        let root = fs::canonicalize(&root).context(|| format!("resolving {}", root.display()))?;
        Ok(Self { root })
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates container `id` from the bundle at `bundle`. On success the container's init
    /// exists (a child of the caller), is set up, and waits before `execve` until
    /// [`Container::start`]. On failure nothing is left: no process, cgroup or state.
    pub fn create(&self, id: &str, bundle: &Path, opts: CreateOptions) -> Result<Container> {
        create::create(self, id, bundle, opts)
    }

    /// Loads an existing container.
    pub fn load(&self, id: &str) -> Result<Container> {
        state::validate_id(id)?;
        let dir = StateDir::new(&self.root, id);
        let state = dir.load(id)?;
        Ok(Container {
            dir,
            state,
            pty_master: None,
        })
    }

    /// The states of all containers under the root.
    pub fn list(&self) -> Result<Vec<State>> {
        let mut states = Vec::new();
        let entries =
            fs::read_dir(&self.root).context(|| format!("listing {}", self.root.display()))?;
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if state::validate_id(&id).is_err() {
                continue;
            }
            match self.load(&id) {
                Ok(c) => states.push(c.state()?),
                // A container being created or deleted right now.
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        states.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(states)
    }
}

/// One container.
#[derive(Debug)]
pub struct Container {
    dir: StateDir,
    state: Persisted,
    pty_master: Option<OwnedFd>,
}

impl Container {
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Host pid of the init (also after it exited; see [`Container::status`]).
    pub fn pid(&self) -> Option<i32> {
        (self.state.pid > 0).then_some(self.state.pid)
    }

    pub fn bundle(&self) -> &Path {
        &self.state.bundle
    }

    /// The spec the container was created with (plus updates).
    pub fn spec(&self) -> &Spec {
        &self.state.spec
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.state.cgroup
    }

    /// The current status, derived from the init process, the exec fifo and the pause flag.
    pub fn status(&self) -> Status {
        if self.state.pid == 0 {
            // Being created, or a create that was interrupted (see `delete`).
            Status::Creating
        } else if !utils::process_alive(self.state.pid, self.state.pid_start_time) {
            Status::Stopped
        } else if self.state.paused {
            Status::Paused
        } else if self.dir.fifo().exists() {
            Status::Created
        } else {
            Status::Running
        }
    }

    /// The OCI state.
    pub fn state(&self) -> Result<State> {
        let status = self.status();
        Ok(State {
            oci_version: OCI_VERSION.to_string(),
            id: self.state.id.clone(),
            pid: if matches!(status, Status::Stopped | Status::Creating) {
                0
            } else {
                self.state.pid
            },
            status,
            bundle: self.state.bundle.clone(),
            rootfs: self.state.rootfs.clone(),
            created: self.state.created.clone(),
            owner: String::new(),
            annotations: self.state.spec.annotations().clone().unwrap_or_default(),
        })
    }

    fn state_json(&self) -> String {
        self.state()
            .ok()
            .and_then(|s| serde_json::to_string(&s).ok())
            .unwrap_or_default()
    }

    fn require(&self, allowed: &[Status], msg: &'static str) -> Result<Status> {
        let status = self.status();
        if allowed.contains(&status) {
            Ok(status)
        } else {
            Err(Error::InvalidState {
                id: self.state.id.clone(),
                status,
                msg,
            })
        }
    }

    /// Lets the init execute the user's program: reads the exec fifo the init is blocked
    /// on, then runs the poststart hooks.
    pub fn start(&mut self) -> Result<()> {
        self.require(&[Status::Created], "start needs a created container")?;
        let fifo_path = self.dir.fifo();
        let fifo = open(
            &fifo_path,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .context(|| format!("opening {}", fifo_path.display()))?;
        loop {
            let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(0) | Err(Errno::EINTR) => {
                    if !utils::process_alive(self.state.pid, self.state.pid_start_time) {
                        return Err(Error::Child(
                            "container init exited before it was started".into(),
                        ));
                    }
                }
                Ok(_) => {
                    let mut byte = [0u8; 1];
                    match nix::unistd::read(&fifo, &mut byte) {
                        Ok(1) => break,
                        Ok(_) => {
                            return Err(Error::Child(
                                "container init exited before it was started".into(),
                            ))
                        }
                        Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(e).context(|| "reading exec fifo".into()),
                    }
                }
                Err(e) => return Err(e).context(|| "polling exec fifo".into()),
            }
        }
        fs::remove_file(&fifo_path).context(|| format!("removing {}", fifo_path.display()))?;
        tracing::debug!(container = %self.state.id, pid = self.state.pid, "started");
        let poststart = self
            .state
            .spec
            .hooks()
            .as_ref()
            .and_then(|h| h.poststart().clone())
            .unwrap_or_default();
        // The runtime-spec: a failing poststart hook is logged, the container keeps running.
        if let Err(e) = hooks::run("poststart", &poststart, &self.state_json()) {
            tracing::warn!(container = %self.state.id, "{e}");
        }
        Ok(())
    }

    /// Sends `signal` to the init, or with `all` to every process of the container.
    pub fn kill(&self, signal: Signal, all: bool) -> Result<()> {
        let status = self.status();
        tracing::debug!(container = %self.state.id, %signal, all, %status, "kill");
        if matches!(status, Status::Stopped | Status::Creating) && !all {
            return Err(Error::NotRunning);
        }
        if all {
            for pid in self.pids()? {
                match send_signal(Pid::from_raw(pid), signal) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(e) => return Err(e).context(|| format!("kill({pid}, {signal})")),
                }
            }
        } else {
            send_signal(Pid::from_raw(self.state.pid), signal)
                .context(|| format!("kill({}, {signal})", self.state.pid))?;
        }
        // Frozen processes do not act on SIGKILL until thawed.
        if status == Status::Paused && signal == Signal::SIGKILL {
            self.state.cgroup.thaw()?;
        }
        Ok(())
    }

    /// Removes the container: its processes must have stopped (or are killed with
    /// `force`; a created, never started container is always killed), then the poststop
    /// hooks run and the cgroup and state directory are removed.
    pub fn delete(self, force: bool) -> Result<()> {
        match self.status() {
            // Creating: an interrupted create; the cgroup removal below kills whatever
            // it may have started.
            Status::Stopped | Status::Creating => {}
            Status::Created => self.kill_and_wait()?,
            status @ (Status::Running | Status::Paused) => {
                if !force {
                    return Err(Error::InvalidState {
                        id: self.state.id.clone(),
                        status,
                        msg: "stop it first or delete it with force",
                    });
                }
                self.kill_and_wait()?;
            }
        }
        let poststop = self
            .state
            .spec
            .hooks()
            .as_ref()
            .and_then(|h| h.poststop().clone())
            .unwrap_or_default();
        // A container whose create was interrupted never ran: no poststop for it.
        if self.state.pid > 0 {
            if let Err(e) = hooks::run("poststop", &poststop, &self.state_json()) {
                tracing::warn!(container = %self.state.id, "{e}");
            }
        }
        self.state.cgroup.destroy()?;
        self.dir.remove()?;
        tracing::debug!(container = %self.state.id, "deleted");
        Ok(())
    }

    fn kill_and_wait(&self) -> Result<()> {
        let _ = send_signal(Pid::from_raw(self.state.pid), Signal::SIGKILL);
        self.kill(Signal::SIGKILL, true)?;
        let deadline = Instant::now() + KILL_TIMEOUT;
        while utils::process_alive(self.state.pid, self.state.pid_start_time)
            || self.pids().is_ok_and(|p| !p.is_empty())
        {
            if Instant::now() > deadline {
                return Err(Error::Child(format!(
                    "container {:?} still has processes {KILL_TIMEOUT:?} after SIGKILL",
                    self.state.id
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Freezes every process of the container.
    pub fn pause(&mut self) -> Result<()> {
        self.require(
            &[Status::Running, Status::Created],
            "pause needs a running container",
        )?;
        self.state.cgroup.freeze()?;
        self.state.paused = true;
        self.dir.save(&self.state)
    }

    /// Thaws a paused container.
    pub fn resume(&mut self) -> Result<()> {
        self.require(&[Status::Paused], "resume needs a paused container")?;
        self.state.cgroup.thaw()?;
        self.state.paused = false;
        self.dir.save(&self.state)
    }

    /// Applies new resource limits and records them in the stored spec.
    pub fn update(&self, resources: &LinuxResources) -> Result<()> {
        self.require(
            &[Status::Created, Status::Running, Status::Paused],
            "update needs a live container",
        )?;
        self.state.cgroup.apply(resources)?;
        let mut state = self.state.clone();
        if let Some(linux) = state.spec.linux_mut() {
            linux.set_resources(Some(resources.clone()));
        }
        self.dir.save(&state)
    }

    /// cgroup statistics.
    pub fn stats(&self) -> Result<cgroups::Stats> {
        Ok(self.state.cgroup.stats()?)
    }

    /// How many times the OOM killer killed a process of the container.
    pub fn oom_kill_count(&self) -> Result<u64> {
        Ok(self.state.cgroup.oom_kill_count()?)
    }

    /// Host pids of every process in the container's cgroup.
    pub fn pids(&self) -> Result<Vec<i32>> {
        Ok(self.state.cgroup.pids()?)
    }

    /// Runs another process in the container's namespaces and cgroup. It is a child of
    /// the caller, which must `waitpid` it.
    pub fn exec(&self, opts: ExecOptions) -> Result<ExecHandle> {
        self.require(
            &[Status::Created, Status::Running],
            "exec needs a running container",
        )?;
        exec::exec(self, opts)
    }

    /// The init's pty master when created with [`Terminal::ReturnMaster`](crate::Terminal).
    pub fn take_pty_master(&mut self) -> Option<OwnedFd> {
        self.pty_master.take()
    }

    pub(crate) fn persisted(&self) -> &Persisted {
        &self.state
    }
}
