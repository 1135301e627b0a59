//! VM mode: the pod runs in one microVM. The first (sandbox) container boots it —
//! `palisade-vmm` with the configured guest kernel and initramfs, whose `/init` is
//! `palisade-agent` — and every container operation becomes an agent RPC over the VMM's
//! hybrid-vsock socket. The VM goes away with the pod's last container.
//!
//! Ownership: the shim spawns and reaps the VMM (its exit arrives through the shim's
//! reaper) and removes the VM's state dir (socket, drive images); the VMM dies with the
//! shim (`PR_SET_PDEATHSIG`), so a killed shim leaves no VM running.

pub mod agent;
pub mod cgroup;
pub mod disk;
pub mod mounts;
pub mod network;
pub mod process;
pub mod stdio;
pub mod vmm;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use async_trait::async_trait;
use containerd_shim::util::convert_to_any;
use containerd_shim_protos::{
    api::{
        CreateTaskRequest, DeleteResponse, ExecProcessRequest, StateResponse, Status, WaitResponse,
    },
    cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat},
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
        TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::{well_known_types::any::Any, MessageField},
    topics,
    types::task::ProcessInfo,
};
use palisade_agent_protocol::{
    agent::{
        storage, ContainerRequest, CreateContainerRequest, DestroySandboxRequest,
        ExecProcessRequest as AgentExecRequest, GetOomEventRequest, ProcessRequest,
        RemoveContainerRequest, SignalProcessRequest, Storage, TtyWinResizeRequest,
        UpdateContainerRequest,
    },
    agent_ttrpc::AgentClient,
};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use self::{
    agent::{deadline, long_poll},
    disk::Drives,
    network::PodNetwork,
    process::VmProcess,
    stdio::{Sink, StdinCopy, StreamOf},
    vmm::VmDir,
};
use super::{native::rootfs, Sandbox, StdioUris, TaskError, TaskResult};
use crate::{
    config::VmConfig,
    events::EventSink,
    reaper::{child_guard, run_guarded, Exit},
};

/// How long a process's output copies may take to deliver what the guest buffered at
/// its exit before the exit is reported anyway.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest gets to power off after DestroySandbox before the VMM is killed.
const VM_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Exit status reported for processes of a VM that died (128 + SIGKILL).
const VM_DIED_STATUS: u32 = 137;

fn now() -> containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A failed agent call as a Task API error.
fn agent_error(what: &str, e: ttrpc::Error) -> TaskError {
    use ttrpc::Code;
    match e {
        ttrpc::Error::RpcStatus(status) => {
            let message = format!("{what}: {}", status.message);
            match status.code() {
                Code::NOT_FOUND => TaskError::NotFound(message),
                Code::ALREADY_EXISTS => TaskError::AlreadyExists(message),
                Code::INVALID_ARGUMENT => TaskError::InvalidArgument(message),
                Code::FAILED_PRECONDITION => TaskError::FailedPrecondition(message),
                Code::UNIMPLEMENTED => TaskError::Unimplemented(message),
                Code::DEADLINE_EXCEEDED => {
                    TaskError::Unavailable(format!("{what}: the agent did not answer in time"))
                }
                _ => TaskError::Internal(message),
            }
        }
        other => TaskError::Unavailable(format!("{what}: agent unreachable: {other}")),
    }
}

/// The running microVM of the pod.
struct Vm {
    dir: VmDir,
    pid: u32,
    agent: Arc<AgentClient>,
    drives: Mutex<Drives>,
    /// The VMM's exit status once it exited.
    exited: watch::Sender<Option<u32>>,
    /// Set while the shim itself stops the VM (no "VM died" errors then).
    stopping: std::sync::atomic::AtomicBool,
    console_log: PathBuf,
    /// Why the VM died when it died under its tasks (see [`vmm::exit_reason`]).
    exit_reason: Mutex<Option<String>>,
    /// The bundle of the container that booted the VM (holds the network record).
    bundle: PathBuf,
    /// The pod's network mirrored into the VM (a netns in the spec); taken at teardown.
    network: Mutex<Option<PodNetwork>>,
    /// The VMM's own cgroup, removed with the VM.
    cgroup: Option<cgroup::VmmCgroup>,
}

impl Vm {
    fn alive(&self) -> bool {
        self.exited.borrow().is_none()
    }

    fn set_exit_reason(&self, reason: String) {
        *lock(&self.exit_reason) = Some(reason);
    }

    /// The error for a call that needs the VM after it exited.
    fn exited_error(&self) -> TaskError {
        let reason = lock(&self.exit_reason)
            .clone()
            .unwrap_or_else(|| "it has exited".into());
        TaskError::Unavailable(format!(
            "the pod's VM is gone: {reason} (see {})",
            self.console_log.display()
        ))
    }

    /// Waits (bounded) for the VMM to exit; true if it did.
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.subscribe();
        let exited = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some()))
            .await
            .is_ok();
        exited
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    init: Arc<VmProcess>,
    execs: Mutex<HashMap<String, Arc<VmProcess>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TaskResult<Arc<VmProcess>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of {} not found", self.id)))
    }
}

pub struct VmSandbox {
    config: VmConfig,
    events: EventSink,
    vm: tokio::sync::Mutex<Option<Arc<Vm>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Exits from the shim's reaper; the VMM's is the one that matters.
    reaped: Mutex<Option<mpsc::UnboundedReceiver<Exit>>>,
    this: Weak<VmSandbox>,
}

/// containerd ids that the agent accepts: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
fn validate_id(what: &str, id: &str) -> TaskResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(TaskError::InvalidArgument(format!(
            "invalid {what} {id:?} for VM mode: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        )));
    }
    Ok(())
}

/// The bundle's spec, to be sent to the guest once its bind mounts point at their guest
/// copies (see [`mounts`]).
fn guest_spec(bundle: &Path) -> TaskResult<serde_json::Value> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path)
        .map_err(|e| TaskError::InvalidArgument(format!("reading {}: {e}", path.display())))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| TaskError::InvalidArgument(format!("parsing {}: {e}", path.display())))?;
    network::guest_network_namespace(&mut spec);
    Ok(spec)
}

/// Kill's answer when the pod's VM cannot take a signal (`vm_error`: gone or not running).
/// A process already reported as exited is NotFound — a dead VM took every process of the
/// pod with it, so nothing is left to kill — which containerd's `WithProcessKill` (CRI runs
/// it, a kill --all of the init, before deleting a task after its exit) accepts. Any other
/// answer fails CRI's handling of the TaskExit: it retries forever, the container and pod
/// stay RUNNING/READY and StopContainer hangs.
fn kill_without_vm(process: &VmProcess, vm_error: TaskError) -> TaskError {
    if process.status() != Status::STOPPED {
        return vm_error;
    }
    TaskError::NotFound(format!(
        "process {} of {} already finished ({vm_error})",
        process.event_id(),
        process.container_id
    ))
}

/// Removes the VMM's cgroup (after the VMM exited), off the async workers.
async fn destroy_cgroup(cgroup: Option<cgroup::VmmCgroup>, bundle: &Path) {
    let Some(cgroup) = cgroup else {
        return;
    };
    let bundle = bundle.to_path_buf();
    if let Err(e) = tokio::task::spawn_blocking(move || cgroup.destroy(&bundle)).await {
        warn!("removing the VMM's cgroup: {e}");
    }
}

impl VmSandbox {
    pub fn new(
        config: VmConfig,
        events: EventSink,
        reaped: mpsc::UnboundedReceiver<Exit>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            config,
            events,
            vm: tokio::sync::Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            reaped: Mutex::new(Some(reaped)),
            this: this.clone(),
        })
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        lock(&self.containers)
    }

    fn container(&self, id: &str) -> TaskResult<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("container {id} not found")))
    }

    async fn running_vm(&self) -> TaskResult<Arc<Vm>> {
        let vm =
            self.vm.lock().await.clone().ok_or_else(|| {
                TaskError::FailedPrecondition("the pod's VM is not running".into())
            })?;
        if !vm.alive() {
            return Err(vm.exited_error());
        }
        Ok(vm)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.agent_timeout_secs.max(1))
    }

    /// Boots the pod's VM with `rootfs` (the sandbox container's mounted rootfs) written
    /// into drive 0, owned by container `id`.
    async fn boot(&self, id: &str, bundle: &Path, rootfs: &Path) -> TaskResult<Arc<Vm>> {
        vmm::check_config(&self.config)
            .map_err(|e| TaskError::FailedPrecondition(e.to_string()))?;
        let cgroup = self.vmm_cgroup(id, bundle).await?;
        let dir = match VmDir::create(&self.config.state_dir, &std::process::id().to_string()) {
            Ok(dir) => dir,
            Err(e) => {
                destroy_cgroup(cgroup, bundle).await;
                return Err(TaskError::Internal(e.to_string()));
            }
        };
        // A network namespace in the spec (CNI pod, `ctr run --with-ns network:..`): mirror
        // its interfaces to taps the VMM serves to the guest. None: no NIC, as before.
        let mut network = match network::netns_of_bundle(bundle)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))
        {
            Ok(Some(netns)) => match PodNetwork::setup_async(netns).await {
                Ok(pod_network) => {
                    if let Err(e) = pod_network.write_record(bundle) {
                        warn!("{e}");
                    }
                    Some(pod_network)
                }
                Err(e) => {
                    destroy_cgroup(cgroup, bundle).await;
                    dir.remove();
                    return Err(TaskError::Internal(e.to_string()));
                }
            },
            Ok(None) => None,
            Err(e) => {
                destroy_cgroup(cgroup, bundle).await;
                dir.remove();
                return Err(e);
            }
        };
        match self
            .boot_in(&dir, id, bundle, rootfs, cgroup.clone(), &mut network)
            .await
        {
            Ok(vm) => Ok(vm),
            Err(e) => {
                if let Some(network) = network {
                    network.teardown_async(bundle).await;
                }
                destroy_cgroup(cgroup, bundle).await;
                dir.remove();
                let _ = std::fs::remove_file(bundle.join(vmm::RECORD_FILE));
                Err(e)
            }
        }
    }

    /// Creates the VMM's cgroup (see [`cgroup`]) unless the config turns it off.
    async fn vmm_cgroup(&self, id: &str, bundle: &Path) -> TaskResult<Option<cgroup::VmmCgroup>> {
        if !self.config.vmm_cgroup {
            return Ok(None);
        }
        let spec = guest_spec(bundle)?;
        let container_path = spec
            .pointer("/linux/cgroupsPath")
            .and_then(|p| p.as_str())
            .map(str::to_owned);
        let path = cgroup::vmm_cgroups_path(container_path.as_deref(), id);
        let (config, bundle) = (self.config.clone(), bundle.to_path_buf());
        let created = tokio::task::spawn_blocking(move || {
            let cgroup = cgroup::VmmCgroup::create(&config, &path)?;
            if let Err(e) = cgroup.write_record(&bundle) {
                cgroup.destroy(&bundle);
                return Err(cgroup::VmmCgroupError::Other {
                    path,
                    why: format!("recording it in the bundle: {e}"),
                });
            }
            Ok(cgroup)
        })
        .await
        .map_err(|e| TaskError::Internal(e.to_string()))?
        .map_err(|e| TaskError::FailedPrecondition(e.to_string()))?;
        info!(cgroup = created.path(), "VMM cgroup created");
        Ok(Some(created))
    }

    async fn boot_in(
        &self,
        dir: &VmDir,
        id: &str,
        bundle: &Path,
        rootfs: &Path,
        cgroup: Option<cgroup::VmmCgroup>,
        network: &mut Option<PodNetwork>,
    ) -> TaskResult<Arc<Vm>> {
        let started = std::time::Instant::now();
        let images: Vec<PathBuf> = (0..=self.config.spare_disks as usize)
            .map(|i| dir.drive_image(i))
            .collect();
        let (first, spares) = (images[0].clone(), images[1..].to_vec());
        let (rootfs_dir, spare_mib) = (rootfs.to_path_buf(), self.config.disk_size_mib);
        run_guarded(move || {
            disk::create_sparse(&first, disk::fitting_size_mib(&rootfs_dir))?;
            disk::write_ext4(&rootfs_dir, &first)?;
            for spare in &spares {
                disk::create_sparse(spare, spare_mib)?;
            }
            Ok::<_, disk::DiskError>(())
        })
        .await
        .map_err(|e| TaskError::Internal(e.to_string()))?
        .map_err(|e| TaskError::Internal(format!("rootfs image: {e}")))?;
        let image_ms = started.elapsed().as_millis();

        let mut cmd = vmm::command(&self.config, dir, &images, bundle);
        if let Some(network) = network.as_ref() {
            cmd.args(network.vmm_args());
            // The VMM opens the taps by name in its own network namespace: the pod's.
            if let Some(fd) = network.netns_fd() {
                use std::os::unix::process::CommandExt;
                // SAFETY: setns(2) is a plain syscall on an fd the shim keeps open until
                // the child has exec'd; nothing is allocated in the forked child.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        // The VMM dies with the shim. The parent-death signal follows the forking
        // *thread*: this runs on the runtime's main thread (current-thread runtime),
        // which lives as long as the shim; the child guard keeps the reaper from
        // collecting the child's exec failure before `spawn` does.
        {
            use std::os::unix::process::CommandExt;
            let shim_pid = nix::unistd::getpid().as_raw();
            // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid are async-signal-safe and take
            // or return integers.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // A shim killed between fork and prctl sends no death signal: the
                    // child has been reparented already and must not start a VM (a raw
                    // errno: no allocation after fork).
                    if libc::getppid() != shim_pid {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        if let Some(cgroup) = &cgroup {
            cgroup
                .join_on_exec(&mut cmd)
                .map_err(|e| TaskError::Internal(e.to_string()))?;
        }
        let pid = {
            let _guard = child_guard().await;
            vmm::spawn(cmd, bundle).map_err(|e| TaskError::Internal(e.to_string()))?
        };
        if let Some(network) = network.as_mut() {
            // The VMM is in the namespace now; the shim must not keep it alive.
            network.release_netns();
        }
        let mut drives = Drives::new(images);
        drives
            .claim(id)
            .map_err(|e| TaskError::Internal(e.to_string()))?;
        let (exited, _) = watch::channel(None);
        let reaped = lock(&self.reaped).take();
        if let Some(mut reaped) = reaped {
            let exited = exited.clone();
            tokio::spawn(async move {
                while let Some(exit) = reaped.recv().await {
                    if exit.pid as u32 == pid {
                        exited.send_replace(Some(exit.status));
                    }
                }
            });
        }
        if let Err(e) = vmm::write_record(bundle, dir, pid) {
            vmm::kill(pid);
            return Err(TaskError::Internal(e.to_string()));
        }
        let socket = dir.vsock_socket();
        let boot_timeout = Duration::from_secs(self.config.boot_timeout_secs.max(1));
        let alive = {
            let rx = exited.subscribe();
            move || rx.borrow().is_none()
        };
        let client = match agent::wait_ready(&socket, boot_timeout, alive).await {
            Ok(client) => client,
            Err(e) => {
                vmm::kill(pid);
                let mut rx = exited.subscribe();
                let _ = tokio::time::timeout(VM_STOP_TIMEOUT, rx.wait_for(|s| s.is_some())).await;
                let console = bundle.join(vmm::CONSOLE_LOG);
                return Err(TaskError::Unavailable(format!(
                    "VM did not come up: {e}; VMM log: [{}]; last console lines: [{}]; see {} and {}",
                    vmm::tail(&bundle.join(vmm::VMM_LOG), 5),
                    vmm::tail(&console, 15),
                    console.display(),
                    bundle.join(vmm::VMM_LOG).display()
                )));
            }
        };
        if let Some(network) = network.as_ref() {
            if let Err(e) = network.configure_guest(&client, self.timeout()).await {
                vmm::kill(pid);
                let mut rx = exited.subscribe();
                let _ = tokio::time::timeout(VM_STOP_TIMEOUT, rx.wait_for(|s| s.is_some())).await;
                return Err(TaskError::Internal(e.to_string()));
            }
        }
        info!(
            pid,
            image_ms,
            ready_ms = started.elapsed().as_millis() as u64,
            "microVM ready"
        );
        let vm = Arc::new(Vm {
            dir: dir.clone(),
            pid,
            agent: Arc::new(client),
            drives: Mutex::new(drives),
            exited,
            stopping: std::sync::atomic::AtomicBool::new(false),
            console_log: bundle.join(vmm::CONSOLE_LOG),
            exit_reason: Mutex::new(None),
            bundle: bundle.to_path_buf(),
            network: Mutex::new(network.take()),
            cgroup,
        });
        self.watch_vm(&vm);
        self.watch_oom(&vm);
        Ok(vm)
    }

    /// Reports every process of the pod as exited if the VMM dies under them.
    fn watch_vm(&self, vm: &Arc<Vm>) {
        let weak = self.this.clone();
        let vm = vm.clone();
        tokio::spawn(async move {
            let mut rx = vm.exited.subscribe();
            let Ok(status) = rx.wait_for(|s| s.is_some()).await.map(|s| *s) else {
                return;
            };
            if vm.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            // The taps serve no one now.
            let network = lock(&vm.network).take();
            if let Some(network) = network {
                network.teardown_async(&vm.bundle).await;
            }
            let Some(sandbox) = weak.upgrade() else {
                return;
            };
            let reason = vmm::exit_reason(status.unwrap_or_default(), &vm.console_log);
            error!(
                vmm_pid = vm.pid,
                console = %vm.console_log.display(),
                "the pod's microVM exited unexpectedly: {reason}; its processes are reported as killed"
            );
            vm.set_exit_reason(reason);
            let containers: Vec<_> = sandbox.containers().values().cloned().collect();
            for container in containers {
                let execs: Vec<_> = lock(&container.execs).values().cloned().collect();
                for process in execs.into_iter().chain([container.init.clone()]) {
                    process.abort_stdio();
                    sandbox.report_exit(&process, VM_DIED_STATUS).await;
                }
            }
        });
    }

    /// Forwards the guest's OOM kills as TaskOOM events.
    fn watch_oom(&self, vm: &Arc<Vm>) {
        let events = self.events.clone();
        let vm = vm.clone();
        tokio::spawn(async move {
            while vm.alive() {
                match vm
                    .agent
                    .get_oom_event(long_poll(), &GetOomEventRequest::new())
                    .await
                {
                    Ok(event) => {
                        events
                            .publish(
                                topics::TASK_OOM_EVENT_TOPIC,
                                Box::new(TaskOOM {
                                    container_id: event.container_id,
                                    ..Default::default()
                                }),
                            )
                            .await
                    }
                    Err(_) => return,
                }
            }
        });
    }

    /// Records an exit and publishes TaskExit (once per process).
    async fn report_exit(&self, process: &VmProcess, status: u32) {
        let at = now();
        if !process.set_exited(status, at.clone()) {
            return;
        }
        info!(
            container = %process.container_id,
            exec = %process.exec_id,
            status,
            "process exited"
        );
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

    /// Starts the stdio copies of `process` and the task that waits for its exit.
    fn attach(&self, vm: &Arc<Vm>, process: &Arc<VmProcess>) -> TaskResult<()> {
        let of = StreamOf {
            agent: vm.agent.clone(),
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone(),
            rpc_timeout: self.timeout(),
        };
        let invalid = |e: stdio::StdioError| TaskError::InvalidArgument(e.to_string());
        let mut outputs = Vec::new();
        if let Some(sink) = Sink::parse(&process.stdio.stdout).map_err(invalid)? {
            outputs.push(stdio::copy_output(of.clone(), false, sink).map_err(invalid)?);
        }
        // A terminal merges stderr into its output.
        if !process.stdio.terminal {
            if let Some(sink) = Sink::parse(&process.stdio.stderr).map_err(invalid)? {
                outputs.push(stdio::copy_output(of.clone(), true, sink).map_err(invalid)?);
            }
        }
        let stdin = if process.stdio.stdin.is_empty() {
            None
        } else {
            Some(StdinCopy::start(of, PathBuf::from(&process.stdio.stdin)).map_err(invalid)?)
        };
        process.set_stdio(stdin, outputs);

        let weak = self.this.clone();
        let (vm, process) = (vm.clone(), process.clone());
        tokio::spawn(async move {
            let request = ProcessRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
                ..Default::default()
            };
            let status = match vm.agent.wait_process(long_poll(), &request).await {
                Ok(exit) => u32::try_from(exit.exit_status).unwrap_or(VM_DIED_STATUS),
                Err(e) => {
                    // The VM's death is reported by the VM watch with its own message.
                    if vm.wait_exit(Duration::from_secs(1)).await {
                        return;
                    }
                    warn!(container = %process.container_id, exec = %process.exec_id, "waiting for the guest process: {e}");
                    VM_DIED_STATUS
                }
            };
            process.drain_output(OUTPUT_DRAIN_TIMEOUT).await;
            if let Some(sandbox) = weak.upgrade() {
                sandbox.report_exit(&process, status).await;
            }
        });
        Ok(())
    }

    /// Writes `rootfs` into a drive for container `id`: the VM's first drive when this
    /// container boots it, a spare drive otherwise. Returns the VM and the guest device.
    async fn vm_with_rootfs(
        &self,
        id: &str,
        bundle: &Path,
        rootfs: &Path,
    ) -> TaskResult<(Arc<Vm>, String)> {
        let mut slot = self.vm.lock().await;
        if let Some(vm) = slot.as_ref() {
            if !vm.alive() {
                return Err(vm.exited_error());
            }
            let vm = vm.clone();
            drop(slot);
            let drive = lock(&vm.drives)
                .claim(id)
                .map_err(|e| TaskError::FailedPrecondition(e.to_string()))?;
            let (rootfs_dir, image) = (rootfs.to_path_buf(), drive.image.clone());
            let written = run_guarded(move || disk::write_ext4(&rootfs_dir, &image))
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))
                .and_then(|r| r.map_err(|e| TaskError::Internal(format!("rootfs image: {e}"))));
            if let Err(e) = written {
                lock(&vm.drives).release(id);
                return Err(e);
            }
            return Ok((vm, drive.guest_device));
        }
        let vm = self.boot(id, bundle, rootfs).await?;
        *slot = Some(vm.clone());
        Ok((vm, disk::guest_device(0)))
    }

    /// Stops the VM: DestroySandbox, then the VMM must exit (killed if it does not), and
    /// its state dir goes.
    async fn destroy_vm(&self, bundle: &Path) {
        let Some(vm) = self.vm.lock().await.take() else {
            return;
        };
        vm.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        if vm.alive() {
            if let Err(e) = vm
                .agent
                .destroy_sandbox(deadline(self.timeout()), &DestroySandboxRequest::new())
                .await
            {
                warn!("DestroySandbox: {e}");
            }
            if !vm.wait_exit(VM_STOP_TIMEOUT).await {
                warn!(
                    pid = vm.pid,
                    "the VMM did not exit after DestroySandbox; killing it"
                );
                vmm::kill(vm.pid);
                if !vm.wait_exit(VM_STOP_TIMEOUT).await {
                    error!(pid = vm.pid, "the VMM did not exit after SIGKILL");
                }
            }
        }
        let network = lock(&vm.network).take();
        if let Some(network) = network {
            network.teardown_async(bundle).await;
        }
        destroy_cgroup(vm.cgroup.clone(), bundle).await;
        vm.dir.remove();
        let _ = std::fs::remove_file(bundle.join(vmm::RECORD_FILE));
        info!(pid = vm.pid, "microVM removed");
    }
}

#[async_trait]
impl Sandbox for VmSandbox {
    async fn create(&self, req: CreateTaskRequest) -> TaskResult<u32> {
        validate_id("container id", &req.id)?;
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
        let mut spec = guest_spec(&bundle)?;
        // Read the bind mounts' host side before booting anything: a mount that cannot be
        // copied fails the create up front.
        let copies = {
            let (spec, bundle) = (spec.clone(), bundle.clone());
            tokio::task::spawn_blocking(move || mounts::collect(&spec, &bundle))
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?
                .map_err(|e| TaskError::InvalidArgument(e.to_string()))?
        };
        // The rootfs is mounted on the host only while its image is written.
        let mounted = rootfs::mount(&bundle, &req.rootfs)
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?;
        let rootfs_dir = bundle.join("rootfs");
        let vm = self.vm_with_rootfs(&req.id, &bundle, &rootfs_dir).await;
        if let Some(target) = &mounted {
            rootfs::unmount(target);
        }
        let (vm, device) = vm?;

        let stdio = StdioUris::from(&req);
        let mut rootfs_storage = Storage::new();
        rootfs_storage.source = Some(storage::Source::BlockDevice(device));
        rootfs_storage.fstype = "ext4".into();
        let created = async {
            let sources =
                mounts::copy_into_guest(&vm.agent, self.timeout(), &req.id, &copies).await?;
            mounts::rewrite(&mut spec, &sources);
            let request = CreateContainerRequest {
                container_id: req.id.clone(),
                spec_json: serde_json::to_vec(&spec)
                    .map_err(|e| TaskError::Internal(e.to_string()))?,
                rootfs: MessageField::some(rootfs_storage),
                stdin: !req.stdin.is_empty(),
                ..Default::default()
            };
            vm.agent
                .create_container(deadline(self.timeout()), &request)
                .await
                .map_err(|e| agent_error("CreateContainer", e))
        }
        .await;
        let pid = match created {
            Ok(response) => response.pid,
            Err(e) => {
                if !copies.is_empty() {
                    // Drops the copies of a container that was not created (NOT_FOUND).
                    let request = RemoveContainerRequest {
                        container_id: req.id.clone(),
                        force: true,
                        ..Default::default()
                    };
                    let _ = vm
                        .agent
                        .remove_container(deadline(self.timeout()), &request)
                        .await;
                }
                lock(&vm.drives).release(&req.id);
                if self.containers().is_empty() {
                    self.destroy_vm(&bundle).await;
                }
                return Err(e);
            }
        };
        let init = Arc::new(VmProcess::new(&req.id, "", stdio.clone(), None));
        init.set_pid(pid);
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            init: init.clone(),
            execs: Mutex::new(HashMap::new()),
        });
        self.containers().insert(req.id.clone(), container);
        if let Err(e) = self.attach(&vm, &init) {
            let _ = self.delete_container(&req.id, true).await;
            return Err(e);
        }
        info!(id = %req.id, guest_pid = pid, "container created in the microVM");
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
        let vm = self.running_vm().await?;
        if process.is_init() {
            let request = ContainerRequest {
                container_id: id.to_string(),
                ..Default::default()
            };
            vm.agent
                .start_container(deadline(self.timeout()), &request)
                .await
                .map_err(|e| agent_error("StartContainer", e))?;
            process.set_status(Status::RUNNING);
            let pid = process.pid();
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
        let request = AgentExecRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process_json: process.spec_json.clone().unwrap_or_default(),
            tty: process.stdio.terminal,
            stdin: !process.stdio.stdin.is_empty(),
            ..Default::default()
        };
        let pid = match vm
            .agent
            .exec_process(deadline(self.timeout()), &request)
            .await
        {
            Ok(response) => response.pid,
            Err(e) => {
                process.set_exited(128 + libc::SIGKILL as u32, now());
                return Err(agent_error("ExecProcess", e));
            }
        };
        process.set_pid(pid);
        self.attach(&vm, &process)?;
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
            lock(&container.execs).remove(exec_id);
            process.abort_stdio();
            let exit = process.exit();
            return Ok(DeleteResponse {
                pid: process.pid(),
                exit_status: exit.as_ref().map(|e| e.status).unwrap_or_default(),
                exited_at: MessageField::from_option(exit.map(|e| e.at)),
                ..Default::default()
            });
        }
        self.delete_container(id, process.status() == Status::CREATED)
            .await?;
        let (exit_status, exited_at) = match process.exit() {
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
        validate_id("exec id", &req.exec_id)?;
        if container.init.status() == Status::STOPPED {
            return Err(TaskError::FailedPrecondition(format!(
                "container {} has stopped",
                req.id
            )));
        }
        let spec = super::exec_process_spec(&req)?;
        {
            let mut execs = lock(&container.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(TaskError::AlreadyExists(format!(
                    "exec {} already exists in {}",
                    req.exec_id, req.id
                )));
            }
            let stdio = StdioUris::from(&req);
            execs.insert(
                req.exec_id.clone(),
                Arc::new(VmProcess::new(&req.id, &req.exec_id, stdio, Some(spec))),
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
        if !process.stdio.terminal {
            return Err(TaskError::FailedPrecondition(format!(
                "process {} of {id} has no terminal",
                process.event_id()
            )));
        }
        let vm = self.running_vm().await?;
        let request = TtyWinResizeRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            rows: height,
            columns: width,
            ..Default::default()
        };
        vm.agent
            .tty_win_resize(deadline(self.timeout()), &request)
            .await
            .map_err(|e| agent_error("TtyWinResize", e))?;
        Ok(())
    }

    async fn close_io(&self, id: &str, exec_id: &str) -> TaskResult<()> {
        self.container(id)?.process(exec_id)?.close_stdin();
        Ok(())
    }

    async fn state(&self, id: &str, exec_id: &str) -> TaskResult<StateResponse> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        Ok(process.state_response(&container.bundle.display().to_string()))
    }

    async fn pids(&self, id: &str) -> TaskResult<Vec<ProcessInfo>> {
        self.container(id)?;
        let vm = self.running_vm().await?;
        let request = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        let pids = vm
            .agent
            .list_processes(deadline(self.timeout()), &request)
            .await
            .map_err(|e| agent_error("ListProcesses", e))?;
        Ok(pids
            .pids
            .into_iter()
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
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
        let vm = self.running_vm().await?;
        let request = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        vm.agent
            .pause_container(deadline(self.timeout()), &request)
            .await
            .map_err(|e| agent_error("PauseContainer", e))?;
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
        let vm = self.running_vm().await?;
        let request = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        vm.agent
            .resume_container(deadline(self.timeout()), &request)
            .await
            .map_err(|e| agent_error("ResumeContainer", e))?;
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
        if !(1..=64).contains(&signal) {
            return Err(TaskError::InvalidArgument(format!(
                "invalid signal {signal}"
            )));
        }
        match process.status() {
            Status::STOPPED if !(process.is_init() && all) => {
                return Err(TaskError::NotFound(format!(
                    "process {} of {id} already finished",
                    process.event_id()
                )))
            }
            Status::CREATED if !process.is_init() => {
                return Err(TaskError::FailedPrecondition(format!(
                    "exec {exec_id} has not been started"
                )))
            }
            _ => {}
        }
        let vm = self
            .running_vm()
            .await
            .map_err(|e| kill_without_vm(&process, e))?;
        let request = SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        match vm
            .agent
            .signal_process(deadline(self.timeout()), &request)
            .await
        {
            Ok(_) => Ok(()),
            // The process may exit between the check above and the guest's kill.
            Err(_) if process.status() == Status::STOPPED => Err(TaskError::NotFound(format!(
                "process {} of {id} already finished",
                process.event_id()
            ))),
            Err(e) => Err(agent_error("SignalProcess", e)),
        }
    }

    async fn wait(&self, id: &str, exec_id: &str) -> TaskResult<WaitResponse> {
        let process = self.container(id)?.process(exec_id)?;
        Ok(process.wait().await)
    }

    async fn stats(&self, id: &str) -> TaskResult<Any> {
        let container = self.container(id)?;
        if container.init.status() == Status::STOPPED {
            return Err(TaskError::NotFound(format!("container {id} has stopped")));
        }
        let vm = self.running_vm().await?;
        let request = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        let stats = vm
            .agent
            .stats_container(deadline(self.timeout()), &request)
            .await
            .map_err(|e| agent_error("StatsContainer", e))?;
        // The guest runs a pure cgroup2 hierarchy: containerd's v2 metrics.
        let cpu = stats.cpu.clone().unwrap_or_default();
        let memory = stats.memory.clone().unwrap_or_default();
        let pids = stats.pids.clone().unwrap_or_default();
        let metrics = Metrics {
            cpu: MessageField::some(CPUStat {
                usage_usec: cpu.usage_ns / 1000,
                user_usec: cpu.user_ns / 1000,
                system_usec: cpu.system_ns / 1000,
                nr_periods: cpu.nr_periods,
                nr_throttled: cpu.nr_throttled,
                throttled_usec: cpu.throttled_ns / 1000,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: memory.usage_bytes,
                usage_limit: memory.limit_bytes,
                anon: memory.anon_bytes,
                file: memory.file_bytes,
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: pids.current,
                limit: pids.limit,
                ..Default::default()
            }),
            ..Default::default()
        };
        convert_to_any(Box::new(metrics)).map_err(|e| TaskError::Internal(e.to_string()))
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
        let vm = self.running_vm().await?;
        let request = UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json: resources.value.clone(),
            ..Default::default()
        };
        vm.agent
            .update_container(deadline(self.timeout()), &request)
            .await
            .map_err(|e| agent_error("UpdateContainer", e))?;
        Ok(())
    }

    async fn task_pid(&self, id: &str) -> Option<u32> {
        self.container(id).ok().map(|c| c.init.pid())
    }

    async fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }
}

impl VmSandbox {
    /// Removes container `id` from the guest and the pod (its drive is freed); the VM
    /// goes with the pod's last container. `force` kills a created-but-not-started init.
    async fn delete_container(&self, id: &str, force: bool) -> TaskResult<()> {
        let container = self.container(id)?;
        let vm = self.vm.lock().await.clone();
        if let Some(vm) = vm.as_ref().filter(|vm| vm.alive()) {
            let request = RemoveContainerRequest {
                container_id: id.to_string(),
                force: true,
                ..Default::default()
            };
            match vm
                .agent
                .remove_container(deadline(self.timeout()), &request)
                .await
            {
                Ok(_) => {}
                // Gone from the guest already: nothing to remove there.
                Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::NOT_FOUND => {}
                Err(e) => return Err(agent_error("RemoveContainer", e)),
            }
            if force {
                // A never-started init is killed by the removal; report its exit.
                self.report_exit(&container.init, 128 + libc::SIGKILL as u32)
                    .await;
            }
        }
        let execs: Vec<_> = lock(&container.execs).drain().map(|(_, p)| p).collect();
        for process in execs.into_iter().chain([container.init.clone()]) {
            process.abort_stdio();
        }
        self.containers().remove(id);
        if let Some(vm) = vm {
            let image = lock(&vm.drives).release(id);
            if self.containers().is_empty() {
                self.destroy_vm(&container.bundle).await;
            } else if let Some(image) = image {
                // Give the space back; the drive keeps its size for the next container.
                let size = self.config.disk_size_mib;
                let emptied = tokio::task::spawn_blocking(move || {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&image)
                        .and_then(|f| f.set_len(0).and_then(|()| f.set_len(size << 20)))
                })
                .await;
                if !matches!(emptied, Ok(Ok(()))) {
                    warn!(id, "could not empty the container's drive image");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn killing_an_exited_process_of_a_dead_vm_is_not_found() {
        let gone = || TaskError::Unavailable("the pod's VM is gone: killed by signal 9".into());
        let init = VmProcess::new("c1", "", StdioUris::default(), None);
        init.set_status(Status::RUNNING);
        // Still running as far as the shim knows: the VM's error stands.
        assert!(matches!(
            kill_without_vm(&init, gone()),
            TaskError::Unavailable(_)
        ));
        // Reported exited (137 after the VMM died): NotFound, which WithProcessKill accepts.
        assert!(init.set_exited(137, now()));
        match kill_without_vm(&init, gone()) {
            TaskError::NotFound(m) => {
                assert!(m.contains("c1") && m.contains("killed by signal 9"), "{m}")
            }
            other => panic!("want NotFound, got {other:?}"),
        }
        let exec = VmProcess::new("c1", "e1", StdioUris::default(), None);
        assert!(exec.set_exited(137, now()));
        let not_running = TaskError::FailedPrecondition("the pod's VM is not running".into());
        assert!(matches!(
            kill_without_vm(&exec, not_running),
            TaskError::NotFound(m) if m.contains("e1")
        ));
    }

    #[test]
    fn ids_the_agent_rejects_are_refused_up_front() {
        assert!(validate_id("container id", "busybox-1.a_b").is_ok());
        assert!(validate_id("container id", &"a".repeat(128)).is_ok());
        for bad in ["", "-a", "a/b", "a b", &"a".repeat(129)] {
            let err = validate_id("container id", bad).unwrap_err().to_string();
            assert!(err.contains("container id"), "{err}");
        }
    }

    #[test]
    fn the_guest_spec_keeps_bind_mounts_and_names_bad_json() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::write(
            bundle.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","mounts":[
                {"destination":"/proc","type":"proc","source":"proc"},
                {"destination":"/etc/hosts","type":"bind","source":"/etc/hosts","options":["rbind"]}
            ]}"#,
        )
        .unwrap();
        let spec = guest_spec(bundle.path()).unwrap();
        assert_eq!(spec["mounts"].as_array().unwrap().len(), 2);
        assert!(mounts::is_bind(&spec["mounts"][1]));
        std::fs::write(bundle.path().join("config.json"), "{").unwrap();
        let err = guest_spec(bundle.path()).unwrap_err();
        assert!(
            matches!(&err, TaskError::InvalidArgument(m) if m.contains("config.json")),
            "{err}"
        );
    }

    #[test]
    fn agent_status_codes_map_to_task_errors() {
        let status = ttrpc::get_status(ttrpc::Code::NOT_FOUND, "container \"x\"");
        assert!(matches!(
            agent_error("StartContainer", ttrpc::Error::RpcStatus(status)),
            TaskError::NotFound(m) if m.contains("StartContainer")
        ));
        assert!(matches!(
            agent_error("Check", ttrpc::Error::LocalClosed),
            TaskError::Unavailable(_)
        ));
    }
}
