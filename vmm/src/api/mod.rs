//! Control socket: a Unix socket speaking JSON lines.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"shutdown"}`.
//! Every request gets one reply line: `{"ok":true,"state":"running","vcpus":1,
//! "mem_mib":128,"uptime_ms":1234}` or `{"ok":false,"error":"..."}`. Connections are
//! served one at a time on the API thread.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;
use serde::{Deserialize, Serialize};

use crate::vmm::VmmEvent;
use crate::vstate::vcpu::VcpuHandle;

/// How often blocked socket calls wake up to check for a stop request.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Another live process serves this path.
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A request line.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Report the VM state.
    Status,
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// End the VM (exit status 0).
    Shutdown,
}

/// A reply line.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// VM state after the request: "running", "paused" or "shutting-down".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// vCPU count (status only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<usize>,
    /// Memory size (status only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// Milliseconds since the vCPUs started (status only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the API thread may do to the VM.
pub struct VmControl {
    /// The running vCPUs.
    pub vcpus: Arc<Vec<VcpuHandle>>,
    /// Where to send the shutdown request.
    pub events: Mutex<Sender<VmmEvent>>,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// When the vCPUs started.
    pub started: Instant,
}

impl VmControl {
    fn state(&self) -> &'static str {
        if !self.vcpus.is_empty() && self.vcpus.iter().all(|v| v.is_paused()) {
            "paused"
        } else {
            "running"
        }
    }

    /// Execute one request.
    pub fn handle(&self, request: Request) -> Reply {
        let state = |s: &str| Reply {
            ok: true,
            state: Some(s.to_string()),
            ..Default::default()
        };
        match request {
            Request::Status => Reply {
                vcpus: Some(self.vcpus.len()),
                mem_mib: Some(self.mem_mib),
                uptime_ms: Some(self.started.elapsed().as_millis() as u64),
                ..state(self.state())
            },
            Request::Pause => {
                self.vcpus.iter().for_each(VcpuHandle::pause);
                state(self.state())
            }
            Request::Resume => {
                self.vcpus.iter().for_each(VcpuHandle::resume);
                state("running")
            }
            Request::Shutdown => {
                let sent = self
                    .events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(VmmEvent::ApiShutdown)
                    .is_ok();
                if sent {
                    state("shutting-down")
                } else {
                    error_reply("the VM is already ending".into())
                }
            }
        }
    }
}

fn error_reply(error: String) -> Reply {
    Reply {
        ok: false,
        error: Some(error),
        ..Default::default()
    }
}

/// Parse and execute one request line.
pub fn handle_line(ctl: &VmControl, line: &[u8]) -> Reply {
    match serde_json::from_slice::<Request>(line) {
        Ok(request) => ctl.handle(request),
        Err(e) => error_reply(format!("bad request: {e}")),
    }
}

/// A bound control socket.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Bind `path`, replacing a stale socket file left by a dead VMM.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ApiError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(bind_err)?;
                UnixListener::bind(path).map_err(bind_err)?
            }
            Err(e) => return Err(bind_err(e)),
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serve requests on a new thread (which first installs `filter`).
    pub fn spawn(self, ctl: VmControl, filter: Option<BpfProgram>) -> Result<ApiHandle, ApiError> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = crate::seccomp::apply(&filter) {
                        tracing::error!("API thread: {e}");
                        return;
                    }
                }
                self.serve(&ctl, &thread_stop);
            })
            .map_err(ApiError::Spawn)?;
        Ok(ApiHandle {
            stop,
            thread: Some(thread),
            path,
        })
    }

    fn serve(&self, ctl: &VmControl, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve_connection(stream, ctl, stop) {
                        tracing::debug!("API connection ended: {e}");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL_INTERVAL),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("API socket accept failed: {e}");
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
        }
    }
}

fn serve_connection(stream: UnixStream, ctl: &VmControl, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream).take(u64::MAX);
    let mut line = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        reader.set_limit((MAX_REQUEST + 1 - line.len()) as u64);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if line.last() == Some(&b'\n') => {
                let reply = handle_line(ctl, &line);
                line.clear();
                let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
                out.push(b'\n');
                writer.write_all(&out)?;
            }
            Ok(_) if line.len() > MAX_REQUEST => {
                let mut out = serde_json::to_vec(&error_reply(format!(
                    "request longer than {MAX_REQUEST} bytes"
                )))
                .map_err(std::io::Error::other)?;
                out.push(b'\n');
                writer.write_all(&out)?;
                return Ok(());
            }
            Ok(_) => {} // partial line, keep reading
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The running API thread.
#[derive(Debug)]
pub struct ApiHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiHandle {
    /// Stop serving, join the thread and remove the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn control() -> (VmControl, mpsc::Receiver<VmmEvent>) {
        let (tx, rx) = mpsc::channel();
        (
            VmControl {
                vcpus: Arc::new(Vec::new()),
                events: Mutex::new(tx),
                mem_mib: 64,
                started: Instant::now(),
            },
            rx,
        )
    }

    #[test]
    fn requests_and_errors() {
        let (ctl, rx) = control();
        let r = handle_line(&ctl, br#"{"cmd":"status"}"#);
        assert!(r.ok);
        assert_eq!((r.vcpus, r.mem_mib), (Some(0), Some(64)));
        let r = handle_line(&ctl, b"{\"cmd\":\"shutdown\"}\n");
        assert_eq!(r.state.as_deref(), Some("shutting-down"));
        assert!(matches!(rx.try_recv(), Ok(VmmEvent::ApiShutdown)));
        for bad in [&b"{\"cmd\":\"reboot\"}"[..], b"not json", b"{}"] {
            let r = handle_line(&ctl, bad);
            assert!(!r.ok, "{:?}", String::from_utf8_lossy(bad));
            assert!(r.error.unwrap().starts_with("bad request"));
        }
    }

    #[test]
    fn socket_round_trip_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // A stale socket file from a dead VMM is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let server = ApiServer::bind(&path).unwrap();
        assert!(matches!(ApiServer::bind(&path), Err(ApiError::InUse(_))));
        let (ctl, _rx) = control();
        let handle = server.spawn(ctl, None).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"cmd\":\"status\"}\n{\"cmd\":").unwrap();
        s.write_all(b"\"resume\"}\n").unwrap();
        let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
        let first: Reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(first.state.as_deref(), Some("running"));
        let second: Reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert!(second.ok);
        // Oversized request: error reply, connection closed.
        s.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        let third: Reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert!(!third.ok);
        drop(s);
        handle.stop();
        assert!(!path.exists(), "socket file removed");
    }
}
