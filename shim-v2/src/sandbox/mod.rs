//! A pod's sandbox: the isolation boundary its containers run in. Native mode runs them
//! on the host with `palisade-runtime`; VM mode runs them in a microVM through the
//! in-guest agent. The Task service talks to whichever [`Sandbox`] the pod's mode selects.

pub mod native;
pub mod vm;

use async_trait::async_trait;
use containerd_shim_protos::{
    api::{CreateTaskRequest, DeleteResponse, ExecProcessRequest, StateResponse, WaitResponse},
    protobuf::well_known_types::any::Any,
    types::task::ProcessInfo,
};

/// Why a task operation failed; mapped onto ttrpc status codes containerd understands.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<TaskError> for containerd_shim_protos::ttrpc::Error {
    fn from(e: TaskError) -> Self {
        use containerd_shim_protos::ttrpc::{get_status, Code, Error};
        let code = match &e {
            TaskError::NotFound(_) => Code::NOT_FOUND,
            TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            TaskError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Unavailable(_) => Code::UNAVAILABLE,
            TaskError::Internal(_) => Code::INTERNAL,
        };
        Error::RpcStatus(get_status(code, e.to_string()))
    }
}

pub type TaskResult<T> = Result<T, TaskError>;

/// The containers of one pod, managed inside one isolation boundary.
#[async_trait]
pub trait Sandbox: Send + Sync {
    async fn create(&self, req: CreateTaskRequest) -> TaskResult<u32>;
    async fn start(&self, id: &str, exec_id: &str) -> TaskResult<u32>;
    async fn delete(&self, id: &str, exec_id: &str) -> TaskResult<DeleteResponse>;
    async fn exec(&self, req: ExecProcessRequest) -> TaskResult<()>;
    async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> TaskResult<()>;
    async fn close_io(&self, id: &str, exec_id: &str) -> TaskResult<()>;
    async fn state(&self, id: &str, exec_id: &str) -> TaskResult<StateResponse>;
    async fn pids(&self, id: &str) -> TaskResult<Vec<ProcessInfo>>;
    async fn pause(&self, id: &str) -> TaskResult<()>;
    async fn resume(&self, id: &str) -> TaskResult<()>;
    async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> TaskResult<()>;
    async fn wait(&self, id: &str, exec_id: &str) -> TaskResult<WaitResponse>;
    /// cgroup metrics, packed as containerd's `io.containerd.cgroups.v1.Metrics` or
    /// `io.containerd.cgroups.v2.Metrics`.
    async fn stats(&self, id: &str) -> TaskResult<Any>;
    /// Applies runtime-spec `LinuxResources` (JSON, as containerd packs it).
    async fn update(&self, id: &str, resources: &Any) -> TaskResult<()>;
    /// Pid of container `id`'s init process, if it exists.
    async fn task_pid(&self, id: &str) -> Option<u32>;
    /// Whether no container is left (the shim may exit on Shutdown).
    async fn is_empty(&self) -> bool;
}

/// The stdio containerd asked for: FIFO (or `binary://`, `file://`) URIs and whether the
/// process gets a terminal. Both sandboxes take it from the Create/Exec request as is.
#[derive(Debug, Clone, Default)]
pub struct StdioUris {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl From<&CreateTaskRequest> for StdioUris {
    fn from(req: &CreateTaskRequest) -> Self {
        StdioUris {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        }
    }
}

impl From<&ExecProcessRequest> for StdioUris {
    fn from(req: &ExecProcessRequest) -> Self {
        StdioUris {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        }
    }
}

/// The OCI `Process` JSON of an exec request, checked to parse. Both sandboxes keep the raw
/// bytes (the runtime or the agent parses them again where it runs the process).
pub(crate) fn exec_process_spec(req: &ExecProcessRequest) -> Result<Vec<u8>, TaskError> {
    let spec = req
        .spec
        .as_ref()
        .map(|any| any.value.clone())
        .ok_or_else(|| TaskError::InvalidArgument("exec request has no process spec".into()))?;
    serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
        TaskError::InvalidArgument(format!("exec {}: invalid process spec: {e}", req.exec_id))
    })?;
    Ok(spec)
}
