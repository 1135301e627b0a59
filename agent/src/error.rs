//! The agent's error type and its mapping onto ttrpc status codes.
//!
//! Every message names what was wrong (a request field, a container id, a path) because it
//! travels unchanged to the shim and from there to the user.

use ttrpc::{get_status, Code};

/// Result alias of the agent.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A malformed request; `field` is the request field (e.g. `spec_json`, `rootfs.fstype`).
    #[error("{field}: {msg}")]
    InvalidArgument { field: String, msg: String },

    /// An unknown container or process.
    #[error("{0} not found")]
    NotFound(String),

    /// A container or exec id that is already in use.
    #[error("{0} already exists")]
    AlreadyExists(String),

    /// The request is valid but the object is in the wrong state for it.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The runtime library refused or failed.
    #[error("{context}: {source}")]
    Runtime {
        context: String,
        #[source]
        source: palisade_runtime::Error,
    },

    /// An I/O operation in the guest failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// The ttrpc status code the shim sees.
    pub fn code(&self) -> Code {
        use palisade_runtime::Error as R;
        match self {
            Self::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::Io { .. } => Code::INTERNAL,
            Self::Runtime { source, .. } => match source {
                R::InvalidId { .. } | R::InvalidSpec { .. } | R::Config { .. } => {
                    Code::INVALID_ARGUMENT
                }
                R::AlreadyExists(_) => Code::ALREADY_EXISTS,
                R::NotFound(_) => Code::NOT_FOUND,
                R::InvalidState { .. } | R::NotRunning => Code::FAILED_PRECONDITION,
                R::Unsupported(_) => Code::UNIMPLEMENTED,
                _ => Code::INTERNAL,
            },
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(get_status(e.code(), e.to_string()))
    }
}

/// Adds context to I/O and nix results.
pub trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| AgentError::Io {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| AgentError::Io {
            context: context(),
            source: errno.into(),
        })
    }
}

/// Adds context to runtime-library results.
pub trait RuntimeContext<T> {
    fn runtime_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> RuntimeContext<T> for palisade_runtime::Result<T> {
    fn runtime_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| AgentError::Runtime {
            context: context(),
            source,
        })
    }
}
