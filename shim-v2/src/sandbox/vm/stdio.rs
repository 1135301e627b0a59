//! A guest process's stdio: containerd's FIFOs (or `file://` logs) on the host, the
//! agent's in-band stream RPCs (`ReadStdout`/`ReadStderr` long polls, `WriteStdin`,
//! `CloseStdin`) on the guest side.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use palisade_agent_protocol::{
    agent::{ProcessRequest, ReadStreamRequest, WriteStdinRequest},
    agent_ttrpc::AgentClient,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::unix::pipe,
    sync::watch,
    task::JoinHandle,
};
use tracing::warn;

use super::agent::{deadline, long_poll};

/// One read of output asks for at most this much.
const READ_CHUNK: u32 = 64 << 10;
/// How long finished output waits for containerd to open the FIFO for reading (ctr
/// opens its FIFOs asynchronously, possibly after a short process already exited).
const READER_WAIT: Duration = Duration::from_secs(10);
/// After CloseIO, how long stdin still waits for bytes containerd wrote before it.
const STDIN_DRAIN: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("unsupported stdio URI {0:?} in VM mode (expected a FIFO path or file://)")]
    UnsupportedUri(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StdioError {
    let what = what.into();
    move |source| StdioError::Io { what, source }
}

/// Where output goes on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Fifo(PathBuf),
    File(PathBuf),
}

impl Sink {
    pub fn parse(uri: &str) -> Result<Option<Self>, StdioError> {
        if uri.is_empty() {
            return Ok(None);
        }
        match uri.split_once("://") {
            None => Ok(Some(Self::Fifo(uri.into()))),
            Some(("fifo", path)) if !path.is_empty() => Ok(Some(Self::Fifo(path.into()))),
            Some(("file", path)) if !path.is_empty() => Ok(Some(Self::File(path.into()))),
            _ => Err(StdioError::UnsupportedUri(uri.to_string())),
        }
    }
}

/// Which process a stream belongs to.
#[derive(Clone)]
pub struct StreamOf {
    pub agent: Arc<AgentClient>,
    pub container_id: String,
    pub exec_id: String,
    pub rpc_timeout: Duration,
}

fn open_nonblocking(path: &std::path::Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Copies guest stdout (or stderr) to `sink` until the stream's EOF. The task ends when
/// the output is delivered or the agent connection fails.
pub fn copy_output(of: StreamOf, stderr: bool, sink: Sink) -> Result<JoinHandle<()>, StdioError> {
    enum Writer {
        Fifo {
            to: pipe::Sender,
            // Our own reader keeps the FIFO open while containerd's comes and goes
            // (e.g. a restart), so writes never fail with EPIPE meanwhile.
            hold: File,
            path: PathBuf,
        },
        File(tokio::fs::File),
    }
    let mut writer = match &sink {
        Sink::Fifo(path) => {
            let hold = open_nonblocking(path, false)
                .map_err(io_err(format!("holding FIFO {} open", path.display())))?;
            let to = pipe::OpenOptions::new()
                .open_sender(path)
                .map_err(io_err(format!("opening FIFO {}", path.display())))?;
            Writer::Fifo {
                to,
                hold,
                path: path.clone(),
            }
        }
        Sink::File(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_err(format!("creating {}", parent.display())))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(io_err(format!("opening log file {}", path.display())))?;
            Writer::File(tokio::fs::File::from_std(file))
        }
    };
    Ok(tokio::spawn(async move {
        let request = ReadStreamRequest {
            container_id: of.container_id.clone(),
            exec_id: of.exec_id.clone(),
            max_bytes: READ_CHUNK,
            ..Default::default()
        };
        loop {
            let read = if stderr {
                of.agent.read_stderr(long_poll(), &request).await
            } else {
                of.agent.read_stdout(long_poll(), &request).await
            };
            let chunk = match read {
                Ok(chunk) => chunk,
                Err(e) => {
                    warn!(container = %of.container_id, exec = %of.exec_id, stderr, "reading guest output: {e}");
                    break;
                }
            };
            if !chunk.data.is_empty() {
                let written = match &mut writer {
                    Writer::Fifo { to, .. } => to.write_all(&chunk.data).await,
                    Writer::File(file) => file.write_all(&chunk.data).await,
                };
                if let Err(e) = written {
                    // Keep draining the guest so the process never blocks on a full pipe.
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        warn!(container = %of.container_id, "writing output: {e}");
                    }
                }
            }
            if chunk.eof {
                break;
            }
        }
        if let Writer::Fifo { to, hold, path } = writer {
            drop(hold);
            // The data written so far lives only while some end of the FIFO is open:
            // keep the writer until a reader has it open (bounded). Detached, so the
            // exit is reported as soon as the output is in the FIFO (a detached
            // `ctr run -d` never reads it).
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + READER_WAIT;
                loop {
                    match open_nonblocking(&path, true) {
                        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                            if tokio::time::Instant::now() > deadline {
                                warn!("no reader for {} came; its output is lost", path.display());
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        _ => break,
                    }
                }
                drop(to);
            });
        }
    }))
}

/// The host → guest stdin copy of one process.
pub struct StdinCopy {
    close: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StdinCopy {
    /// Copies containerd's stdin FIFO at `path` to the guest until CloseIO.
    pub fn start(of: StreamOf, path: PathBuf) -> Result<Self, StdioError> {
        let mut from = pipe::OpenOptions::new()
            .open_receiver(&path)
            .map_err(io_err(format!("opening stdin FIFO {}", path.display())))?;
        // A writer of our own: containerd's writers may come and go without the guest
        // seeing EOF; only CloseIO ends stdin.
        let hold = open_nonblocking(&path, true).map_err(io_err(format!(
            "holding stdin FIFO {} open",
            path.display()
        )))?;
        let (close, mut closed) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut hold = Some(hold);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = if hold.is_some() {
                    tokio::select! {
                        n = from.read(&mut buf) => n,
                        _ = closed.wait_for(|c| *c) => {
                            hold = None;
                            continue;
                        }
                    }
                } else {
                    match tokio::time::timeout(STDIN_DRAIN, from.read(&mut buf)).await {
                        Ok(n) => n,
                        Err(_) => break,
                    }
                };
                let n = match n {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        warn!(container = %of.container_id, "reading stdin FIFO: {e}");
                        break;
                    }
                };
                let request = WriteStdinRequest {
                    container_id: of.container_id.clone(),
                    exec_id: of.exec_id.clone(),
                    data: buf[..n].to_vec(),
                    ..Default::default()
                };
                if let Err(e) = of
                    .agent
                    .write_stdin(deadline(of.rpc_timeout), &request)
                    .await
                {
                    warn!(container = %of.container_id, "writing guest stdin: {e}");
                    break;
                }
            }
            let request = ProcessRequest {
                container_id: of.container_id.clone(),
                exec_id: of.exec_id.clone(),
                ..Default::default()
            };
            if let Err(e) = of
                .agent
                .close_stdin(deadline(of.rpc_timeout), &request)
                .await
            {
                warn!(container = %of.container_id, "closing guest stdin: {e}");
            }
        });
        Ok(Self { close, task })
    }

    /// CloseIO: deliver what is buffered, then close the guest process's stdin.
    pub fn close(&self) {
        self.close.send_replace(true);
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_parse() {
        assert_eq!(Sink::parse("").unwrap(), None);
        assert_eq!(
            Sink::parse("/run/x/stdout").unwrap(),
            Some(Sink::Fifo("/run/x/stdout".into()))
        );
        assert_eq!(
            Sink::parse("file:///var/log/c.log").unwrap(),
            Some(Sink::File("/var/log/c.log".into()))
        );
        assert!(Sink::parse("binary:///usr/bin/logger").is_err());
        assert!(Sink::parse("file://").is_err());
    }
}
