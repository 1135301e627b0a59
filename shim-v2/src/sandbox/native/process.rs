//! One container process (a container's init or an exec) as the Task API sees it.

use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim_protos::{
    api::{StateResponse, Status, WaitResponse},
    protobuf::{well_known_types::timestamp::Timestamp, EnumOrUnknown, MessageField},
};
use tokio::sync::watch;

use super::stdio::ProcessStdio;
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

pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: StdioUris,
    /// runtime-spec Process JSON of an exec, as containerd sent it.
    pub spec_json: Option<Vec<u8>>,
    state: Mutex<State>,
    io: Mutex<Option<Arc<ProcessStdio>>>,
    exited: watch::Sender<bool>,
}

impl Process {
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
            io: Mutex::new(None),
            exited: watch::channel(false).0,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the state itself stays valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    /// The id containerd uses for this process in events (`exec_id`, or the container's).
    pub fn event_id(&self) -> &str {
        if self.is_init() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn pid(&self) -> u32 {
        self.state().pid
    }

    pub fn status(&self) -> Status {
        self.state().status
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.state().exit.clone()
    }

    /// Records the pid of the created process and its stdio copies.
    pub fn set_created(&self, pid: u32, io: ProcessStdio) {
        self.state().pid = pid;
        *self.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(io));
    }

    pub fn io(&self) -> Option<Arc<ProcessStdio>> {
        self.io.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Moves to `status` unless the process has exited meanwhile.
    pub fn set_status(&self, status: Status) {
        let mut state = self.state();
        if state.status != Status::STOPPED {
            state.status = status;
        }
    }

    /// Records the exit and wakes waiters. Returns false if it was already recorded.
    pub fn set_exited(&self, status: u32, at: Timestamp) -> bool {
        {
            let mut state = self.state();
            if state.exit.is_some() {
                return false;
            }
            state.status = Status::STOPPED;
            state.exit = Some(ExitInfo { status, at });
        }
        self.exited.send_replace(true);
        true
    }

    /// Marks a process that never ran (failed start) as stopped with `status`.
    pub fn set_failed(&self, status: u32) {
        self.set_exited(status, now());
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
        let state = self.state();
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

pub fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_the_recorded_exit_once() {
        let process = Arc::new(Process::new("c", "", StdioUris::default(), None));
        let waiter = {
            let process = process.clone();
            tokio::spawn(async move { process.wait().await })
        };
        process.set_status(Status::RUNNING);
        assert!(process.set_exited(137, now()));
        assert!(!process.set_exited(0, now()), "second exit must be ignored");
        let response = waiter.await.unwrap();
        assert_eq!(response.exit_status, 137);
        assert_eq!(process.status(), Status::STOPPED);
        process.set_status(Status::RUNNING);
        assert_eq!(process.status(), Status::STOPPED, "stopped is final");
        assert_eq!(process.state_response("/b").id, "c");
    }
}
