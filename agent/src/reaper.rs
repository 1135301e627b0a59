//! Reaping children and routing their exit statuses.
//!
//! Container processes are direct children of the agent (the runtime forks them with
//! `CLONE_PARENT`), and in the guest the agent is PID 1, so it also inherits every orphan.
//! One task reaps with `waitpid(-1)` on `SIGCHLD` and hands each registered pid's status to
//! its waiters.
//!
//! The runtime library itself `waitpid`s specific children it forks (its intermediate
//! process, hook processes). A concurrent `waitpid(-1)` would steal those, so every runtime
//! call that forks runs while holding the [`Reaper::lock`] guard, which the reaping task also
//! takes; the caller registers the new process's pid through the same guard, so an exit can
//! never be reaped before someone is waiting for it. Sending a signal to a registered pid also
//! happens under the guard: an unreaped pid cannot have been reused.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{watch, Mutex, OwnedMutexGuard},
};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal number for a process killed by a signal.
    pub code: i32,
    pub at: SystemTime,
}

impl ExitStatus {
    fn from_wait(status: WaitStatus) -> Option<(Pid, Self)> {
        let (pid, code) = match status {
            WaitStatus::Exited(pid, code) => (pid, code),
            WaitStatus::Signaled(pid, signal, _) => (pid, 128 + signal as i32),
            _ => return None,
        };
        Some((
            pid,
            Self {
                code,
                at: SystemTime::now(),
            },
        ))
    }
}

/// Receives the exit status of one process (`None` until it exits).
pub type ExitReceiver = watch::Receiver<Option<ExitStatus>>;

/// Pids whose exit someone waits for.
#[derive(Default)]
pub struct Registry {
    waiters: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
}

impl Registry {
    /// Starts tracking `pid`; its exit status will be published on the returned receiver.
    pub fn register(&mut self, pid: i32) -> ExitReceiver {
        let (tx, rx) = watch::channel(None);
        self.waiters.insert(pid, tx);
        rx
    }

    /// Reaps every exited child without blocking.
    fn reap_all(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    let Some((pid, exit)) = ExitStatus::from_wait(status) else {
                        continue;
                    };
                    match self.waiters.remove(&pid.as_raw()) {
                        Some(tx) => {
                            tracing::debug!(pid = pid.as_raw(), code = exit.code, "process exited");
                            tx.send_replace(Some(exit));
                        }
                        None => tracing::trace!(pid = pid.as_raw(), "reaped orphan"),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("waitpid: {e}");
                    return;
                }
            }
        }
    }
}

/// The reaper: owns the registry and the task that reaps on `SIGCHLD`.
#[derive(Clone)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
}

impl Reaper {
    /// Installs the `SIGCHLD` handler and spawns the reaping task. Must run inside a tokio
    /// runtime.
    pub fn start() -> std::io::Result<Self> {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let mut sigchld = signal(SignalKind::child())?;
        let task_registry = registry.clone();
        tokio::spawn(async move {
            // Children may have exited before the handler was installed.
            task_registry.lock().await.reap_all();
            while sigchld.recv().await.is_some() {
                task_registry.lock().await.reap_all();
            }
        });
        Ok(Self { registry })
    }

    /// Blocks reaping while held; see the module documentation.
    pub async fn lock(&self) -> OwnedMutexGuard<Registry> {
        self.registry.clone().lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn routes_exit_codes_and_signals_to_registered_pids() {
        let reaper = Reaper::start().unwrap();
        let mut guard = reaper.lock().await;
        // The reaper under test collects these children, not `Child::wait`.
        let spawn = |cmd: &str, arg: &str| {
            std::process::Command::new(cmd)
                .args(["-c", arg])
                .spawn()
                .unwrap()
                .id() as i32
        };
        let exits_7 = spawn("sh", "exit 7");
        let killed = spawn("sh", "exec sleep 100");
        let mut rx_7 = guard.register(exits_7);
        let mut rx_killed = guard.register(killed);
        nix::sys::signal::kill(Pid::from_raw(killed), nix::sys::signal::SIGKILL).unwrap();
        drop(guard);

        let status = rx_7.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!(status.code, 7);
        let status = rx_killed.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!(status.code, 128 + 9);
    }
}
