//! [`Engine`] on the `palisade-runtime` library, in-process: no runtime binary is
//! executed per operation. Created processes are children of the shim (its reaper
//! collects them); the library waits for its own intermediate children, which is why
//! engine calls run under the reaper's child guard.

use std::{fs::File, os::fd::OwnedFd, path::Path};

use palisade_runtime::{
    CreateOptions, Error as RuntimeError, ExecOptions, Runtime, Signal, Stdio, Terminal,
};

use super::engine::{Engine, EngineError, ProcessIo, Spawned};

pub struct LibraryEngine {
    runtime: Runtime,
    /// One runtime call at a time: the library forks from this multi-threaded process,
    /// and two calls forking at once would each copy the other's half-held locks.
    serial: std::sync::Mutex<()>,
}

impl LibraryEngine {
    /// Opens (creating it if needed) the runtime's state root.
    pub fn new(root: &Path) -> Result<Self, EngineError> {
        let runtime = Runtime::new(root).map_err(|e| error("open root", "", e))?;
        Ok(Self {
            runtime,
            serial: std::sync::Mutex::new(()),
        })
    }

    fn load(&self, op: &'static str, id: &str) -> Result<palisade_runtime::Container, EngineError> {
        self.runtime.load(id).map_err(|e| error(op, id, e))
    }

    fn serialize(&self) -> std::sync::MutexGuard<'_, ()> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn error(op: &'static str, id: &str, e: RuntimeError) -> EngineError {
    match e {
        RuntimeError::NotFound(_) => EngineError::NotFound {
            op,
            id: id.to_string(),
        },
        other => EngineError::Failed {
            op,
            id: id.to_string(),
            message: other.to_string(),
        },
    }
}

/// The library inherits the caller's stream where one is `None`; a container must never
/// get the shim's own, so those become /dev/null.
fn stdio(io: ProcessIo, op: &'static str, id: &str) -> Result<Stdio, EngineError> {
    let null = || -> Result<Option<OwnedFd>, EngineError> {
        File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(|f| Some(OwnedFd::from(f)))
            .map_err(|source| EngineError::Io {
                op,
                id: id.to_string(),
                source,
            })
    };
    Ok(Stdio {
        stdin: match io.stdin {
            Some(fd) => Some(fd),
            None => null()?,
        },
        stdout: match io.stdout {
            Some(fd) => Some(fd),
            None => null()?,
        },
        stderr: match io.stderr {
            Some(fd) => Some(fd),
            None => null()?,
        },
    })
}

fn terminal(wanted: bool) -> Terminal {
    if wanted {
        Terminal::ReturnMaster
    } else {
        Terminal::None
    }
}

impl Engine for LibraryEngine {
    fn create(
        &self,
        id: &str,
        bundle: &Path,
        io: ProcessIo,
        wants_terminal: bool,
    ) -> Result<Spawned, EngineError> {
        let _serial = self.serialize();
        let opts = CreateOptions {
            stdio: stdio(io, "create", id)?,
            terminal: terminal(wants_terminal),
            ..Default::default()
        };
        let mut container = self
            .runtime
            .create(id, bundle, opts)
            .map_err(|e| error("create", id, e))?;
        let pid = container.pid().ok_or_else(|| EngineError::Failed {
            op: "create",
            id: id.to_string(),
            message: "runtime reported no init pid".into(),
        })?;
        Ok(Spawned {
            pid,
            console: container.take_pty_master().map(File::from),
        })
    }

    fn start(&self, id: &str) -> Result<(), EngineError> {
        let _serial = self.serialize();
        self.load("start", id)?
            .start()
            .map_err(|e| error("start", id, e))
    }

    fn exec(
        &self,
        id: &str,
        _bundle: &Path,
        process_json: &[u8],
        io: ProcessIo,
        wants_terminal: bool,
    ) -> Result<Spawned, EngineError> {
        let _serial = self.serialize();
        let process = serde_json::from_slice(process_json).map_err(|e| EngineError::Failed {
            op: "exec",
            id: id.to_string(),
            message: format!("invalid process spec: {e}"),
        })?;
        let mut opts = ExecOptions::new(process);
        opts.stdio = stdio(io, "exec", id)?;
        opts.terminal = terminal(wants_terminal);
        let handle = self
            .load("exec", id)?
            .exec(opts)
            .map_err(|e| error("exec", id, e))?;
        Ok(Spawned {
            pid: handle.pid,
            console: handle.pty_master.map(File::from),
        })
    }

    fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), EngineError> {
        let _serial = self.serialize();
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| EngineError::Failed {
                op: "kill",
                id: id.to_string(),
                message: format!("invalid signal {signal}"),
            })?;
        self.load("kill", id)?
            .kill(signal, all)
            .map_err(|e| error("kill", id, e))
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), EngineError> {
        let _serial = self.serialize();
        match self.runtime.load(id) {
            Ok(container) => container.delete(force).map_err(|e| error("delete", id, e)),
            Err(RuntimeError::NotFound(_)) => Ok(()),
            Err(e) => Err(error("delete", id, e)),
        }
    }

    fn pause(&self, id: &str) -> Result<(), EngineError> {
        let _serial = self.serialize();
        self.load("pause", id)?
            .pause()
            .map_err(|e| error("pause", id, e))
    }

    fn resume(&self, id: &str) -> Result<(), EngineError> {
        let _serial = self.serialize();
        self.load("resume", id)?
            .resume()
            .map_err(|e| error("resume", id, e))
    }

    fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), EngineError> {
        let _serial = self.serialize();
        let resources =
            serde_json::from_slice(resources_json).map_err(|e| EngineError::Failed {
                op: "update",
                id: id.to_string(),
                message: format!("invalid LinuxResources: {e}"),
            })?;
        self.load("update", id)?
            .update(&resources)
            .map_err(|e| error("update", id, e))
    }

    fn pids(&self, id: &str) -> Result<Vec<i32>, EngineError> {
        let _serial = self.serialize();
        self.load("ps", id)?.pids().map_err(|e| error("ps", id, e))
    }
}
