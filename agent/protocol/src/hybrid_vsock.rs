//! Connecting to the agent from the host through a VMM's hybrid-vsock Unix socket
//! (Firecracker's protocol, which palisade-vmm implements): the host peer connects to the
//! socket, sends `CONNECT <port>\n`, and the VMM answers `OK <host port>\n` once the guest
//! accepted; from then on the stream is the guest connection.

use std::{io, path::Path};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

use crate::agent_ttrpc::AgentClient;

/// The longest acknowledgement line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_ACK: usize = 64;

/// Opens a stream to guest vsock `port` through the hybrid-vsock socket at `socket`.
///
/// Callers bound the wait with `tokio::time::timeout`: before the guest's agent listens,
/// the VMM closes the connection (an error here) and the caller retries.
pub async fn connect_stream(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // Byte by byte: anything after the newline is already ttrpc data and must stay in the
    // socket.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "{}: CONNECT {port} refused (connection closed after {:?})",
                    socket.display(),
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_ACK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: acknowledgement longer than {MAX_ACK} bytes",
                    socket.display()
                ),
            ));
        }
    }
    match line.strip_prefix(b"OK ") {
        Some(host_port) if !host_port.is_empty() && host_port.iter().all(u8::is_ascii_digit) => {
            Ok(stream)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: CONNECT {port}: unexpected reply {:?}",
                socket.display(),
                String::from_utf8_lossy(&line)
            ),
        )),
    }
}

/// An [`AgentClient`] over guest vsock `port` through the hybrid-vsock socket at `socket`.
pub async fn connect(socket: &Path, port: u32) -> io::Result<AgentClient> {
    let stream = connect_stream(socket, port).await?;
    let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(stream));
    Ok(AgentClient::new(client))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{
        io::{AsyncBufReadExt, BufReader},
        net::UnixListener,
    };

    use super::*;
    use crate::{
        agent::{CheckRequest, CheckResponse},
        agent_ttrpc::{create_agent, Agent},
    };

    struct Fake;

    #[async_trait::async_trait]
    impl Agent for Fake {
        async fn check(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            _: CheckRequest,
        ) -> ttrpc::Result<CheckResponse> {
            Ok(CheckResponse {
                protocol_version: crate::PROTOCOL_VERSION,
                serving: true,
                ..Default::default()
            })
        }
    }

    /// A fake VMM: answers the handshake with `reply`, then (on OK) splices the stream to
    /// a ttrpc server serving [`Fake`] on `guest`.
    async fn fake_vmm(listener: UnixListener, reply: &'static str, guest: std::path::PathBuf) {
        let (stream, _) = listener.accept().await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        let mut stream = reader.into_inner();
        stream.write_all(reply.as_bytes()).await.unwrap();
        if !reply.starts_with("OK") {
            return;
        }
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", guest.display()))
            .unwrap()
            .register_service(create_agent(Arc::new(Fake)));
        server.start().await.unwrap();
        let mut to_guest = UnixStream::connect(&guest).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut to_guest).await;
        drop(server);
    }

    #[tokio::test]
    async fn handshake_then_ttrpc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_vmm(listener, "OK 7\n", dir.path().join("guest.sock")));
        let client = connect(&path, 1024).await.unwrap();
        let check = client
            .check(
                ttrpc::context::with_timeout(5_000_000_000),
                &CheckRequest::new(),
            )
            .await
            .unwrap();
        assert!(check.serving);
    }

    #[tokio::test]
    async fn refused_and_garbage_replies_are_errors() {
        for reply in ["", "NO\n", "OK x\n"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vsock.sock");
            let listener = UnixListener::bind(&path).unwrap();
            tokio::spawn(fake_vmm(listener, reply, dir.path().join("guest.sock")));
            let err = connect_stream(&path, 1024).await.unwrap_err();
            assert!(err.to_string().contains("vsock.sock"), "{reply:?}: {err}");
        }
    }
}
