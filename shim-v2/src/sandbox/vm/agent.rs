//! The shim's connection to `palisade-agent` in the guest: the Firecracker hybrid-vsock
//! handshake on the VMM's Unix socket, then ttrpc (`palisade.agent.v1`).

use std::{path::Path, time::Duration};

use palisade_agent_protocol::{
    agent::CheckRequest, agent_ttrpc::AgentClient, DEFAULT_VSOCK_PORT, PROTOCOL_VERSION,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};
use ttrpc::context::{self, Context};

/// Bound on one connection attempt (socket connect, CONNECT/OK handshake, Check): before
/// the guest's vsock driver is up, a CONNECT may get no answer at all.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts while the guest boots.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The handshake reply is `OK <host port>\n`; anything longer is not the VMM.
const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AgentConnectError {
    #[error("hybrid vsock {socket}: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error("hybrid vsock {socket}: unexpected handshake reply {reply:?}")]
    Handshake { socket: String, reply: String },
    #[error("agent check: {0}")]
    Check(ttrpc::Error),
    #[error("agent speaks protocol version {0}, the shim needs at least {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("agent is not serving yet")]
    NotServing,
}

/// A context for a request bounded by `timeout`.
pub fn deadline(timeout: Duration) -> Context {
    context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

/// A context without deadline, for long polls (output reads, process waits, OOM events):
/// a client-side timeout would abandon a reply the agent may already have taken data out
/// of its buffers for. They end when the guest answers or the VM's connection closes
/// (the VMM exited), which the VM supervisor guarantees.
pub fn long_poll() -> Context {
    context::Context::default()
}

/// Connects to guest vsock port `port` through the VMM's hybrid-vsock socket.
pub async fn connect_vsock(socket: &Path, port: u32) -> Result<UnixStream, AgentConnectError> {
    let name = socket.display().to_string();
    let io = |source| AgentConnectError::Io {
        socket: name.clone(),
        source,
    };
    let mut stream = UnixStream::connect(socket).await.map_err(io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io)?;
    // Byte by byte: whatever follows the newline is the guest's first ttrpc bytes.
    let mut reply = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(io)?;
        if byte == b'\n' {
            break;
        }
        reply.push(byte);
        if reply.len() > MAX_REPLY {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if !reply.starts_with("OK ") {
        return Err(AgentConnectError::Handshake {
            socket: name,
            reply,
        });
    }
    Ok(stream)
}

/// One attempt: connect, then `Check` (protocol version, serving).
pub async fn connect_once(socket: &Path) -> Result<AgentClient, AgentConnectError> {
    let attempt = async {
        let stream = connect_vsock(socket, DEFAULT_VSOCK_PORT).await?;
        let client = AgentClient::new(ttrpc::r#async::Client::new(stream.into()));
        let check = client
            .check(deadline(ATTEMPT_TIMEOUT), &CheckRequest::new())
            .await
            .map_err(AgentConnectError::Check)?;
        if check.protocol_version < PROTOCOL_VERSION {
            return Err(AgentConnectError::Version(check.protocol_version));
        }
        if !check.serving {
            return Err(AgentConnectError::NotServing);
        }
        Ok(client)
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(AgentConnectError::Io {
            socket: socket.display().to_string(),
            source: std::io::ErrorKind::TimedOut.into(),
        }),
    }
}

/// Retries [`connect_once`] until it succeeds, `alive` says the VM is gone, or `timeout`
/// passes; the error is the last attempt's.
pub async fn wait_ready(
    socket: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<AgentClient, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no attempt made");
    loop {
        if !alive() {
            return Err(format!(
                "the VMM exited before the agent answered (last attempt: {last})"
            ));
        }
        if socket.exists() {
            match connect_once(socket).await {
                Ok(client) => return Ok(client),
                Err(e) => last = e.to_string(),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the agent did not answer within {timeout:?} (last attempt: {last})"
            ));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn handshake_accepts_ok_and_rejects_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            for reply in ["OK 1073741824\nX", "NO\n"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut line = vec![0u8; 13];
                s.read_exact(&mut line).await.unwrap();
                assert_eq!(&line, b"CONNECT 1024\n");
                s.write_all(reply.as_bytes()).await.unwrap();
                // Keep the connection until the client is done with it.
                let _ = s.read_u8().await;
            }
        });
        let mut stream = connect_vsock(&path, 1024).await.unwrap();
        // The byte after the newline is left for the ttrpc client.
        assert_eq!(stream.read_u8().await.unwrap(), b'X');
        drop(stream);
        let err = connect_vsock(&path, 1024).await.unwrap_err();
        assert!(err.to_string().contains("\"NO\""), "{err}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn wait_ready_stops_when_the_vm_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let Err(err) = wait_ready(&dir.path().join("none"), Duration::from_secs(5), || false).await
        else {
            panic!("wait_ready succeeded without a VM");
        };
        assert!(err.contains("VMM exited"), "{err}");
    }
}
