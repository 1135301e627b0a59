//! Native mode: the pod's containers run on the host (namespaces, cgroups, seccomp),
//! created by an OCI runtime [`Engine`]; their processes are children of the shim, which
//! reaps them (see [`crate::reaper`]) and routes exits through an [`ExitTable`].

pub mod engine;
pub mod exits;
pub mod library;
pub mod oom;
pub mod process;
pub mod rootfs;
pub mod stats;
pub mod stdio;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use containerd_shim::util::convert_to_any;
use containerd_shim_protos::{
    api::{
        CreateTaskRequest, DeleteResponse, ExecProcessRequest, StateResponse, Status, WaitResponse,
    },
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
        TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::{well_known_types::any::Any, MessageField},
    shim::oci::ProcessDetails,
    topics,
    types::task::ProcessInfo,
};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use self::{
    engine::{Engine, EngineError},
    exits::ExitTable,
    process::{now, Process},
    stdio::PreparedIo,
};
use super::{Sandbox, StdioUris, TaskError, TaskResult};
use crate::{
    events::EventSink,
    reaper::{run_guarded, Exit},
};

struct Container {
    id: String,
    bundle: PathBuf,
    /// `<bundle>/rootfs` when the shim mounted it.
    rootfs: Option<PathBuf>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    oom_watch: Mutex<Option<JoinHandle<()>>>,
}

impl Container {
    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn process(&self, exec_id: &str) -> TaskResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of {} not found", self.id)))
    }
}

pub struct NativeSandbox {
    engine: Arc<dyn Engine>,
    namespace: String,
    events: EventSink,
    exits: Arc<ExitTable>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The Arc this sandbox lives in, for tasks that outlive a request.
    this: std::sync::Weak<NativeSandbox>,
}

impl NativeSandbox {
    /// `reaped` carries every exit the shim's reaper collects.
    pub fn new(
        engine: Arc<dyn Engine>,
        namespace: &str,
        events: EventSink,
        mut reaped: mpsc::UnboundedReceiver<Exit>,
    ) -> Arc<Self> {
        let sandbox = Arc::new_cyclic(|this| Self {
            engine,
            namespace: namespace.to_string(),
            events,
            exits: Arc::new(ExitTable::default()),
            containers: Mutex::new(HashMap::new()),
            this: this.clone(),
        });
        let weak = Arc::downgrade(&sandbox);
        tokio::spawn(async move {
            while let Some(exit) = reaped.recv().await {
                let Some(sandbox) = weak.upgrade() else {
                    return;
                };
                if let Some(process) = sandbox.exits.claim(exit) {
                    tokio::spawn(async move { sandbox.complete_exit(process, exit.status).await });
                }
            }
        });
        sandbox
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, id: &str) -> TaskResult<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("container {id} not found")))
    }

    /// Reports an exit once the process's output is delivered.
    async fn complete_exit(self: Arc<Self>, process: Arc<Process>, status: u32) {
        if let Some(io) = process.io() {
            io.drain().await;
        }
        let at = now();
        if !process.set_exited(status, at.clone()) {
            return;
        }
        info!(
            container = %process.container_id,
            exec = %process.exec_id,
            pid = process.pid(),
            status,
            "process exited"
        );
        if process.is_init() {
            // Execs cannot outlive the init of a container without its own pid
            // namespace on their own; make sure of it the way runc's shim does.
            if let Ok(container) = self.container(&process.container_id) {
                let execs: Vec<_> = container.execs().values().cloned().collect();
                for exec in execs {
                    if exec.status() == Status::RUNNING && exec.pid() > 0 {
                        let _ = nix::sys::signal::kill(
                            Pid::from_raw(exec.pid() as i32),
                            Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        self.events
            .publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: process.container_id.clone(),
                    id: process.event_id().to_string(),
                    pid: process.pid(),
                    exit_status: status,
                    exited_at: MessageField::some(at),
                    ..Default::default()
                }),
            )
            .await;
    }

    /// Creates the process through the engine and starts its stdio copies.
    async fn spawn(
        &self,
        process: &Arc<Process>,
        run: impl FnOnce(&dyn Engine, engine::ProcessIo) -> Result<engine::Spawned, EngineError>
            + Send
            + 'static,
    ) -> TaskResult<u32> {
        let engine = self.engine.clone();
        let spec = process.stdio.clone();
        let namespace = self.namespace.clone();
        let id = process.container_id.clone();
        let spawned = run_guarded(move || {
            let mut prepared = PreparedIo::prepare(&spec, &namespace, &id)
                .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
            let child = std::mem::take(&mut prepared.child);
            let spawned = run(engine.as_ref(), child).map_err(engine_error)?;
            Ok::<_, TaskError>((spawned, prepared))
        })
        .await
        .map_err(|e| TaskError::Internal(e.to_string()))??;
        let (spawned, prepared) = spawned;
        let pid = spawned.pid;
        let io = prepared
            .attach(spawned.console)
            .map_err(|e| TaskError::Internal(e.to_string()));
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        };
        process.set_created(pid as u32, io);
        if let Some(status) = self.exits.register(pid, process.clone()) {
            let process = process.clone();
            let sandbox = self.self_arc();
            tokio::spawn(async move {
                if let Some(sandbox) = sandbox {
                    sandbox.complete_exit(process, status).await
                }
            });
        }
        Ok(pid as u32)
    }

    fn self_arc(&self) -> Option<Arc<Self>> {
        self.this.upgrade()
    }
}

fn engine_error(e: EngineError) -> TaskError {
    match e {
        EngineError::NotFound { .. } => TaskError::NotFound(e.to_string()),
        other => TaskError::Internal(other.to_string()),
    }
}

fn validate_id(id: &str) -> TaskResult<()> {
    if id.is_empty()
        || id.len() > 1024
        || id == "."
        || id == ".."
        || id.contains('/')
        || id.chars().any(|c| c.is_control())
    {
        return Err(TaskError::InvalidArgument(format!(
            "invalid container id {id:?}: must be non-empty, without '/', control characters, or '.'/'..'"
        )));
    }
    Ok(())
}

#[async_trait]
impl Sandbox for NativeSandbox {
    async fn create(&self, req: CreateTaskRequest) -> TaskResult<u32> {
        validate_id(&req.id)?;
        if self.containers().contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Unimplemented(
                "restoring from a checkpoint is not supported by palisade".into(),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.join("config.json").is_file() {
            return Err(TaskError::InvalidArgument(format!(
                "bundle {} has no config.json",
                bundle.display()
            )));
        }
        let rootfs = rootfs::mount(&bundle, &req.rootfs)
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?;
        let stdio = StdioUris::from(&req);
        let init = Arc::new(Process::new(&req.id, "", stdio.clone(), None));
        let (id, bundle_for_engine, terminal) = (req.id.clone(), bundle.clone(), req.terminal);
        let pid = match self
            .spawn(&init, move |engine, io| {
                engine.create(&id, &bundle_for_engine, io, terminal)
            })
            .await
        {
            Ok(pid) => pid,
            Err(e) => {
                // Leave nothing behind: the runtime's state and the rootfs mount.
                let engine = self.engine.clone();
                let id = req.id.clone();
                let _ = run_guarded(move || engine.delete(&id, true)).await;
                if let Some(target) = &rootfs {
                    rootfs::unmount(target);
                }
                return Err(e);
            }
        };
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            rootfs,
            init,
            execs: Mutex::new(HashMap::new()),
            oom_watch: Mutex::new(None),
        });
        self.containers().insert(req.id.clone(), container);
        info!(id = %req.id, pid, "container created");
        self.events
            .publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: stdio.stdin,
                        stdout: stdio.stdout,
                        stderr: stdio.stderr,
                        terminal: stdio.terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(pid)
    }

    async fn start(&self, id: &str, exec_id: &str) -> TaskResult<u32> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if process.status() != Status::CREATED {
            return Err(TaskError::FailedPrecondition(format!(
                "process {} of {id} is {:?}, not created",
                process.event_id(),
                process.status()
            )));
        }
        if process.is_init() {
            let engine = self.engine.clone();
            let cid = id.to_string();
            run_guarded(move || engine.start(&cid))
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?
                .map_err(engine_error)?;
            process.set_status(Status::RUNNING);
            let pid = process.pid();
            let events = self.events.clone();
            let cid = id.to_string();
            *container
                .oom_watch
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = oom::watch(pid, move || {
                let events = events.clone();
                let cid = cid.clone();
                tokio::spawn(async move {
                    events
                        .publish(
                            topics::TASK_OOM_EVENT_TOPIC,
                            Box::new(TaskOOM {
                                container_id: cid,
                                ..Default::default()
                            }),
                        )
                        .await
                });
            });
            self.events
                .publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: id.to_string(),
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
            return Ok(pid);
        }

        if container.init.status() == Status::STOPPED {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} has stopped; cannot start exec {exec_id}"
            )));
        }
        let spec = process.spec_json.clone().unwrap_or_default();
        let (cid, bundle, terminal) = (
            id.to_string(),
            container.bundle.clone(),
            process.stdio.terminal,
        );
        let pid = match self
            .spawn(&process, move |engine, io| {
                engine.exec(&cid, &bundle, &spec, io, terminal)
            })
            .await
        {
            Ok(pid) => pid,
            Err(e) => {
                process.set_failed(128 + libc::SIGKILL as u32);
                return Err(e);
            }
        };
        process.set_status(Status::RUNNING);
        self.events
            .publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(pid)
    }

    async fn delete(&self, id: &str, exec_id: &str) -> TaskResult<DeleteResponse> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if matches!(process.status(), Status::RUNNING | Status::PAUSED) {
            return Err(TaskError::FailedPrecondition(format!(
                "process {} of {id} is still running; kill it first",
                process.event_id()
            )));
        }
        if !process.is_init() {
            container.execs().remove(exec_id);
            self.exits.unregister(process.pid() as i32);
            if let Some(io) = process.io() {
                io.abort().await;
            }
            let exit = process.exit();
            return Ok(DeleteResponse {
                pid: process.pid(),
                exit_status: exit.as_ref().map(|e| e.status).unwrap_or_default(),
                exited_at: MessageField::from_option(exit.map(|e| e.at)),
                ..Default::default()
            });
        }

        // A created-but-never-started init is killed by a forced delete; its exit is
        // still reaped and reported.
        let never_started = process.status() == Status::CREATED;
        let engine = self.engine.clone();
        let cid = id.to_string();
        run_guarded(move || engine.delete(&cid, true))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?
            .map_err(engine_error)?;
        if never_started {
            tokio::time::timeout(std::time::Duration::from_secs(5), process.wait())
                .await
                .ok();
        }
        if let Some(watch) = container
            .oom_watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            watch.abort();
        }
        if let Some(io) = process.io() {
            io.abort().await;
        }
        if let Some(target) = &container.rootfs {
            rootfs::unmount(target);
        }
        self.exits.unregister(process.pid() as i32);
        self.containers().remove(id);
        let exit = process.exit();
        let (exit_status, exited_at) = match exit {
            Some(e) => (e.status, e.at),
            None => (128 + libc::SIGKILL as u32, now()),
        };
        self.events
            .publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: id.to_string(),
                    pid: process.pid(),
                    exit_status,
                    exited_at: MessageField::some(exited_at.clone()),
                    id: id.to_string(),
                    ..Default::default()
                }),
            )
            .await;
        info!(id, "container deleted");
        Ok(DeleteResponse {
            pid: process.pid(),
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    async fn exec(&self, req: ExecProcessRequest) -> TaskResult<()> {
        let container = self.container(&req.id)?;
        validate_id(&req.exec_id).map_err(|_| {
            TaskError::InvalidArgument(format!("invalid exec id {:?}", req.exec_id))
        })?;
        if container.init.status() == Status::STOPPED {
            return Err(TaskError::FailedPrecondition(format!(
                "container {} has stopped",
                req.id
            )));
        }
        let spec = super::exec_process_spec(&req)?;
        {
            let mut execs = container.execs();
            if execs.contains_key(&req.exec_id) {
                return Err(TaskError::AlreadyExists(format!(
                    "exec {} already exists in {}",
                    req.exec_id, req.id
                )));
            }
            let stdio = StdioUris::from(&req);
            execs.insert(
                req.exec_id.clone(),
                Arc::new(Process::new(&req.id, &req.exec_id, stdio, Some(spec))),
            );
        }
        self.events
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> TaskResult<()> {
        let process = self.container(id)?.process(exec_id)?;
        let io = process
            .io()
            .ok_or_else(|| TaskError::FailedPrecondition("process has not been started".into()))?;
        io.resize(width, height)
            .map_err(|e| TaskError::FailedPrecondition(format!("resize: {e}")))
    }

    async fn close_io(&self, id: &str, exec_id: &str) -> TaskResult<()> {
        let process = self.container(id)?.process(exec_id)?;
        if let Some(io) = process.io() {
            io.close_stdin();
        }
        Ok(())
    }

    async fn state(&self, id: &str, exec_id: &str) -> TaskResult<StateResponse> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        Ok(process.state_response(&container.bundle.display().to_string()))
    }

    async fn pids(&self, id: &str) -> TaskResult<Vec<ProcessInfo>> {
        let container = self.container(id)?;
        let engine = self.engine.clone();
        let cid = id.to_string();
        let pids = run_guarded(move || engine.pids(&cid))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?
            .map_err(engine_error)?;
        let exec_pids: HashMap<u32, String> = container
            .execs()
            .values()
            .map(|p| (p.pid(), p.exec_id.clone()))
            .collect();
        Ok(pids
            .into_iter()
            .map(|pid| {
                let pid = pid as u32;
                let info = exec_pids.get(&pid).and_then(|exec_id| {
                    convert_to_any(Box::new(ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    }))
                    .ok()
                });
                ProcessInfo {
                    pid,
                    info: MessageField::from_option(info),
                    ..Default::default()
                }
            })
            .collect())
    }

    async fn pause(&self, id: &str) -> TaskResult<()> {
        let container = self.container(id)?;
        if container.init.status() != Status::RUNNING {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let engine = self.engine.clone();
        let cid = id.to_string();
        run_guarded(move || engine.pause(&cid))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?
            .map_err(engine_error)?;
        container.init.set_status(Status::PAUSED);
        self.events
            .publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn resume(&self, id: &str) -> TaskResult<()> {
        let container = self.container(id)?;
        if container.init.status() != Status::PAUSED {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is not paused"
            )));
        }
        let engine = self.engine.clone();
        let cid = id.to_string();
        run_guarded(move || engine.resume(&cid))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?
            .map_err(engine_error)?;
        container.init.set_status(Status::RUNNING);
        self.events
            .publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> TaskResult<()> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        let signal_number = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| TaskError::InvalidArgument(format!("invalid signal {signal}")))?;
        if process.is_init() {
            if process.status() == Status::STOPPED && !all {
                return Err(TaskError::NotFound(format!(
                    "process {id} already finished"
                )));
            }
            let engine = self.engine.clone();
            let cid = id.to_string();
            return match run_guarded(move || engine.kill(&cid, signal, all))
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?
            {
                Ok(()) => Ok(()),
                // The init may exit between the check above and the runtime's kill.
                Err(_) if process.status() == Status::STOPPED => Err(TaskError::NotFound(format!(
                    "process {id} already finished"
                ))),
                Err(e) => Err(engine_error(e)),
            };
        }
        match process.status() {
            Status::RUNNING | Status::PAUSED if process.pid() > 0 => {
                nix::sys::signal::kill(Pid::from_raw(process.pid() as i32), signal_number).map_err(
                    |e| match e {
                        nix::errno::Errno::ESRCH => {
                            TaskError::NotFound(format!("exec {exec_id} already finished"))
                        }
                        e => TaskError::Internal(format!("kill exec {exec_id}: {e}")),
                    },
                )
            }
            Status::CREATED => Err(TaskError::FailedPrecondition(format!(
                "exec {exec_id} has not been started"
            ))),
            _ => Err(TaskError::NotFound(format!(
                "exec {exec_id} already finished"
            ))),
        }
    }

    async fn wait(&self, id: &str, exec_id: &str) -> TaskResult<WaitResponse> {
        let process = self.container(id)?.process(exec_id)?;
        Ok(process.wait().await)
    }

    async fn stats(&self, id: &str) -> TaskResult<Any> {
        let container = self.container(id)?;
        let pid = container.init.pid();
        if container.init.status() == Status::STOPPED {
            return Err(TaskError::NotFound(format!("container {id} has stopped")));
        }
        tokio::task::spawn_blocking(move || stats::collect(pid))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?
            .map_err(TaskError::Internal)
    }

    async fn update(&self, id: &str, resources: &Any) -> TaskResult<()> {
        let container = self.container(id)?;
        if container.init.status() == Status::STOPPED {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} has stopped"
            )));
        }
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources.value).map_err(
            |e| TaskError::InvalidArgument(format!("update {id}: invalid LinuxResources: {e}")),
        )?;
        let engine = self.engine.clone();
        let (cid, json) = (id.to_string(), resources.value.clone());
        run_guarded(move || engine.update(&cid, &json))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?
            .map_err(engine_error)
    }

    async fn task_pid(&self, id: &str) -> Option<u32> {
        self.container(id).ok().map(|c| c.init.pid())
    }

    async fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }
}

/// The engine `config` selects, with its state root for containerd namespace `namespace`.
pub fn engine_from_config(
    config: &crate::config::Config,
    namespace: &str,
) -> Result<Arc<dyn Engine>, EngineError> {
    let root = config.runtime_root(namespace);
    Ok(match config.native.engine {
        crate::config::EngineKind::Library => Arc::new(library::LibraryEngine::new(&root)?),
        crate::config::EngineKind::Cli => Arc::new(engine::CliEngine::new(
            config.native.runtime_binary.clone(),
            root,
        )),
    })
}

/// Removes what a dead shim left of container `id`: the runtime's container (killing
/// its processes) and the rootfs mount in `bundle`. Used by `shim delete`.
pub fn cleanup_after_dead_shim(engine: &dyn Engine, id: &str, bundle: &Path) {
    if let Err(e) = engine.delete(id, true) {
        warn!("cleanup: deleting {id}: {e}");
    }
    rootfs::unmount(&bundle.join("rootfs"));
}
