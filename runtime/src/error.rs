//! Typed errors of the runtime library. Every message names what failed (a spec field, a
//! path, a syscall) so that a CLI or shim can show it to a user unchanged.

use std::path::PathBuf;

use crate::{cgroups::CgroupError, seccomp::SeccompError};

/// Result alias of the runtime library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the runtime library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A container id that is empty, too long, or could escape the state root.
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },

    /// `create` of an id that already has a state directory.
    #[error("container {0:?} already exists")]
    AlreadyExists(String),

    /// No state directory for this id.
    #[error("container {0:?} does not exist")]
    NotFound(String),

    /// The bundle's `config.json` could not be read or parsed.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// The spec parsed but is not acceptable. `field` is a JSON path such as
    /// `linux.namespaces[2].type`.
    #[error("{field}: {msg}")]
    InvalidSpec { field: String, msg: String },

    /// An operation that the container's current status does not allow.
    #[error("container {id:?} is {status}: {msg}")]
    InvalidState {
        id: String,
        status: crate::state::Status,
        msg: &'static str,
    },

    /// The container's process has already exited.
    #[error("container not running")]
    NotRunning,

    /// A feature this runtime deliberately does not implement.
    #[error("{0} is not supported")]
    Unsupported(String),

    /// An error reported by a container process (init or exec) before it executed the
    /// user's program, e.g. `exec "/bin/nope": No such file or directory`.
    #[error("{0}")]
    Child(String),

    /// A lifecycle hook failed or timed out.
    #[error("{kind} hook {path:?}: {msg}")]
    Hook {
        kind: &'static str,
        path: PathBuf,
        msg: String,
    },

    /// An I/O operation on a host path failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A system call failed.
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },

    #[error(transparent)]
    Cgroup(#[from] CgroupError),

    #[error(transparent)]
    Seccomp(#[from] SeccompError),

    /// State or sync messages that could not be (de)serialized.
    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Adds a context message to `io::Result`s and `nix::Result`s.
pub trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for serde_json::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Json {
            context: context(),
            source,
        })
    }
}
