//! Where the agent listens: AF_VSOCK in the guest, a Unix socket for host tests.

use std::{fmt, os::fd::IntoRawFd, path::PathBuf, str::FromStr};

use anyhow::{Context, Result};

/// A `--listen` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `vsock:PORT`: any CID (the guest's own), this port.
    Vsock(u32),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix("vsock:") {
            let port = port
                .parse::<u32>()
                .map_err(|e| format!("vsock port {port:?}: {e}"))?;
            return Ok(Self::Vsock(port));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        Err(format!("{s:?}: expected vsock:PORT or unix:PATH"))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock(port) => write!(f, "vsock:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Binds the listener and adds it to a ttrpc server.
pub fn bind(server: ttrpc::r#async::Server, listen: &Listen) -> Result<ttrpc::r#async::Server> {
    match listen {
        Listen::Vsock(port) => {
            let listener = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, *port)
                .with_context(|| format!("binding vsock port {port}"))?;
            // SAFETY: the fd is a listening vsock socket whose ownership we hand to the server.
            unsafe { server.add_vsock_listener(listener.into_raw_fd()) }
                .map_err(|e| anyhow::anyhow!("vsock listener: {e}"))
        }
        Listen::Unix(path) => {
            // A stale socket from a previous run would make bind fail with EADDRINUSE.
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
            let listener = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            // SAFETY: the fd is a listening Unix socket whose ownership we hand to the server.
            unsafe { server.add_unix_listener(listener.into_raw_fd()) }
                .map_err(|e| anyhow::anyhow!("unix listener: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!("vsock:1024".parse(), Ok(Listen::Vsock(1024)));
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert!("vsock:x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        assert!("tcp:1".parse::<Listen>().is_err());
    }
}
