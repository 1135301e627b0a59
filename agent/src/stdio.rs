//! Stdio of container processes: pipes or a pty on the container side, non-blocking
//! [`Stream`]s on the agent side that the stdio RPCs read from and write to.
//!
//! Reads go straight to the pipe (no agent-side buffer): when nobody calls ReadStdout the
//! pipe fills and the process blocks, which is the back-pressure a terminal or containerd's
//! FIFOs give too.

use std::{
    fs::OpenOptions,
    io,
    os::fd::{AsFd, OwnedFd},
};

use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    unistd::{pipe2, read, write},
};
use tokio::{io::unix::AsyncFd, sync::Mutex};

/// The largest chunk one ReadStdout/ReadStderr returns.
pub const MAX_READ_CHUNK: usize = 1 << 20;
/// The chunk size when the client does not ask for one.
pub const DEFAULT_READ_CHUNK: usize = 64 << 10;

/// A non-blocking pipe end or pty master, driven by tokio's reactor.
#[derive(Debug)]
pub struct Stream {
    fd: AsyncFd<OwnedFd>,
}

impl Stream {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: `fd` is an open OwnedFd that the AsyncFd owns for its whole life, so the
        // descriptor stays valid and refers to the same file until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Reads what is available (waiting until something is); `Ok(0)` is end of stream.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                // A pty master reports EIO once every slave fd is closed: end of stream.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| write(fd.get_ref(), data).map_err(io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// One output stream of a process as the RPCs see it: `None` once EOF was returned.
#[derive(Debug, Default)]
pub struct OutputSlot(Mutex<Option<Stream>>);

impl OutputSlot {
    pub fn new(stream: Option<Stream>) -> Self {
        Self(Mutex::new(stream))
    }

    /// Long-polls for up to `max` bytes; `(data, eof)`.
    pub async fn read_chunk(&self, max: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut slot = self.0.lock().await;
        let Some(stream) = slot.as_ref() else {
            return Ok((Vec::new(), true));
        };
        let mut buf = vec![0; max];
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            *slot = None;
            return Ok((Vec::new(), true));
        }
        buf.truncate(n);
        Ok((buf, false))
    }
}

/// The stdin of a process: `None` when it has none or it was closed.
#[derive(Debug, Default)]
pub struct InputSlot(Mutex<Option<Stream>>);

impl InputSlot {
    pub fn new(stream: Option<Stream>) -> Self {
        Self(Mutex::new(stream))
    }

    /// Writes all of `data`; `Ok(false)` when there is no open stdin.
    pub async fn write(&self, data: &[u8]) -> io::Result<bool> {
        let slot = self.0.lock().await;
        match slot.as_ref() {
            Some(stream) => stream.write_all(data).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Closes stdin so the process reads EOF.
    pub async fn close(&self) {
        self.0.lock().await.take();
    }
}

/// The container-side fds and the agent-side streams of a process without a terminal.
pub struct PipeSet {
    /// Handed to the runtime (dup'ed onto the process's 0, 1, 2).
    pub child: palisade_runtime::Stdio,
    pub stdin: Option<Stream>,
    pub stdout: Stream,
    pub stderr: Stream,
}

/// Pipes for stdout and stderr, and for stdin when `with_stdin` (otherwise `/dev/null`).
pub fn pipes(with_stdin: bool) -> io::Result<PipeSet> {
    let (stdin_child, stdin) = if with_stdin {
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC)?;
        (read_end, Some(Stream::new(write_end)?))
    } else {
        let null = OpenOptions::new().read(true).open("/dev/null")?;
        (OwnedFd::from(null), None)
    };
    let (stdout, stdout_child) = pipe2(OFlag::O_CLOEXEC)?;
    let (stderr, stderr_child) = pipe2(OFlag::O_CLOEXEC)?;
    Ok(PipeSet {
        child: palisade_runtime::Stdio {
            stdin: Some(stdin_child),
            stdout: Some(stdout_child),
            stderr: Some(stderr_child),
        },
        stdin,
        stdout: Stream::new(stdout)?,
        stderr: Stream::new(stderr)?,
    })
}

/// Agent-side streams over a pty master: output is read from it and stdin written to it.
pub fn pty_streams(master: OwnedFd, with_stdin: bool) -> io::Result<(Option<Stream>, Stream)> {
    let stdin = if with_stdin {
        Some(Stream::new(master.as_fd().try_clone_to_owned()?)?)
    } else {
        None
    };
    Ok((stdin, Stream::new(master)?))
}

/// Sets the window size of the pty behind `fd` (a pty master).
pub fn resize(fd: i32, rows: u16, columns: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points to a live,
    // initialised struct for the duration of the call; `fd` is owned by the caller.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size as *const libc::winsize) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_round_trip_and_eof() {
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let input = InputSlot::new(Some(Stream::new(write_end).unwrap()));
        let output = OutputSlot::new(Some(Stream::new(read_end).unwrap()));
        assert!(input.write(b"hello").await.unwrap());
        let (data, eof) = output.read_chunk(64).await.unwrap();
        assert_eq!((data.as_slice(), eof), (&b"hello"[..], false));
        input.close().await;
        assert!(!input.write(b"x").await.unwrap());
        assert_eq!(output.read_chunk(64).await.unwrap(), (Vec::new(), true));
        assert_eq!(output.read_chunk(64).await.unwrap(), (Vec::new(), true));
    }
}
