//! The shim's child reaper.
//!
//! The shim is a subreaper: container processes (created by the runtime, then orphaned)
//! and everything they orphan end up as its children, so it must `waitpid(-1)` on
//! SIGCHLD. But the runtime calls the shim makes also create children they wait for
//! themselves (`waitpid(pid)`), and a `waitpid(-1)` running at the same moment could
//! steal such an exit. So runtime calls hold a shared [`ChildGuard`] and the reaper takes
//! it exclusively: it reaps only while no runtime call is in flight, and an exit that
//! arrives meanwhile is reaped right after (zombies wait). That is also why the
//! containerd-shim crate's own reaper is disabled (`Config::no_reaper`).

use std::sync::{Arc, LazyLock};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, OwnedRwLockReadGuard, RwLock},
};
use tracing::{debug, warn};

static CHILDREN: LazyLock<Arc<RwLock<()>>> = LazyLock::new(|| Arc::new(RwLock::new(())));

/// Held while code that waits for its own children runs.
pub type ChildGuard = OwnedRwLockReadGuard<()>;

/// Blocks the reaper until the guard is dropped.
pub async fn child_guard() -> ChildGuard {
    CHILDREN.clone().read_owned().await
}

/// Runs blocking `f` on the blocking pool while holding the child guard.
pub async fn run_guarded<T, F>(f: F) -> std::io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let guard = child_guard().await;
    tokio::task::spawn_blocking(move || {
        let result = f();
        drop(guard);
        result
    })
    .await
    .map_err(std::io::Error::other)
}

/// A reaped child: its pid and its exit status as containerd reports it (the exit code,
/// or 128 + the signal number that killed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub status: u32,
}

/// Exit status of a `waitpid` result, `None` for stops and continues.
pub fn exit_status(status: WaitStatus) -> Option<Exit> {
    match status {
        WaitStatus::Exited(pid, code) => Some(Exit {
            pid: pid.as_raw(),
            status: code as u32,
        }),
        WaitStatus::Signaled(pid, signal, _) => Some(Exit {
            pid: pid.as_raw(),
            status: 128 + signal as u32,
        }),
        _ => None,
    }
}

/// Starts reaping on SIGCHLD, sending every exit to `exits`.
pub fn start(exits: mpsc::UnboundedSender<Exit>) -> std::io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_all(&exits).await;
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(())
}

async fn reap_all(exits: &mpsc::UnboundedSender<Exit>) {
    let _exclusive = CHILDREN.write().await;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) => {
                if let Some(exit) = exit_status(status) {
                    debug!(pid = exit.pid, status = exit.status, "reaped child");
                    if exits.send(exit).is_err() {
                        return;
                    }
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!("waitpid: {e}");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn signals_map_to_128_plus_n() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            exit_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(Exit {
                pid: 42,
                status: 137
            })
        );
        assert_eq!(
            exit_status(WaitStatus::Exited(pid, 3)),
            Some(Exit { pid: 42, status: 3 })
        );
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }
}
