//! containerd's Task API (v2/v3) on top of a pod [`Sandbox`].
//!
//! The sandbox is chosen at the pod's first Create, from the shim config and the pod's
//! annotations (see [`crate::config`]); every later request goes to it.

use std::{collections::HashMap, path::Path, sync::Arc};

use async_trait::async_trait;
use containerd_shim::{asynchronous::ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::{
    api::{
        CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
        CreateTaskResponse, DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest,
        PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
        StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
        UpdateTaskRequest, WaitRequest, WaitResponse,
    },
    protobuf::{well_known_types::empty::Empty, MessageField},
    shim_async::Task,
};
use tokio::sync::{mpsc, Mutex};
use tracing::{info, warn};

use crate::{
    config::{config_path_from_options, Config, Mode},
    events::EventSink,
    reaper::Exit,
    sandbox::{
        native::{engine_from_config, NativeSandbox},
        vm::VmSandbox,
        Sandbox, TaskError,
    },
};

pub struct TaskService {
    namespace: String,
    events: EventSink,
    sandbox: Mutex<Option<Arc<dyn Sandbox>>>,
    /// Exits from the reaper, handed to the pod's sandbox when it is made.
    reaped: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Exit>>>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        events: EventSink,
        reaped: mpsc::UnboundedReceiver<Exit>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            namespace: namespace.to_string(),
            events,
            sandbox: Mutex::new(None),
            reaped: std::sync::Mutex::new(Some(reaped)),
            exit,
        }
    }

    async fn sandbox(&self) -> Result<Arc<dyn Sandbox>, TaskError> {
        self.sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| TaskError::NotFound("no task has been created in this shim".into()))
    }

    /// The pod's sandbox, made on its first Create.
    async fn sandbox_for_create(
        &self,
        req: &CreateTaskRequest,
    ) -> Result<Arc<dyn Sandbox>, TaskError> {
        let mut slot = self.sandbox.lock().await;
        if let Some(sandbox) = slot.as_ref() {
            return Ok(sandbox.clone());
        }
        let explicit = config_path_from_options(req.options.as_ref())
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let config = Config::load(explicit.as_deref())
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let annotations = bundle_annotations(Path::new(&req.bundle))?;
        let mode = config
            .mode_for(&annotations)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let sandbox: Arc<dyn Sandbox> = match mode {
            Mode::Native => {
                let reaped = self
                    .reaped
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or_else(|| TaskError::Internal("reaper already taken".into()))?;
                let engine = engine_from_config(&config, &self.namespace)
                    .map_err(|e| TaskError::Internal(e.to_string()))?;
                NativeSandbox::new(engine, &self.namespace, self.events.clone(), reaped)
            }
            Mode::Vm => {
                // The VMM is the shim's child: its exit comes through the reaper.
                let reaped = self
                    .reaped
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or_else(|| TaskError::Internal("reaper already taken".into()))?;
                VmSandbox::new(config.vm.clone(), self.events.clone(), reaped)
            }
        };
        info!(%mode, "pod sandbox ready");
        *slot = Some(sandbox.clone());
        Ok(sandbox)
    }
}

/// The annotations of the bundle's config.json (the pod's, for a CRI sandbox container).
fn bundle_annotations(bundle: &Path) -> Result<HashMap<String, String>, TaskError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TaskError::InvalidArgument(format!("reading {}: {e}", path.display())))?;
    #[derive(serde::Deserialize)]
    struct Annotated {
        #[serde(default)]
        annotations: Option<HashMap<String, String>>,
    }
    let spec: Annotated = serde_json::from_str(&text)
        .map_err(|e| TaskError::InvalidArgument(format!("parsing {}: {e}", path.display())))?;
    Ok(spec.annotations.unwrap_or_default())
}

fn empty() -> Empty {
    Empty::default()
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let sandbox = self.sandbox_for_create(&req).await?;
        let id = req.id.clone();
        let pid = sandbox
            .create(req)
            .await
            .inspect_err(|e| warn!(%id, "create: {e}"))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.sandbox().await?.start(&req.id, &req.exec_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        Ok(self.sandbox().await?.delete(&req.id, &req.exec_id).await?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let processes = self.sandbox().await?.pids(&req.id).await?;
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.sandbox().await?.pause(&req.id).await?;
        Ok(empty())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.sandbox().await?.resume(&req.id).await?;
        Ok(empty())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(TaskError::Unimplemented("checkpoint is not supported by palisade".into()).into())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.sandbox()
            .await?
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(empty())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.sandbox().await?.exec(req).await?;
        Ok(empty())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.sandbox()
            .await?
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(empty())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.sandbox()
                .await?
                .close_io(&req.id, &req.exec_id)
                .await?;
        }
        Ok(empty())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources = req.resources.as_ref().ok_or_else(|| {
            TaskError::InvalidArgument("update request carries no resources".into())
        })?;
        self.sandbox().await?.update(&req.id, resources).await?;
        Ok(empty())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        Ok(self.sandbox().await?.wait(&req.id, &req.exec_id).await?)
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let stats = self.sandbox().await?.stats(&req.id).await?;
        Ok(StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.sandbox().await?.state(&req.id, &req.exec_id).await?)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = match self.sandbox.lock().await.clone() {
            Some(sandbox) => sandbox.task_pid(&req.id).await.unwrap_or_default(),
            None => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let sandbox = self.sandbox.lock().await.clone();
        let empty_pod = match sandbox {
            Some(sandbox) => sandbox.is_empty().await,
            None => true,
        };
        // One shim serves the whole pod: stay while any of its containers is left.
        if empty_pod {
            info!("last container gone, shim exits");
            self.exit.signal();
        }
        Ok(empty())
    }
}
