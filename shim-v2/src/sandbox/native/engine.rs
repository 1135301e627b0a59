//! The OCI runtime operations native mode needs, and their implementation on a
//! runc-compatible runtime binary (`palisade`, whose CLI follows runc's).
//!
//! Everything here blocks and may create and wait for children of its own, so callers
//! run it through [`crate::reaper::run_guarded`].

use std::{
    fs::File,
    io::Write,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixListener,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{
    cmsg_space,
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
};

/// The stdio a new container process gets; `None` is /dev/null.
#[derive(Debug, Default)]
pub struct ProcessIo {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// A process the runtime created.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// Master side of the process's terminal, when it has one.
    pub console: Option<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{op} {id}: {message}")]
    Failed {
        op: &'static str,
        id: String,
        message: String,
    },
    #[error("{op} {id}: container does not exist")]
    NotFound { op: &'static str, id: String },
    #[error("{op} {id}: {source}")]
    Io {
        op: &'static str,
        id: String,
        source: std::io::Error,
    },
}

/// What native mode asks of an OCI runtime.
pub trait Engine: Send + Sync {
    /// Creates container `id` from `bundle`; its init blocks until [`Engine::start`].
    fn create(
        &self,
        id: &str,
        bundle: &Path,
        io: ProcessIo,
        terminal: bool,
    ) -> Result<Spawned, EngineError>;
    fn start(&self, id: &str) -> Result<(), EngineError>;
    /// Starts `process` (runtime-spec Process JSON) in container `id`, detached.
    fn exec(
        &self,
        id: &str,
        bundle: &Path,
        process_json: &[u8],
        io: ProcessIo,
        terminal: bool,
    ) -> Result<Spawned, EngineError>;
    fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), EngineError>;
    fn delete(&self, id: &str, force: bool) -> Result<(), EngineError>;
    fn pause(&self, id: &str) -> Result<(), EngineError>;
    fn resume(&self, id: &str) -> Result<(), EngineError>;
    /// Applies runtime-spec LinuxResources JSON.
    fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), EngineError>;
    fn pids(&self, id: &str) -> Result<Vec<i32>, EngineError>;
}

/// Drives a runc-compatible binary.
pub struct CliEngine {
    binary: PathBuf,
    root: PathBuf,
}

/// How long the runtime may take to hand over a terminal after create/exec returned.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

impl CliEngine {
    pub fn new(binary: PathBuf, root: PathBuf) -> Self {
        Self { binary, root }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd
    }

    /// Runs a command whose output is only diagnostics.
    fn run(&self, op: &'static str, id: &str, args: &[&str]) -> Result<Vec<u8>, EngineError> {
        self.run_with_input(op, id, args, None)
    }

    fn run_with_input(
        &self,
        op: &'static str,
        id: &str,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<Vec<u8>, EngineError> {
        let io_err = |source| EngineError::Io {
            op,
            id: id.to_string(),
            source,
        };
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(io_err)?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input).map_err(io_err)?;
        }
        let out = child.wait_with_output().map_err(io_err)?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(failure(op, id, &String::from_utf8_lossy(&out.stderr)))
    }

    /// Runs create/exec: the new process inherits the command's stdio, so diagnostics
    /// come from the runtime's JSON log instead.
    fn spawn_process(
        &self,
        op: &'static str,
        id: &str,
        mut args: Vec<String>,
        work_dir: &Path,
        io: ProcessIo,
        terminal: bool,
    ) -> Result<Spawned, EngineError> {
        let io_err = |source| EngineError::Io {
            op,
            id: id.to_string(),
            source,
        };
        let unique = next_unique();
        let pid_file = work_dir.join(format!(".{op}-{unique}.pid"));
        let log_file = work_dir.join(format!(".{op}-{unique}-log.json"));
        let console = if terminal {
            Some(ConsoleSocket::bind(unique).map_err(io_err)?)
        } else {
            None
        };
        let mut cmd = self.command();
        cmd.arg("--log")
            .arg(&log_file)
            .args(["--log-format", "json"]);
        args.push("--pid-file".into());
        args.push(pid_file.display().to_string());
        if let Some(console) = &console {
            args.push("--console-socket".into());
            args.push(console.path.display().to_string());
        }
        args.push(id.to_string());
        cmd.args(&args);
        cmd.stdin(io.stdin.map(Stdio::from).unwrap_or_else(Stdio::null))
            .stdout(io.stdout.map(Stdio::from).unwrap_or_else(Stdio::null))
            .stderr(io.stderr.map(Stdio::from).unwrap_or_else(Stdio::null));
        let status = cmd.status().map_err(io_err);
        // The command holds the process's stdio ends until dropped; the copies only see
        // EOF once every holder is gone.
        drop(cmd);
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        let _ = std::fs::remove_file(&log_file);
        let status = status?;
        if !status.success() {
            let _ = std::fs::remove_file(&pid_file);
            let message = json_log_errors(&log);
            return Err(EngineError::Failed {
                op,
                id: id.to_string(),
                message: if message.is_empty() {
                    format!("runtime exited with {status} without a message")
                } else {
                    message
                },
            });
        }
        let pid = std::fs::read_to_string(&pid_file)
            .map_err(io_err)
            .and_then(|s| {
                s.trim().parse::<i32>().map_err(|_| EngineError::Failed {
                    op,
                    id: id.to_string(),
                    message: format!("runtime wrote an invalid pid file: {s:?}"),
                })
            });
        let _ = std::fs::remove_file(&pid_file);
        let pid = pid?;
        let console = match console {
            Some(socket) => Some(socket.receive(CONSOLE_TIMEOUT).map_err(io_err)?),
            None => None,
        };
        Ok(Spawned { pid, console })
    }
}

impl Engine for CliEngine {
    fn create(
        &self,
        id: &str,
        bundle: &Path,
        io: ProcessIo,
        terminal: bool,
    ) -> Result<Spawned, EngineError> {
        let args = vec![
            "create".to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
        ];
        self.spawn_process("create", id, args, bundle, io, terminal)
    }

    fn start(&self, id: &str) -> Result<(), EngineError> {
        self.run("start", id, &["start", id]).map(drop)
    }

    fn exec(
        &self,
        id: &str,
        bundle: &Path,
        process_json: &[u8],
        io: ProcessIo,
        terminal: bool,
    ) -> Result<Spawned, EngineError> {
        let process_file = bundle.join(format!(".exec-{}.json", next_unique()));
        std::fs::write(&process_file, process_json).map_err(|source| EngineError::Io {
            op: "exec",
            id: id.to_string(),
            source,
        })?;
        let args = vec![
            "exec".to_string(),
            "--process".into(),
            process_file.display().to_string(),
            "--detach".into(),
        ];
        let result = self.spawn_process("exec", id, args, bundle, io, terminal);
        let _ = std::fs::remove_file(&process_file);
        result
    }

    fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), EngineError> {
        let signal = signal.to_string();
        let mut args = vec!["kill"];
        if all {
            args.push("--all");
        }
        args.extend([id, signal.as_str()]);
        self.run("kill", id, &args).map(drop)
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), EngineError> {
        let mut args = vec!["delete"];
        if force {
            args.push("--force");
        }
        args.push(id);
        match self.run("delete", id, &args) {
            Ok(_) | Err(EngineError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn pause(&self, id: &str) -> Result<(), EngineError> {
        self.run("pause", id, &["pause", id]).map(drop)
    }

    fn resume(&self, id: &str) -> Result<(), EngineError> {
        self.run("resume", id, &["resume", id]).map(drop)
    }

    fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), EngineError> {
        self.run_with_input(
            "update",
            id,
            &["update", "--resources", "-", id],
            Some(resources_json),
        )
        .map(drop)
    }

    fn pids(&self, id: &str) -> Result<Vec<i32>, EngineError> {
        let out = self.run("ps", id, &["ps", "--format", "json", id])?;
        serde_json::from_slice::<Option<Vec<i32>>>(&out)
            .map(Option::unwrap_or_default)
            .map_err(|e| EngineError::Failed {
                op: "ps",
                id: id.to_string(),
                message: format!("runtime printed invalid pid list: {e}"),
            })
    }
}

fn next_unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn failure(op: &'static str, id: &str, message: &str) -> EngineError {
    let message = message.trim();
    if message.contains("does not exist") {
        return EngineError::NotFound {
            op,
            id: id.to_string(),
        };
    }
    EngineError::Failed {
        op,
        id: id.to_string(),
        message: if message.is_empty() {
            "runtime failed without a message".into()
        } else {
            message.to_string()
        },
    }
}

/// The `msg` of error-level lines of a runtime's JSON log (runc's `--log-format json`),
/// or the raw log when it is not JSON.
fn json_log_errors(log: &str) -> String {
    let mut errors = Vec::new();
    for line in log.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(entry) => {
                let level = entry["level"].as_str().unwrap_or_default();
                if matches!(level, "error" | "fatal" | "panic") {
                    if let Some(msg) = entry["msg"].as_str() {
                        errors.push(msg.to_string());
                    }
                }
            }
            Err(_) if !line.trim().is_empty() => errors.push(line.trim().to_string()),
            Err(_) => {}
        }
    }
    errors.join("; ")
}

/// The Unix socket a runtime sends a new terminal's master to (`--console-socket`).
struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    fn bind(unique: u64) -> std::io::Result<Self> {
        // Short and private: bundle paths can exceed sun_path's 108 bytes.
        let path =
            std::env::temp_dir().join(format!("palisade-pty-{}-{unique}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(Self { path, listener })
    }

    fn receive(&self, timeout: Duration) -> std::io::Result<File> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "runtime did not send the terminal",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    // SAFETY: SCM_RIGHTS just installed `fd` in this process; nothing else
                    // owns it. Any further descriptors are closed below.
                    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                    for &extra in &fds[1..] {
                        let _ = nix::unistd::close(extra);
                    }
                    return Ok(file);
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "runtime sent no terminal descriptor on the console socket",
        ))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_log_errors_pick_error_messages() {
        let log = r#"{"level":"info","msg":"starting"}
{"level":"error","msg":"container_linux.go: exec: \"nope\": executable file not found"}
"#;
        assert_eq!(
            json_log_errors(log),
            "container_linux.go: exec: \"nope\": executable file not found"
        );
        assert_eq!(json_log_errors("plain failure\n"), "plain failure");
    }

    #[test]
    fn missing_container_is_not_found() {
        assert!(matches!(
            failure("kill", "x", "container does not exist"),
            EngineError::NotFound { .. }
        ));
        assert!(matches!(
            failure("kill", "x", ""),
            EngineError::Failed { message, .. } if message.contains("without a message")
        ));
    }
}
