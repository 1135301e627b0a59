//! A container process's stdio: containerd's FIFOs, `file://` and `binary://` log URIs,
//! and terminals.
//!
//! Setup is in two steps around the runtime call: [`PreparedIo::prepare`] makes the
//! descriptors the new process inherits (pipes, a log file, a logging binary's pipes),
//! and [`PreparedIo::attach`] starts copying once the runtime has created the process
//! (and, for a terminal, handed over its master).

use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::{fs::OpenOptionsExt, process::CommandExt},
    },
    path::PathBuf,
    process::Command,
    sync::Mutex,
    time::Duration,
};

use containerd_shim::asynchronous::io::{IoTasks, Pty};
use nix::fcntl::{fcntl, FcntlArg};
use tokio::{net::unix::pipe, sync::watch, task::JoinHandle};
use tracing::warn;

use super::engine::ProcessIo;
use crate::sandbox::StdioUris;

/// How long a logging binary may take to signal it is ready.
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process's output copies may take to deliver what is buffered at exit
/// (a background process may keep the pipe open; the Go shim allows as long).
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long finished output waits for containerd to open the FIFO for reading.
/// Short: the reader containerd or ctr set up is normally there within milliseconds, and
/// output of a detached task nobody reads must not hold up its exit for long.
const READER_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("unsupported stdio URI {0:?} (expected a FIFO path, file:// or binary://)")]
    UnsupportedUri(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("copying stdio: {0}")]
    Copy(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StdioError {
    let what = what.into();
    move |source| StdioError::Io { what, source }
}

/// Where a process's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    Null,
    /// A FIFO containerd reads (a plain path, as containerd passes it).
    Fifo(String),
    /// `file:///path`: appended to a file.
    File(PathBuf),
    /// `binary:///path?key=value`: a logging binary reading fds 3 (stdout) and 4 (stderr).
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

impl OutputTarget {
    pub fn parse(uri: &str) -> Result<Self, StdioError> {
        if uri.is_empty() {
            return Ok(Self::Null);
        }
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Ok(Self::Fifo(uri.to_string()));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(StdioError::UnsupportedUri(uri.to_string()));
        }
        match scheme {
            "fifo" => Ok(Self::Fifo(path.to_string())),
            "file" => Ok(Self::File(PathBuf::from(path))),
            "binary" => {
                // containerd passes each query pair as `key` then `value` (if any).
                let mut args = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    args.push(key.to_string());
                    if !value.is_empty() {
                        args.push(value.to_string());
                    }
                }
                Ok(Self::Binary {
                    path: PathBuf::from(path),
                    args,
                })
            }
            _ => Err(StdioError::UnsupportedUri(uri.to_string())),
        }
    }
}

/// Descriptors made for a process before the runtime creates it.
pub struct PreparedIo {
    /// What the new process inherits.
    pub child: ProcessIo,
    stdin: Option<(String, Option<OwnedFd>)>,
    outputs: Vec<(OwnedFd, String)>,
    /// For a terminal: where its output goes.
    terminal_output: Option<TerminalOutput>,
}

enum TerminalOutput {
    Null,
    Fifo(String),
    Writer(File),
}

impl PreparedIo {
    /// Blocking: may start a logging binary and wait until it is ready.
    pub fn prepare(spec: &StdioUris, namespace: &str, id: &str) -> Result<Self, StdioError> {
        let stdout = OutputTarget::parse(&spec.stdout)?;
        let stderr = OutputTarget::parse(&spec.stderr)?;
        let mut prepared = Self {
            child: ProcessIo::default(),
            stdin: None,
            outputs: Vec::new(),
            terminal_output: None,
        };
        if spec.terminal {
            if !spec.stdin.is_empty() {
                prepared.stdin = Some((spec.stdin.clone(), None));
            }
            prepared.terminal_output = Some(match stdout {
                OutputTarget::Null => TerminalOutput::Null,
                OutputTarget::Fifo(path) => TerminalOutput::Fifo(path),
                OutputTarget::File(path) => TerminalOutput::Writer(open_log_file(&path)?),
                OutputTarget::Binary { path, args } => {
                    let (out_r, out_w) = pipe_pair()?;
                    let (err_r, _err_w) = pipe_pair()?;
                    start_logger(&path, &args, out_r, err_r, namespace, id)?;
                    TerminalOutput::Writer(File::from(out_w))
                }
            });
            return Ok(prepared);
        }

        if !spec.stdin.is_empty() {
            let (r, w) = pipe_pair()?;
            prepared.child.stdin = Some(r);
            prepared.stdin = Some((spec.stdin.clone(), Some(w)));
        }
        if let OutputTarget::Binary { path, args } = &stdout {
            // One logging binary takes both streams.
            let (out_r, out_w) = pipe_pair()?;
            let (err_r, err_w) = pipe_pair()?;
            start_logger(path, args, out_r, err_r, namespace, id)?;
            prepared.child.stdout = Some(out_w);
            prepared.child.stderr = Some(err_w);
            return Ok(prepared);
        }
        prepared.child.stdout = prepared.output(stdout)?;
        prepared.child.stderr = prepared.output(stderr)?;
        Ok(prepared)
    }

    fn output(&mut self, target: OutputTarget) -> Result<Option<OwnedFd>, StdioError> {
        match target {
            OutputTarget::Null => Ok(None),
            OutputTarget::Fifo(path) => {
                let (r, w) = pipe_pair()?;
                self.outputs.push((r, path));
                Ok(Some(w))
            }
            OutputTarget::File(path) => Ok(Some(OwnedFd::from(open_log_file(&path)?))),
            OutputTarget::Binary { .. } => Err(StdioError::UnsupportedUri(
                "binary:// for stderr alone (set it on stdout)".into(),
            )),
        }
    }

    /// Starts the copies. Must run inside the tokio runtime.
    pub fn attach(self, console: Option<File>) -> Result<ProcessStdio, StdioError> {
        let input = IoTasks::default();
        let (cancel, cancelled) = watch::channel(false);
        let mut outputs = Vec::new();
        let mut pty = None;
        match (self.terminal_output, console) {
            (Some(output), Some(master)) => {
                let master = Pty::new(master).map_err(|e| StdioError::Copy(e.to_string()))?;
                if let Some((path, _)) = &self.stdin {
                    input
                        .copy_from_fifo(path, master.clone())
                        .map_err(|e| StdioError::Copy(e.to_string()))?;
                }
                match output {
                    TerminalOutput::Null => {}
                    TerminalOutput::Fifo(path) => {
                        outputs.push(copy_to_fifo(master.clone(), &path, cancelled.clone())?)
                    }
                    TerminalOutput::Writer(file) => {
                        let mut from = master.clone();
                        let mut to = tokio::fs::File::from_std(file);
                        outputs.push(tokio::spawn(async move {
                            if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
                                if e.raw_os_error() != Some(libc::EIO) {
                                    warn!("copying terminal output: {e}");
                                }
                            }
                        }));
                    }
                }
                pty = Some(master);
            }
            (Some(_), None) => {
                return Err(StdioError::Copy(
                    "the runtime returned no terminal for a terminal process".into(),
                ))
            }
            (None, _) => {
                if let Some((path, Some(writer))) = self.stdin {
                    let to = pipe::Sender::from_owned_fd(writer)
                        .map_err(io_err("registering stdin pipe"))?;
                    input
                        .copy_from_fifo(&path, to)
                        .map_err(|e| StdioError::Copy(e.to_string()))?;
                }
                for (reader, path) in self.outputs {
                    let from = pipe::Receiver::from_owned_fd(reader)
                        .map_err(io_err("registering output pipe"))?;
                    outputs.push(copy_to_fifo(from, &path, cancelled.clone())?);
                }
            }
        }
        Ok(ProcessStdio {
            input,
            pty,
            outputs: Mutex::new(outputs),
            cancel,
        })
    }
}

/// Copies a process's output into containerd's FIFO at `path`.
///
/// The shim holds the FIFO open for reading too while copying, so output survives
/// containerd going away (a restart) instead of failing with EPIPE. When the output
/// ends, the copy lets go of that hold but keeps its writer open until a reader has the
/// FIFO open (bounded): containerd's reader may open it only after a short process has
/// already exited (ctr opens its FIFOs asynchronously), and the data written so far lives
/// only as long as some end of the FIFO is open.
fn copy_to_fifo<R>(
    from: R,
    path: &str,
    mut cancelled: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StdioError>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    let hold =
        open_fifo_nonblocking(path, false).map_err(io_err(format!("holding FIFO {path} open")))?;
    let mut to = pipe::OpenOptions::new()
        .open_sender(path)
        .map_err(io_err(format!("opening FIFO {path}")))?;
    let path = PathBuf::from(path);
    Ok(tokio::spawn(async move {
        let mut from = from;
        tokio::select! {
            _ = cancelled.wait_for(|c| *c) => return,
            copied = tokio::io::copy(&mut from, &mut to) => {
                if let Err(e) = copied {
                    if e.kind() != std::io::ErrorKind::BrokenPipe && e.raw_os_error() != Some(libc::EIO) {
                        warn!("copying output to {}: {e}", path.display());
                    }
                }
            }
        }
        drop(hold);
        let deadline = tokio::time::Instant::now() + READER_WAIT;
        // Keep the writer, and so the buffered output, until a reader has taken all of it
        // (bounded): the exit is reported only after this, and a reader that has the FIFO
        // open but has not read yet may drop it when it sees the exit — ctr's FIFO open
        // is asynchronous, and `ctr run --rm` cancels a not-yet-finished open on exit
        // (suspected cause of output lost in the reliability churn under load).
        // Nothing left unread (the common case): done at once.
        while unread_bytes(&to) > 0 {
            if tokio::time::Instant::now() > deadline || *cancelled.borrow() {
                warn!(
                    "{} bytes of output to {} were not read within {READER_WAIT:?}; dropped",
                    unread_bytes(&to),
                    path.display()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(to);
    }))
}

/// Bytes buffered in the pipe behind `fd` (FIONREAD works on either end of a pipe).
fn unread_bytes(fd: &impl AsRawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    if rc < 0 {
        0
    } else {
        n
    }
}

fn open_fifo_nonblocking(path: &str, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// The running copies of one process's stdio.
pub struct ProcessStdio {
    /// stdin (containerd-shim's copy keeps containerd's writers coming and going from
    /// ending it; CloseIO ends it).
    input: IoTasks,
    pty: Option<Pty>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
    cancel: watch::Sender<bool>,
}

impl ProcessStdio {
    /// Lets the process see EOF on stdin once containerd's writer is gone (CloseIO).
    pub fn close_stdin(&self) {
        self.input.close_input();
    }

    /// Resizes the process's terminal, if it has one.
    pub fn resize(&self, width: u32, height: u32) -> std::io::Result<()> {
        let Some(pty) = &self.pty else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "process has no terminal",
            ));
        };
        let size = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsFd;
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which outlives the call;
        // the descriptor is the live terminal master.
        let rc = unsafe {
            libc::ioctl(
                pty.as_fd().as_raw_fd(),
                libc::TIOCSWINSZ,
                &size as *const libc::winsize,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the output copies to deliver everything (bounded), then stops all
    /// copies. Called when the process has exited, before its exit is reported.
    pub async fn drain(&self) {
        let outputs: Vec<_> = self
            .outputs
            .lock()
            .map(|mut o| o.drain(..).collect())
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + OUTPUT_DRAIN_TIMEOUT;
        for handle in outputs {
            let abort = handle.abort_handle();
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                warn!("output copy did not finish in {OUTPUT_DRAIN_TIMEOUT:?}, cancelling it");
                abort.abort();
            }
        }
        self.input.abort().await;
    }

    /// Stops all copies at once (failed start, forced delete).
    pub async fn abort(&self) {
        self.cancel.send_replace(true);
        if let Ok(mut outputs) = self.outputs.lock() {
            for handle in outputs.drain(..) {
                handle.abort();
            }
        }
        self.input.abort().await;
    }
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), StdioError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| StdioError::Io {
        what: "creating a pipe".into(),
        source: e.into(),
    })
}

fn open_log_file(path: &std::path::Path) -> Result<File, StdioError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(format!("opening log file {}", path.display())))
}

/// Starts a logging binary the way containerd's shims do: stdout on fd 3, stderr on fd 4,
/// and fd 5 to close (or write to) once it is ready; CONTAINER_ID and
/// CONTAINER_NAMESPACE in its environment. Blocks until it is ready.
fn start_logger(
    binary: &std::path::Path,
    args: &[String],
    stdout: OwnedFd,
    stderr: OwnedFd,
    namespace: &str,
    id: &str,
) -> Result<(), StdioError> {
    let (ready_r, ready_w) = pipe_pair()?;
    // Move the descriptors above 5 first so the dup2s below cannot clobber each other.
    let high = |fd: &OwnedFd| -> Result<RawFd, StdioError> {
        fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(|e| StdioError::Io {
            what: "duplicating logger descriptor".into(),
            source: e.into(),
        })
    };
    let fds = [high(&stdout)?, high(&stderr)?, high(&ready_w)?];
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only calls dup2,
    // which is async-signal-safe; dup2 clears close-on-exec on the targets.
    unsafe {
        cmd.pre_exec(move || {
            for (target, fd) in (3..).zip(fds) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    for fd in fds {
        let _ = nix::unistd::close(fd);
    }
    drop((stdout, stderr, ready_w));
    spawned.map_err(io_err(format!(
        "starting logging binary {}",
        binary.display()
    )))?;

    // Ready when the binary writes to or closes fd 5.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = File::from(ready_r);
        let mut byte = [0u8; 1];
        let _ = tx.send(ready.read(&mut byte));
    });
    match rx.recv_timeout(LOGGER_READY_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(_) => Err(StdioError::Io {
            what: format!("logging binary {} did not become ready", binary.display()),
            source: std::io::ErrorKind::TimedOut.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert_eq!(OutputTarget::parse("").unwrap(), OutputTarget::Null);
        assert_eq!(
            OutputTarget::parse("/run/x/stdout").unwrap(),
            OutputTarget::Fifo("/run/x/stdout".into())
        );
        assert_eq!(
            OutputTarget::parse("file:///var/log/c.log").unwrap(),
            OutputTarget::File("/var/log/c.log".into())
        );
        assert_eq!(
            OutputTarget::parse("binary:///usr/bin/logger?id=abc&debug").unwrap(),
            OutputTarget::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["id".into(), "abc".into(), "debug".into()]
            }
        );
        assert!(OutputTarget::parse("tcp://host:1").is_err());
        assert!(OutputTarget::parse("file://").is_err());
    }

    /// The copy of finished output holds on until a reader has read it, not merely until
    /// one has the FIFO open: the exit is reported after the copy ends.
    #[tokio::test]
    async fn finished_output_waits_until_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let fifo = fifo.to_str().unwrap().to_string();
        let (read_end, write_end) = pipe_pair().unwrap();
        let from = pipe::Receiver::from_owned_fd(read_end).unwrap();
        let (_cancel, cancelled) = watch::channel(false);
        let copy = copy_to_fifo(from, &fifo, cancelled).unwrap();
        // A reader that opens the FIFO but does not read yet.
        let mut reader = open_fifo_nonblocking(&fifo, false).unwrap();
        nix::unistd::write(&write_end, b"last words\n").unwrap();
        drop(write_end);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!copy.is_finished(), "copy ended with its output unread");
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 11 && std::time::Instant::now() < deadline {
            let mut buf = [0u8; 64];
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("reading the FIFO: {e}"),
            }
        }
        assert_eq!(got, b"last words\n");
        tokio::time::timeout(Duration::from_secs(1), copy)
            .await
            .expect("copy ends once its output is read")
            .unwrap();
    }

    #[test]
    fn file_target_is_inherited_directly() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/out.log");
        let spec = StdioUris {
            stdout: format!("file://{}", log.display()),
            ..Default::default()
        };
        let prepared = PreparedIo::prepare(&spec, "ns", "id").unwrap();
        assert!(prepared.child.stdout.is_some());
        assert!(prepared.child.stdin.is_none());
        assert!(prepared.outputs.is_empty());
        assert!(log.exists());
    }

    #[test]
    fn binary_logger_gets_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("logged");
        let script = dir.path().join("logger.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\ncat <&3 > {}.$CONTAINER_NAMESPACE.$CONTAINER_ID\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let spec = StdioUris {
            stdout: format!("binary://{}", script.display()),
            ..Default::default()
        };
        let prepared = PreparedIo::prepare(&spec, "ns", "c1").unwrap();
        let stdout = prepared.child.stdout.unwrap();
        nix::unistd::write(&stdout, b"hello\n").unwrap();
        drop(stdout);
        drop(prepared.child.stderr);
        let target = PathBuf::from(format!("{}.ns.c1", out.display()));
        for _ in 0..100 {
            if std::fs::read_to_string(&target).unwrap_or_default() == "hello\n" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("logger did not write {}", target.display());
    }
}
