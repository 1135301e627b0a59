//! OOM notifications for a container's memory cgroup.
//!
//! * v1: an eventfd registered through `cgroup.event_control` for `memory.oom_control`; the
//!   kernel signals it on every OOM in the cgroup, and once more when the cgroup is removed.
//! * v2: inotify on `memory.events`, which the kernel touches whenever one of its counters
//!   (`oom`, `oom_kill`, `max`, ...) changes; a change of `oom`/`oom_kill` is an OOM.
//!
//! Use from a poll loop (e.g. tokio's `AsyncFd` in the shim): wait until
//! [`OomWatcher::as_fd`] is readable, then call [`OomWatcher::check`]. Or block in
//! [`OomWatcher::wait`].

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use super::{fs, CgroupError};

/// What [`OomWatcher::check`] observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomEvent {
    /// The cgroup ran out of memory; `kills` processes were OOM-killed since the previous
    /// event. v1 signals the eventfd when the OOM starts, possibly before the victim is
    /// counted, so a kill can show up in the next event (or only in
    /// [`Cgroup::oom_kill_count`](super::Cgroup::oom_kill_count)); it is also 0 when the
    /// OOM killer is disabled. Treat every `Oom` as an OOM event (containerd's TaskOOM).
    Oom { kills: u64 },
    /// The cgroup was removed: no further events will come.
    Removed,
}

enum Source {
    V1 {
        eventfd: OwnedFd,
        /// Must stay open as long as the registration is in use.
        _oom_control: File,
    },
    V2 {
        inotify: OwnedFd,
    },
}

/// A readable-when-something-happened file descriptor plus the bookkeeping to turn its
/// wake-ups into [`OomEvent`]s.
pub struct OomWatcher {
    source: Source,
    dir: PathBuf,
    last_oom: u64,
    last_kills: u64,
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> CgroupError {
    move |source| CgroupError::Io { context, source }
}

fn check_fd(rc: libc::c_int, context: String) -> Result<OwnedFd, CgroupError> {
    if rc < 0 {
        return Err(CgroupError::Io {
            context,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `rc` is a new descriptor returned by the kernel and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

impl OomWatcher {
    pub(crate) fn v1(dir: &Path) -> Result<OomWatcher, CgroupError> {
        let oom_control_path = dir.join("memory.oom_control");
        let oom_control = File::open(&oom_control_path)
            .map_err(io_err(format!("open {}", oom_control_path.display())))?;
        // SAFETY: eventfd(2) has no memory-safety preconditions.
        let rc = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        let eventfd = check_fd(rc, "eventfd".into())?;
        let registration = format!("{} {}", eventfd.as_raw_fd(), oom_control.as_raw_fd());
        fs::write("memory", dir, "cgroup.event_control", &registration)?;
        let last_kills = super::v1::memory::oom_kill_count(dir)?;
        Ok(OomWatcher {
            source: Source::V1 {
                eventfd,
                _oom_control: oom_control,
            },
            dir: dir.to_path_buf(),
            last_oom: 0,
            last_kills,
        })
    }

    pub(crate) fn v2(dir: &Path) -> Result<OomWatcher, CgroupError> {
        let events = dir.join("memory.events");
        // SAFETY: inotify_init1(2) has no memory-safety preconditions.
        let rc = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        let inotify = check_fd(rc, "inotify_init1".into())?;
        let cpath =
            CString::new(events.as_os_str().as_bytes()).map_err(|_| CgroupError::Parse {
                path: events.clone(),
                msg: "path contains a NUL byte".into(),
            })?;
        // SAFETY: `cpath` is a valid NUL-terminated string for the duration of the call.
        let wd = unsafe {
            libc::inotify_add_watch(inotify.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY)
        };
        if wd < 0 {
            return Err(CgroupError::Io {
                context: format!("inotify_add_watch {}", events.display()),
                source: io::Error::last_os_error(),
            });
        }
        let counters = fs::read_flat_keyed("memory", dir, "memory.events")?;
        Ok(OomWatcher {
            source: Source::V2 { inotify },
            dir: dir.to_path_buf(),
            last_oom: counters.get("oom").copied().unwrap_or(0),
            last_kills: counters.get("oom_kill").copied().unwrap_or(0),
        })
    }

    /// Drains pending wake-ups (non-blocking) and reports what they mean, or `None` if there
    /// was nothing (or nothing OOM-related).
    pub fn check(&mut self) -> Result<Option<OomEvent>, CgroupError> {
        let fd = self.as_fd().as_raw_fd();
        let mut buf = [0u8; 4096];
        let mut woke = false;
        loop {
            // SAFETY: `buf` is writable for its length; `fd` is owned by `self`.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                woke = true;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EINTR) => continue,
                _ if n == 0 => break,
                _ => {
                    return Err(CgroupError::Io {
                        context: "read OOM notification".into(),
                        source: err,
                    })
                }
            }
        }
        if !woke {
            return Ok(None);
        }
        let counters_file = match self.source {
            Source::V1 { .. } => "memory.oom_control",
            Source::V2 { .. } => "memory.events",
        };
        let counters = match fs::read_optional("memory", &self.dir, counters_file)? {
            Some(text) => fs::parse_flat_keyed(&text),
            None => return Ok(Some(OomEvent::Removed)),
        };
        let kills = counters.get("oom_kill").copied().unwrap_or(0);
        let delta = kills.saturating_sub(self.last_kills);
        self.last_kills = kills;
        match self.source {
            // Every v1 wake-up is an OOM (or the removal, handled above).
            Source::V1 { .. } => Ok(Some(OomEvent::Oom { kills: delta })),
            Source::V2 { .. } => {
                let oom = counters.get("oom").copied().unwrap_or(0);
                let new_oom = oom > self.last_oom;
                self.last_oom = oom;
                Ok((new_oom || delta > 0).then_some(OomEvent::Oom { kills: delta }))
            }
        }
    }

    /// Blocks until an OOM event (or the cgroup's removal), or `timeout` (`None` = forever).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<OomEvent>, CgroupError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(event) = self.check()? {
                return Ok(Some(event));
            }
            let remaining_ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd array of length 1.
            let rc = unsafe { libc::poll(&mut pfd, 1, remaining_ms) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINTR) {
                    return Err(CgroupError::Io {
                        context: "poll OOM notification".into(),
                        source: err,
                    });
                }
            }
        }
    }
}

impl AsFd for OomWatcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.source {
            Source::V1 { eventfd, .. } => eventfd.as_fd(),
            Source::V2 { inotify } => inotify.as_fd(),
        }
    }
}
