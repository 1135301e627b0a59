//! One guest process (a container's init or an exec) as the Task API sees it, with the
//! host ends of its stdio.

use std::sync::{Mutex, MutexGuard};

use containerd_shim_protos::{
    api::{StateResponse, Status, WaitResponse},
    protobuf::{well_known_types::timestamp::Timestamp, EnumOrUnknown, MessageField},
};
use tokio::{sync::watch, task::JoinHandle};

use super::stdio::StdinCopy;
use crate::sandbox::StdioUris;

#[derive(Debug, Clone)]
pub struct ExitInfo {
    pub status: u32,
    pub at: Timestamp,
}

#[derive(Debug)]
struct State {
    status: Status,
    pid: u32,
    exit: Option<ExitInfo>,
}

pub struct VmProcess {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: StdioUris,
    /// runtime-spec Process JSON of an exec, as containerd sent it.
    pub spec_json: Option<Vec<u8>>,
    state: Mutex<State>,
    stdin: Mutex<Option<StdinCopy>>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
    exited: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data stays valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmProcess {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioUris,
        spec_json: Option<Vec<u8>>,
    ) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            spec_json,
            state: Mutex::new(State {
                status: Status::CREATED,
                pid: 0,
                exit: None,
            }),
            stdin: Mutex::new(None),
            outputs: Mutex::new(Vec::new()),
            exited: watch::channel(false).0,
        }
    }

    pub fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    /// The id containerd uses for this process in events.
    pub fn event_id(&self) -> &str {
        if self.is_init() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn pid(&self) -> u32 {
        lock(&self.state).pid
    }

    pub fn status(&self) -> Status {
        lock(&self.state).status
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        lock(&self.state).exit.clone()
    }

    pub fn set_pid(&self, pid: u32) {
        lock(&self.state).pid = pid;
    }

    pub fn set_stdio(&self, stdin: Option<StdinCopy>, outputs: Vec<JoinHandle<()>>) {
        *lock(&self.stdin) = stdin;
        *lock(&self.outputs) = outputs;
    }

    /// Moves to `status` unless the process has exited meanwhile.
    pub fn set_status(&self, status: Status) {
        let mut state = lock(&self.state);
        if state.status != Status::STOPPED {
            state.status = status;
        }
    }

    /// Records the exit and wakes waiters. Returns false if it was already recorded.
    pub fn set_exited(&self, status: u32, at: Timestamp) -> bool {
        {
            let mut state = lock(&self.state);
            if state.exit.is_some() {
                return false;
            }
            state.status = Status::STOPPED;
            state.exit = Some(ExitInfo { status, at });
        }
        self.exited.send_replace(true);
        true
    }

    pub fn close_stdin(&self) {
        if let Some(stdin) = lock(&self.stdin).as_ref() {
            stdin.close();
        }
    }

    /// Waits (bounded) for the output copies to deliver everything the guest sent.
    pub async fn drain_output(&self, timeout: std::time::Duration) {
        let outputs: Vec<_> = lock(&self.outputs).drain(..).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        for handle in outputs {
            let abort = handle.abort_handle();
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                tracing::warn!(
                    container = %self.container_id,
                    "output copy did not finish in {timeout:?}, cancelling it"
                );
                abort.abort();
            }
        }
    }

    /// Stops every stdio copy at once (delete, VM gone).
    pub fn abort_stdio(&self) {
        if let Some(stdin) = lock(&self.stdin).take() {
            stdin.abort();
        }
        for handle in lock(&self.outputs).drain(..) {
            handle.abort();
        }
    }

    pub async fn wait(&self) -> WaitResponse {
        let mut rx = self.exited.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|exited| *exited).await;
        let exit = self.exit();
        WaitResponse {
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or_default(),
            exited_at: MessageField::from_option(exit.map(|e| e.at)),
            ..Default::default()
        }
    }

    pub fn state_response(&self, bundle: &str) -> StateResponse {
        let state = lock(&self.state);
        StateResponse {
            id: self.event_id().to_string(),
            bundle: bundle.to_string(),
            pid: state.pid,
            status: EnumOrUnknown::new(state.status),
            stdin: self.stdio.stdin.clone(),
            stdout: self.stdio.stdout.clone(),
            stderr: self.stdio.stderr.clone(),
            terminal: self.stdio.terminal,
            exit_status: state.exit.as_ref().map(|e| e.status).unwrap_or_default(),
            exited_at: MessageField::from_option(state.exit.as_ref().map(|e| e.at.clone())),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        }
    }
}
