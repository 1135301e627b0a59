//! OOM notifications for a container's memory cgroup (cgroup v1: an eventfd registered
//! through `cgroup.event_control` on `memory.oom_control`; v2: `memory.events`
//! `oom_kill` counter, polled).

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::debug;

/// How often a v2 `memory.events` is read.
const V2_POLL: Duration = Duration::from_secs(1);

/// Starts watching the memory cgroup of `pid`; `on_oom` runs for every OOM kill. The
/// watch ends when the cgroup goes away or the handle is aborted.
pub fn watch<F>(pid: u32, on_oom: F) -> Option<JoinHandle<()>>
where
    F: Fn() + Send + Sync + 'static,
{
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    if let Some(dir) = v1_memory_dir(&cgroups) {
        return watch_v1(dir, on_oom)
            .map_err(|e| debug!("no v1 OOM watch for pid {pid}: {e}"))
            .ok();
    }
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let events = PathBuf::from(format!("/sys/fs/cgroup{path}/memory.events"));
    if !events.exists() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut seen = oom_kills(&events).unwrap_or(0);
        loop {
            tokio::time::sleep(V2_POLL).await;
            let Some(now) = oom_kills(&events) else {
                return;
            };
            for _ in seen..now {
                on_oom();
            }
            seen = now;
        }
    }))
}

fn oom_kills(events: &PathBuf) -> Option<u64> {
    std::fs::read_to_string(events)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

fn v1_memory_dir(cgroups: &str) -> Option<PathBuf> {
    let path = cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })?;
    let dir = PathBuf::from(format!("/sys/fs/cgroup/memory{path}"));
    dir.join("memory.oom_control").exists().then_some(dir)
}

fn watch_v1<F>(dir: PathBuf, on_oom: F) -> std::io::Result<JoinHandle<()>>
where
    F: Fn() + Send + Sync + 'static,
{
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let event = unsafe { OwnedFd::from_raw_fd(raw) };
    let oom_control = File::open(dir.join("memory.oom_control"))?;
    OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.event_control"))?
        .write_all(format!("{} {}", event.as_raw_fd(), oom_control.as_raw_fd()).as_bytes())?;
    // SAFETY: the AsyncFd owns the eventfd, so the descriptor stays open and the same
    // for as long as it is registered.
    let event = unsafe { AsyncFd::register(event) }?;
    Ok(tokio::spawn(async move {
        // Keep the watched file open as long as the registration.
        let _oom_control = oom_control;
        loop {
            let Ok(mut ready) = event.readable().await else {
                return;
            };
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes into a buffer of 8 bytes.
            let n = unsafe {
                libc::read(
                    event.get_ref().as_raw_fd(),
                    count.as_mut_ptr().cast(),
                    count.len(),
                )
            };
            ready.clear_ready();
            if n != 8 {
                continue;
            }
            // The eventfd also fires when the cgroup is removed.
            if !dir.exists() {
                return;
            }
            on_oom();
        }
    }))
}
