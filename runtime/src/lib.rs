//! `palisade-runtime`: an OCI runtime-spec (1.2) implementation for Linux.
//!
//! The library is used three ways: by the runc-compatible `palisade` CLI, in-process by the
//! containerd shim (a multi-threaded tokio program) and by the in-guest agent. Its process
//! model is built for the last two:
//!
//! * The container's init and every exec'd process are **direct children of the caller**
//!   (the final fork uses `CLONE_PARENT`, as runc's `nsexec` does), so the caller reaps them
//!   with `waitpid` and sees their real exit statuses. The library never reaps anything in
//!   the background.
//! * Namespaces are unshared/joined in a forked, single-threaded intermediate process, so
//!   calling from a multi-threaded process is safe (`unshare(CLONE_NEWUSER)` and
//!   `setns` into a user or mount namespace refuse multi-threaded callers).
//! * [`Container::create`](Runtime::create) leaves the init blocked before `execve` on an
//!   exec fifo in the state directory until [`Container::start`]; a failure at any step
//!   removes everything made so far (process, cgroup, state directory).
//!
//! ```no_run
//! use palisade_runtime::{CreateOptions, Runtime};
//! # fn main() -> palisade_runtime::Result<()> {
//! let runtime = Runtime::new("/run/palisade")?;
//! let mut container = runtime.create("web", "/path/to/bundle".as_ref(), CreateOptions::default())?;
//! container.start()?;
//! let pid = container.pid().expect("created containers have an init pid");
//! // ... the caller waitpid()s `pid` ...
//! # let _ = pid;
//! container.delete(false)?;
//! # Ok(()) }
//! ```

pub mod capabilities;
pub mod cgroups;
pub mod check;
pub mod container;
pub mod error;
pub mod hooks;
pub mod namespaces;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod state;
pub mod utils;

pub use container::{Container, Runtime};
pub use error::{Error, Result};
pub use nix::sys::signal::Signal;
pub use process::{CreateOptions, ExecHandle, ExecOptions, Stdio, Terminal};
pub use state::{State, Status};
