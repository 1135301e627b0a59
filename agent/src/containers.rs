//! The containers of this sandbox: their runtime handles, processes, stdio and mounts, and
//! every container operation the RPCs expose.
//!
//! Blocking runtime calls run on tokio's blocking pool. Calls that fork (create, start,
//! exec, delete: they run hooks or wait for intermediates) hold the [`Reaper`] lock; see
//! `reaper.rs` for why.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::UNIX_EPOCH,
};

use nix::{sys::signal::kill, unistd::Pid};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use palisade_agent_protocol::agent::{
    CpuStats, CreateContainerRequest, ExecProcessRequest, MemoryStats, PidsStats,
    StatsContainerResponse, WaitProcessResponse,
};
use palisade_runtime::{
    cgroups::{OomEvent, OomWatcher},
    CreateOptions, ExecOptions, Runtime, Signal, Terminal,
};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    error::{AgentError, Context, Result, RuntimeContext},
    reaper::{ExitReceiver, Reaper},
    stdio::{self, InputSlot, OutputSlot},
    storage::{self, MountPlan},
};

/// Request size bounds (ttrpc itself caps a message at 4 MiB).
pub const MAX_SPEC_BYTES: usize = 1 << 20;
pub const MAX_PROCESS_BYTES: usize = 256 << 10;
pub const MAX_RESOURCES_BYTES: usize = 64 << 10;
pub const MAX_STDIN_CHUNK: usize = 1 << 20;
const MAX_CONTAINERS: usize = 1024;
const MAX_EXECS_PER_CONTAINER: usize = 1024;
const MAX_STORAGES: usize = 64;
/// Notifications within this time after an OOM event belong to the same episode.
const OOM_COALESCE: std::time::Duration = std::time::Duration::from_millis(100);
/// OOM events queued for GetOomEvent; older ones are dropped (with a log) beyond this.
const OOM_QUEUE: usize = 128;

/// One process (a container's init or an exec) as the stdio and wait RPCs see it.
pub struct Process {
    pub pid: i32,
    stdin: InputSlot,
    stdout: OutputSlot,
    stderr: OutputSlot,
    /// The pty master, for window resizes.
    pty: Option<OwnedFd>,
    exit: ExitReceiver,
}

impl Process {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

struct ContainerEntry {
    id: String,
    /// `<state>/containers/<id>`: the bundle (config.json, rootfs/, storage/).
    dir: PathBuf,
    /// `None` once deleted.
    handle: Mutex<Option<palisade_runtime::Container>>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Mount points made for this container, in mount order.
    mounts: Vec<PathBuf>,
    /// Forwards the cgroup's OOM notifications to GetOomEvent; stopped with the entry.
    oom_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for ContainerEntry {
    fn drop(&mut self) {
        if let Some(task) = &self.oom_task {
            task.abort();
        }
    }
}

#[derive(Default)]
struct Table {
    live: HashMap<String, Arc<ContainerEntry>>,
    /// Ids being created (so two CreateContainer calls cannot race for one id).
    reserved: HashSet<String>,
}

/// The agent's container state.
pub struct Containers {
    runtime: Runtime,
    containers_dir: PathBuf,
    table: Mutex<Table>,
    reaper: Reaper,
    oom_tx: mpsc::Sender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn validate_id(field: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && storage::is_name(id);
    if !ok {
        return Err(AgentError::invalid(
            field,
            format!("{id:?} is not an id ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})"),
        ));
    }
    Ok(())
}

fn check_size(field: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(AgentError::invalid(
            field,
            format!("{len} bytes exceeds the {max}-byte limit"),
        ));
    }
    Ok(())
}

/// Runs a blocking closure on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Io {
            context: "blocking task".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}

/// Runtime errors about the spec name the request field they came from.
fn spec_error(field: &str, e: AgentError) -> AgentError {
    match e {
        AgentError::Runtime {
            source: palisade_runtime::Error::InvalidSpec { field: f, msg },
            ..
        } if f == field || f.starts_with(&format!("{field}.")) => AgentError::invalid(f, msg),
        AgentError::Runtime {
            source: palisade_runtime::Error::InvalidSpec { field: f, msg },
            ..
        } => AgentError::invalid(format!("{field}.{f}"), msg),
        other => other,
    }
}

/// The validated filesystems of a CreateContainer request.
struct Filesystems {
    rootfs: MountPlan,
    /// Rootfs read-only under an overlay with a private tmpfs upper layer.
    overlay: bool,
    storages: Vec<(String, MountPlan)>,
}

impl Containers {
    pub fn new(runtime: Runtime, containers_dir: PathBuf, reaper: Reaper) -> Arc<Self> {
        let (oom_tx, oom_rx) = mpsc::channel(OOM_QUEUE);
        Arc::new(Self {
            runtime,
            containers_dir,
            table: Mutex::new(Table::default()),
            reaper,
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
        })
    }

    fn container(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        lock(&self.table)
            .live
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id:?}")))
    }

    /// Whether container `id` exists or is being created.
    pub fn knows(&self, id: &str) -> bool {
        let table = lock(&self.table);
        table.live.contains_key(id) || table.reserved.contains(id)
    }

    /// The process `exec_id` of container `id` (empty `exec_id`: the init).
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let process = lock(&c.execs).get(exec_id).cloned();
        process
            .ok_or_else(|| AgentError::NotFound(format!("process {exec_id:?} of container {id:?}")))
    }

    pub async fn create(&self, req: CreateContainerRequest) -> Result<u32> {
        validate_id("container_id", &req.container_id)?;
        check_size("spec_json", req.spec_json.len(), MAX_SPEC_BYTES)?;
        let spec = palisade_runtime::spec::parse(&req.spec_json).map_err(|e| match e {
            palisade_runtime::Error::InvalidSpec { field, msg } => {
                AgentError::invalid(format!("spec_json.{field}"), msg)
            }
            other => AgentError::invalid("spec_json", other.to_string()),
        })?;
        let rootfs = match req.rootfs.as_ref() {
            Some(rootfs) => storage::plan(rootfs, "rootfs")?,
            None => return Err(AgentError::invalid("rootfs", "required")),
        };
        if req.storages.len() > MAX_STORAGES {
            return Err(AgentError::invalid(
                "storages",
                format!("at most {MAX_STORAGES}"),
            ));
        }
        let mut storages = Vec::with_capacity(req.storages.len());
        let mut names = HashSet::new();
        for (i, s) in req.storages.iter().enumerate() {
            let field = format!("storages[{i}]");
            if s.name.len() > 64 || !storage::is_name(&s.name) || s.name.starts_with('.') {
                return Err(AgentError::invalid(
                    format!("{field}.name"),
                    format!("{:?} is not a name", s.name),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(AgentError::invalid(
                    format!("{field}.name"),
                    format!("{:?} is used twice", s.name),
                ));
            }
            let Some(st) = s.storage.as_ref() else {
                return Err(AgentError::invalid(format!("{field}.storage"), "required"));
            };
            storages.push((
                s.name.clone(),
                storage::plan(st, &format!("{field}.storage"))?,
            ));
        }
        let filesystems = Filesystems {
            rootfs,
            overlay: req.rootfs_overlay,
            storages,
        };
        let tty = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);

        let id = req.container_id.clone();
        {
            let mut table = lock(&self.table);
            if table.live.contains_key(&id) || table.reserved.contains(&id) {
                return Err(AgentError::AlreadyExists(format!("container {id:?}")));
            }
            if table.live.len() + table.reserved.len() >= MAX_CONTAINERS {
                return Err(AgentError::FailedPrecondition(format!(
                    "the sandbox already has {MAX_CONTAINERS} containers"
                )));
            }
            table.reserved.insert(id.clone());
        }
        let result = self
            .create_reserved(&id, spec, filesystems, tty, req.stdin)
            .await;
        let mut table = lock(&self.table);
        table.reserved.remove(&id);
        let entry = result?;
        let pid = entry.init.pid;
        table.live.insert(id, entry);
        Ok(pid as u32)
    }

    async fn create_reserved(
        &self,
        id: &str,
        spec: Spec,
        filesystems: Filesystems,
        tty: bool,
        with_stdin: bool,
    ) -> Result<Arc<ContainerEntry>> {
        let dir = self.containers_dir.join(id);
        // Mounting can wait for a device node; keep it off the async workers.
        let bundle_dir = dir.clone();
        let (mounts, prepared) = blocking(move || {
            let mut spec = spec;
            let mut mounts = Vec::new();
            let prepared = prepare_bundle(&bundle_dir, &mut spec, &filesystems, &mut mounts);
            Ok((mounts, prepared))
        })
        .await?;
        let result = match prepared {
            Ok(()) => {
                self.create_in_bundle(id, &dir, tty, with_stdin, &mounts)
                    .await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            let cleanup = blocking(move || {
                cleanup_bundle(&dir, &mounts);
                Ok(())
            });
            if let Err(e) = cleanup.await {
                tracing::warn!(container = %id, "cleanup after a failed create: {e}");
            }
        }
        result
    }

    async fn create_in_bundle(
        &self,
        id: &str,
        dir: &Path,
        tty: bool,
        with_stdin: bool,
        mounts: &[PathBuf],
    ) -> Result<Arc<ContainerEntry>> {
        let mut opts = CreateOptions::default();
        let (stdin, stdout, stderr) = if tty {
            opts.terminal = Terminal::ReturnMaster;
            (None, None, None)
        } else {
            let pipes = stdio::pipes(with_stdin).context(|| "creating stdio pipes".into())?;
            opts.stdio = pipes.child;
            (pipes.stdin, Some(pipes.stdout), Some(pipes.stderr))
        };

        let mut guard = self.reaper.lock().await;
        let runtime = self.runtime.clone();
        let (cid, bundle) = (id.to_owned(), dir.to_owned());
        let mut container = blocking(move || {
            runtime
                .create(&cid, &bundle, opts)
                .runtime_context(|| format!("creating container {cid:?}"))
        })
        .await
        .map_err(|e| spec_error("spec_json", e))?;
        let Some(pid) = container.pid() else {
            drop(guard);
            self.discard(container).await;
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} has no init pid"
            )));
        };
        let exit = guard.register(pid);
        drop(guard);

        let pty_master = container.take_pty_master();
        let streams = match pty_master {
            Some(master) => pty_setup(master, with_stdin),
            None => Ok((stdin, stdout, None)),
        };
        let (stdin, stdout, pty) = match streams {
            Ok(streams) => streams,
            Err(e) => {
                self.discard(container).await;
                return Err(e);
            }
        };
        let oom_task = match container.cgroup().oom_watcher() {
            Ok(watcher) => match forward_oom_events(id.to_owned(), watcher, self.oom_tx.clone()) {
                Ok(task) => Some(task),
                Err(e) => {
                    tracing::warn!(container = %id, "OOM events unavailable: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(container = %id, "OOM events unavailable: {e}");
                None
            }
        };
        Ok(Arc::new(ContainerEntry {
            id: id.to_owned(),
            dir: dir.to_owned(),
            handle: Mutex::new(Some(container)),
            init: Arc::new(Process {
                pid,
                stdin: InputSlot::new(stdin),
                stdout: OutputSlot::new(stdout),
                stderr: OutputSlot::new(stderr),
                pty,
                exit,
            }),
            execs: Mutex::new(HashMap::new()),
            mounts: mounts.to_vec(),
            oom_task,
        }))
    }

    /// Force-deletes a container the agent could not finish setting up, so a failed
    /// CreateContainer leaves no process, cgroup or runtime state behind.
    async fn discard(&self, container: palisade_runtime::Container) {
        let id = container.id().to_owned();
        let _guard = self.reaper.lock().await;
        let result = blocking(move || {
            container
                .delete(true)
                .runtime_context(|| "deleting a half-created container".into())
        })
        .await;
        if let Err(e) = result {
            tracing::error!(container = %id, "{e}");
        }
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let _guard = self.reaper.lock().await;
        blocking(move || {
            let mut handle = lock(&c.handle);
            let container = handle.as_mut().ok_or_else(|| gone(&c.id))?;
            container
                .start()
                .runtime_context(|| format!("starting container {:?}", c.id))
        })
        .await
    }

    pub async fn exec(&self, req: ExecProcessRequest) -> Result<u32> {
        validate_id("exec_id", &req.exec_id)?;
        check_size("process_json", req.process_json.len(), MAX_PROCESS_BYTES)?;
        let mut process: OciProcess = serde_json::from_slice(&req.process_json)
            .map_err(|e| AgentError::invalid("process_json", e.to_string()))?;
        process.set_terminal(Some(req.tty));
        palisade_runtime::spec::validate_process(&process, "process_json")
            .runtime_context(|| "process_json".into())
            .map_err(|e| spec_error("process_json", e))?;
        let c = self.container(&req.container_id)?;

        let mut opts = ExecOptions::new(process);
        let (stdin, stdout, stderr) = if req.tty {
            opts.terminal = Terminal::ReturnMaster;
            (None, None, None)
        } else {
            let pipes = stdio::pipes(req.stdin).context(|| "creating stdio pipes".into())?;
            opts.stdio = pipes.child;
            (pipes.stdin, Some(pipes.stdout), Some(pipes.stderr))
        };

        // Exec creation is serialised by the reaper lock, so the duplicate check and the
        // insertion below cannot interleave with another exec.
        let mut guard = self.reaper.lock().await;
        {
            let execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(AgentError::AlreadyExists(format!(
                    "process {:?} of container {:?}",
                    req.exec_id, req.container_id
                )));
            }
            if execs.len() >= MAX_EXECS_PER_CONTAINER {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {:?} already has {MAX_EXECS_PER_CONTAINER} exec processes",
                    req.container_id
                )));
            }
        }
        let entry = c.clone();
        let handle = blocking(move || {
            let guard = lock(&entry.handle);
            let container = guard.as_ref().ok_or_else(|| gone(&entry.id))?;
            container
                .exec(opts)
                .runtime_context(|| format!("exec in container {:?}", entry.id))
        })
        .await
        .map_err(|e| spec_error("process_json", e))?;
        let exit = guard.register(handle.pid);
        drop(guard);

        let streams = match handle.pty_master {
            Some(master) => pty_setup(master, req.stdin),
            None => Ok((stdin, stdout, None)),
        };
        let (stdin, stdout, pty) = match streams {
            Ok(streams) => streams,
            Err(e) => {
                // Under the reaper lock, no published status means not reaped: the pid
                // is still this process.
                let _guard = self.reaper.lock().await;
                if exit.borrow().is_none() {
                    let _ = kill(Pid::from_raw(handle.pid), Signal::SIGKILL);
                }
                return Err(e);
            }
        };
        let process = Arc::new(Process {
            pid: handle.pid,
            stdin: InputSlot::new(stdin),
            stdout: OutputSlot::new(stdout),
            stderr: OutputSlot::new(stderr),
            pty,
            exit,
        });
        lock(&c.execs).insert(req.exec_id, process);
        Ok(handle.pid as u32)
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| {
                AgentError::invalid("signal", format!("{signal} is not a signal number"))
            })?;
        let c = self.container(id)?;
        let process = self.process(id, exec_id)?;
        // Under the reaper lock an unreaped pid cannot have been reused.
        let _guard = self.reaper.lock().await;
        if !exec_id.is_empty() {
            if process.exited() {
                return Err(AgentError::NotFound(format!(
                    "process {exec_id:?} already exited"
                )));
            }
            return kill(Pid::from_raw(process.pid), sig)
                .context(|| format!("kill({}, {sig})", process.pid));
        }
        if process.exited() && !all {
            return Err(AgentError::NotFound(format!(
                "container {id:?} init already exited"
            )));
        }
        blocking(move || {
            let handle = lock(&c.handle);
            let container = handle.as_ref().ok_or_else(|| gone(&c.id))?;
            container
                .kill(sig, all)
                .runtime_context(|| format!("signalling container {:?}", c.id))
        })
        .await
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse> {
        let mut exit = self.process(id, exec_id)?.exit.clone();
        let status = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| AgentError::FailedPrecondition("the reaper stopped".into()))?
            .ok_or_else(|| AgentError::FailedPrecondition("no exit status".into()))?;
        Ok(WaitProcessResponse {
            exit_status: status.code,
            exited_at_unix_nanos: status
                .at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
            ..Default::default()
        })
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<u32> {
        check_size("data", data.len(), MAX_STDIN_CHUNK)?;
        let process = self.process(id, exec_id)?;
        match process.stdin.write(data).await {
            Ok(true) => Ok(data.len() as u32),
            Ok(false) => Err(AgentError::FailedPrecondition(format!(
                "process {exec_id:?} of container {id:?} has no open stdin"
            ))),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => Err(AgentError::FailedPrecondition(
                format!("process {exec_id:?} of container {id:?} closed its stdin"),
            )),
            Err(e) => Err(e).context(|| "writing stdin".into()),
        }
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.process(id, exec_id)?.stdin.close().await;
        Ok(())
    }

    /// Long-polls stdout (`stderr == false`) or stderr.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: u32,
    ) -> Result<(Vec<u8>, bool)> {
        let max = match max as usize {
            0 => stdio::DEFAULT_READ_CHUNK,
            n => n.min(stdio::MAX_READ_CHUNK),
        };
        let process = self.process(id, exec_id)?;
        let slot = if stderr {
            &process.stderr
        } else {
            &process.stdout
        };
        slot.read_chunk(max)
            .await
            .context(|| "reading output".into())
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<()> {
        let rows =
            u16::try_from(rows).map_err(|_| AgentError::invalid("rows", "must fit in 16 bits"))?;
        let columns = u16::try_from(columns)
            .map_err(|_| AgentError::invalid("columns", "must fit in 16 bits"))?;
        let process = self.process(id, exec_id)?;
        let pty = process.pty.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!("process {exec_id:?} of {id:?} has no terminal"))
        })?;
        stdio::resize(pty.as_raw_fd(), rows, columns).context(|| "TIOCSWINSZ".into())
    }

    /// Runs `f` on the runtime handle of container `id` on the blocking pool.
    async fn with_handle<T: Send + 'static>(
        &self,
        id: &str,
        what: &'static str,
        f: impl FnOnce(&mut palisade_runtime::Container) -> palisade_runtime::Result<T> + Send + 'static,
    ) -> Result<T> {
        let c = self.container(id)?;
        blocking(move || {
            let mut handle = lock(&c.handle);
            let container = handle.as_mut().ok_or_else(|| gone(&c.id))?;
            f(container).runtime_context(|| format!("{what} container {:?}", c.id))
        })
        .await
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.with_handle(id, "pausing", |c| c.pause()).await
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.with_handle(id, "resuming", |c| c.resume()).await
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        check_size("resources_json", resources_json.len(), MAX_RESOURCES_BYTES)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| AgentError::invalid("resources_json", e.to_string()))?;
        self.with_handle(id, "updating", move |c| c.update(&resources))
            .await
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        let stats = self
            .with_handle(id, "reading stats of", |c| c.stats())
            .await?;
        let stats_json = serde_json::to_vec(&stats).map_err(|e| AgentError::Io {
            context: "encoding stats".into(),
            source: e.into(),
        })?;
        Ok(StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_ns: stats.cpu.usage.total_ns,
                user_ns: stats.cpu.usage.user_ns,
                system_ns: stats.cpu.usage.kernel_ns,
                nr_periods: stats.cpu.throttling.periods,
                nr_throttled: stats.cpu.throttling.throttled_periods,
                throttled_ns: stats.cpu.throttling.throttled_time_ns,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage_bytes: stats.memory.usage.usage,
                limit_bytes: stats.memory.usage.limit,
                anon_bytes: stats.memory.rss,
                file_bytes: stats.memory.cache,
                oom_kills: stats.memory.oom_kill,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStats {
                current: stats.pids.current,
                limit: stats.pids.limit,
                ..Default::default()
            })
            .into(),
            stats_json,
            ..Default::default()
        })
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let pids = self
            .with_handle(id, "listing processes of", |c| c.pids())
            .await?;
        Ok(pids.into_iter().map(|p| p as u32).collect())
    }

    /// Deletes container `id` (killing it first with `force`), unmounts its storage and
    /// removes its bundle directory.
    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let c = self.container(id)?;
        let _guard = self.reaper.lock().await;
        let entry = c.clone();
        let runtime = self.runtime.clone();
        blocking(move || {
            let mut handle = lock(&entry.handle);
            let container = handle.take().ok_or_else(|| gone(&entry.id))?;
            // `delete` consumes the handle; on failure reload it so the container stays
            // manageable (e.g. a retry with force).
            if let Err(e) = container.delete(force) {
                *handle = runtime.load(&entry.id).ok();
                return Err(e).runtime_context(|| format!("removing container {:?}", entry.id));
            }
            cleanup_bundle(&entry.dir, &entry.mounts);
            Ok(())
        })
        .await?;
        lock(&self.table).live.remove(id);
        Ok(())
    }

    /// Force-removes every container (DestroySandbox). Returns the first error after trying
    /// all of them.
    pub async fn remove_all(&self) -> Result<()> {
        let ids: Vec<String> = lock(&self.table).live.keys().cloned().collect();
        let mut first_error = None;
        for id in ids {
            if let Err(e) = self.remove(&id, true).await {
                tracing::warn!(container = %id, "{e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub async fn next_oom_event(&self) -> Result<String> {
        self.oom_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| AgentError::FailedPrecondition("OOM watcher stopped".into()))
    }
}

/// Agent-side streams over a pty master: (stdin, output, resize handle).
type PtyStreams = (
    Option<stdio::Stream>,
    Option<stdio::Stream>,
    Option<OwnedFd>,
);

fn pty_setup(master: OwnedFd, with_stdin: bool) -> Result<PtyStreams> {
    let resize = master
        .as_fd()
        .try_clone_to_owned()
        .context(|| "dup pty master".into())?;
    let (stdin, out) = stdio::pty_streams(master, with_stdin).context(|| "pty streams".into())?;
    Ok((stdin, Some(out), Some(resize)))
}

fn gone(id: &str) -> AgentError {
    AgentError::NotFound(format!("container {id:?} (being removed)"))
}

/// Mounts the rootfs and storages under `dir` and writes `dir/config.json` pointing at the
/// rootfs. Every mount made is pushed to `mounts`, also when a later step fails.
fn prepare_bundle(
    dir: &Path,
    spec: &mut Spec,
    filesystems: &Filesystems,
    mounts: &mut Vec<PathBuf>,
) -> Result<()> {
    let Filesystems {
        rootfs,
        overlay,
        storages,
    } = filesystems;
    if dir.exists() {
        // Left over from a crashed earlier attempt with this id: nothing of it is live
        // (the id was not in the table), so clear it.
        cleanup_bundle(dir, &[]);
    }
    fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    let rootfs_dir = dir.join("rootfs");
    if *overlay {
        let lower = dir.join("lower");
        storage::mount_at(&rootfs.read_only(), &lower)?;
        mounts.push(lower.clone());
        let scratch = dir.join("scratch");
        storage::mount_tmpfs(&scratch)?;
        mounts.push(scratch.clone());
        storage::mount_overlay(
            &lower,
            &scratch.join("upper"),
            &scratch.join("work"),
            &rootfs_dir,
        )?;
    } else {
        storage::mount_at(rootfs, &rootfs_dir)?;
    }
    mounts.push(rootfs_dir.clone());
    for (name, plan) in storages {
        let target = dir.join("storage").join(name);
        storage::mount_at(plan, &target)?;
        mounts.push(target);
    }
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs_dir);
    spec.set_root(Some(root));
    let json = serde_json::to_vec(spec).map_err(|e| AgentError::Io {
        context: "encoding config.json".into(),
        source: e.into(),
    })?;
    let config = dir.join("config.json");
    fs::write(&config, json).context(|| format!("writing {}", config.display()))
}

/// Unmounts `mounts` (last first) and everything still mounted below `dir`, then removes
/// `dir`. Best effort: logs and continues.
fn cleanup_bundle(dir: &Path, mounts: &[PathBuf]) {
    for target in mounts.iter().rev() {
        storage::unmount(target);
    }
    // Mounts a crashed earlier agent left behind (the overlay before its layers).
    for sub in ["rootfs", "storage", "scratch", "lower"] {
        let path = dir.join(sub);
        if sub == "storage" {
            if let Ok(entries) = fs::read_dir(&path) {
                for entry in entries.flatten() {
                    storage::unmount(&entry.path());
                }
            }
        } else {
            storage::unmount(&path);
        }
    }
    // remove_dir_all does not cross into mounts that are still there: it fails on them
    // instead (EBUSY), which leaves their contents intact.
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// The OOM watcher's fd as tokio's reactor needs it.
struct OomFd(OomWatcher);

impl AsRawFd for OomFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Queues `id` for GetOomEvent on every OOM the runtime's watcher reports (v1: eventfd on
/// `memory.oom_control`; v2: inotify on `memory.events`), until the cgroup goes away.
fn forward_oom_events(
    id: String,
    watcher: OomWatcher,
    tx: mpsc::Sender<String>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the descriptor belongs to `watcher`, which the AsyncFd owns (inside OomFd) for
    // its whole life, so it stays open and refers to the same file until deregistration.
    let mut fd = unsafe { AsyncFd::register(OomFd(watcher)) }.map_err(std::io::Error::from)?;
    Ok(tokio::spawn(async move {
        loop {
            let mut ready = match fd.readable_mut().await {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::warn!(container = %id, "OOM watcher: {e}");
                    return;
                }
            };
            // Clear before draining: a notification arriving during `check` re-arms it.
            ready.clear_ready();
            let event = ready.get_inner_mut().0.check();
            drop(ready);
            match event {
                Ok(Some(OomEvent::Oom { kills })) => {
                    tracing::info!(container = %id, kills, "OOM");
                    if tx.try_send(id.clone()).is_err() {
                        tracing::warn!("OOM event queue full; event dropped");
                    }
                    // v1 signals every failed charge of one OOM episode (dozens within
                    // milliseconds): report the episode once, at most every OOM_COALESCE.
                    // (Readiness left cached by this drain costs one empty check later.)
                    tokio::time::sleep(OOM_COALESCE).await;
                    match fd.get_mut().0.check() {
                        Ok(Some(OomEvent::Removed)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(container = %id, "OOM watcher: {e}");
                            return;
                        }
                    }
                }
                Ok(Some(OomEvent::Removed)) => return,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(container = %id, "OOM watcher: {e}");
                    return;
                }
            }
        }
    }))
}
