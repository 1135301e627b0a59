//! The hybrid-vsock connection multiplexer (Firecracker's protocol).
//!
//! - Host → guest: a host process connects to the Unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; we send the guest a REQUEST for `<port>` from a fresh host-side
//!   port, and on the guest's RESPONSE write `OK <host port>\n` back. From then on the Unix
//!   stream carries the connection's bytes.
//! - Guest → host: a guest connecting to CID 2 port `P` is connected to the Unix socket
//!   `<uds_path>_P` (RST if nobody listens there).
//!
//! Connections are keyed by (host-side port, guest-side port). All host fds are served on
//! the device event loop; memory is bounded by the connection limits below and each
//! connection's credit window.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, ConnState, Connection, RxFill};
use super::packet::{
    Header, TxPacket, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};
use crate::event_loop::EventLoopCtl;

/// Most simultaneous connections (each may buffer up to its credit window).
pub const MAX_CONNECTIONS: usize = 128;
/// Most accepted host connections still sending their `CONNECT` line.
pub const MAX_PENDING_HOST: usize = 32;
/// Most RSTs waiting for rx buffers; beyond this the tx queue is not read (backpressure).
pub const MAX_PENDING_RESETS: usize = 256;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports for host-initiated connections are taken from here upwards.
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// Host streams: edge-triggered, so readiness is remembered in the connection instead of
/// being re-reported while the guest has no buffers or credit.
fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// An RST owed to the guest for a connection that does not (or no longer) exist.
#[derive(Clone, Copy, Debug)]
struct PendingReset {
    /// The CID the guest addressed (so its socket lookup matches).
    src_cid: u64,
    key: ConnKey,
}

/// A host peer that connected to the listener but has not finished its `CONNECT` line.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Errors creating the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The host Unix socket cannot be created.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// See the module documentation.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_registered: bool,
    pending_host: HashMap<RawFd, PendingHost>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    rx_ready: VecDeque<ConnKey>,
    resets: VecDeque<PendingReset>,
    next_local_port: u32,
}

impl Muxer {
    /// Listen on `uds_path` for host peers of the guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let bind_err = |source| MuxerError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = match UnixListener::bind(uds_path) {
            Ok(l) => l,
            // A VMM killed with SIGKILL cannot unlink its socket; a socket file nobody
            // listens on is that leftover, and may be replaced. A live listener or any
            // other kind of file is never touched.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && is_stale_socket(uds_path) => {
                warn!("vsock: replacing stale socket {}", uds_path.display());
                std::fs::remove_file(uds_path).map_err(bind_err)?;
                UnixListener::bind(uds_path).map_err(bind_err)?
            }
            Err(e) => return Err(bind_err(e)),
        };
        if let Err(e) = set_nonblocking(&listener) {
            let _ = std::fs::remove_file(uds_path);
            return Err(bind_err(e));
        }
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            listener_registered: false,
            pending_host: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            rx_ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: LOCAL_PORT_BASE,
        })
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Start accepting host peers (once the guest driver is up).
    pub fn ensure_listening(&mut self, ctl: &mut dyn EventLoopCtl) {
        if !self.listener_registered {
            match ctl.add(self.listener.as_raw_fd(), EventSet::IN) {
                Ok(()) => self.listener_registered = true,
                Err(e) => warn!("vsock: cannot watch {}: {e}", self.uds_path.display()),
            }
        }
    }

    /// Forget every connection (device reset). Closing the fds also drops them from
    /// epoll; the listener stays.
    pub fn reset(&mut self) {
        self.pending_host.clear();
        self.conns.clear();
        self.by_fd.clear();
        self.rx_ready.clear();
        self.resets.clear();
    }

    /// Whether there is a packet for the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.rx_ready.is_empty()
    }

    /// Whether tx processing should pause until the guest takes pending replies.
    pub fn tx_backpressure(&self) -> bool {
        self.resets.len() >= MAX_PENDING_RESETS
    }

    fn queue_reset(&mut self, src_cid: u64, key: ConnKey) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            warn!("vsock: too many pending resets, dropping RST for {key:?}");
            return;
        }
        self.resets.push_back(PendingReset { src_cid, key });
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued && conn.wants_rx() {
                conn.queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    fn remove(&mut self, key: ConnKey, ctl: &mut dyn EventLoopCtl) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            ctl.remove(fd);
            self.by_fd.remove(&fd);
            // Without rx buffers the queue is not drained: a guest opening and resetting
            // connections in a loop must not grow it with stale keys.
            if conn.queued {
                self.rx_ready.retain(|k| *k != key);
            }
        }
    }

    /// Entries in the rx schedule (for tests).
    #[cfg(test)]
    pub fn rx_ready_len(&self) -> usize {
        self.rx_ready.len()
    }

    /// Close the connection and tell the guest with an RST.
    fn kill(&mut self, key: ConnKey, ctl: &mut dyn EventLoopCtl) {
        self.remove(key, ctl);
        self.queue_reset(HOST_CID, key);
    }

    /// A packet from the guest's tx queue.
    pub fn handle_guest_packet(&mut self, pkt: &TxPacket<'_>, ctl: &mut dyn EventLoopCtl) {
        let hdr = &pkt.header;
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.src_cid != self.guest_cid {
            debug!(
                "vsock: dropping packet with spoofed source CID {}",
                hdr.src_cid
            );
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            debug!(
                "vsock: no route to CID {} (type {}), resetting",
                hdr.dst_cid, hdr.type_
            );
            if hdr.op != OP_RST {
                self.queue_reset(hdr.dst_cid, key);
            }
            return;
        }
        let op = hdr.op;
        let Some(conn) = self.conns.get_mut(&key) else {
            match op {
                OP_REQUEST => self.connect_to_host(key, hdr.buf_alloc, hdr.fwd_cnt, ctl),
                OP_RST => {}
                _ => {
                    debug!("vsock: op {op} for unknown connection {key:?}");
                    self.queue_reset(HOST_CID, key);
                }
            }
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let outcome = match (op, conn.state) {
            (OP_RESPONSE, ConnState::LocalInit) => conn.establish().map(|()| true),
            (OP_RW, ConnState::Established | ConnState::Closing) => {
                conn.send_to_host(&pkt.data).map(|()| true)
            }
            (OP_CREDIT_UPDATE, _) => Ok(true),
            (OP_CREDIT_REQUEST, _) => {
                conn.request_credit_update();
                Ok(true)
            }
            (OP_SHUTDOWN, _) => Ok(!conn.peer_shutdown(hdr.flags)),
            (OP_RST, _) => {
                self.remove(key, ctl);
                return;
            }
            (op, state) => {
                debug!("vsock: unexpected op {op} in state {state:?} for {key:?}");
                Ok(false)
            }
        };
        match outcome {
            Ok(true) => self.schedule(key),
            Ok(false) => self.kill(key, ctl),
            Err(e) => {
                debug!("vsock: resetting {key:?}: {e}");
                self.kill(key, ctl);
            }
        }
    }

    /// A tx packet `virtio-vsock` could not parse but whose header is readable: reset the
    /// connection it names, so the guest socket fails instead of hanging.
    pub fn handle_bad_packet(&mut self, hdr: Header, ctl: &mut dyn EventLoopCtl) {
        if hdr.src_cid != self.guest_cid || hdr.op == OP_RST {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        self.remove(key, ctl);
        let src_cid = if hdr.dst_cid == HOST_CID {
            HOST_CID
        } else {
            hdr.dst_cid
        };
        self.queue_reset(src_cid, key);
    }

    /// The guest connects to host port `key.local_port`: reach `<uds_path>_<port>`.
    fn connect_to_host(
        &mut self,
        key: ConnKey,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
        ctl: &mut dyn EventLoopCtl,
    ) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached, refusing guest connection {key:?}");
            self.queue_reset(HOST_CID, key);
            return;
        }
        let mut path = self.uds_path.as_os_str().to_owned();
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connection to {path:?} failed: {e}");
                self.queue_reset(HOST_CID, key);
                return;
            }
        };
        let mut conn = Connection::guest_initiated(stream, key);
        conn.update_peer_credit(peer_buf_alloc, peer_fwd_cnt);
        if let Err(e) = self.add_connection(conn, ctl) {
            debug!("vsock: cannot serve guest connection {key:?}: {e}");
            self.queue_reset(HOST_CID, key);
        }
    }

    fn add_connection(
        &mut self,
        conn: Connection,
        ctl: &mut dyn EventLoopCtl,
    ) -> Result<(), crate::event_loop::EventLoopError> {
        let key = conn.key;
        let fd = conn.stream.as_raw_fd();
        if let Err(e) = set_nonblocking(&conn.stream) {
            return Err(crate::event_loop::EventLoopError::Register { fd, source: e });
        }
        ctl.add(fd, stream_events())?;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(key);
        Ok(())
    }

    /// A host fd of this device is ready.
    pub fn handle_host_event(
        &mut self,
        fd: RawFd,
        events: EventSet,
        ctl: &mut dyn EventLoopCtl,
        device_active: bool,
    ) {
        if fd == self.listener.as_raw_fd() {
            self.accept_host_peers(ctl, device_active);
        } else if self.pending_host.contains_key(&fd) {
            self.read_connect_line(fd, ctl);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.connection_event(key, events, ctl);
        } else {
            // An fd closed by a reset while its event was in flight.
            ctl.remove(fd);
        }
    }

    fn accept_host_peers(&mut self, ctl: &mut dyn EventLoopCtl, device_active: bool) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            };
            // Closing the stream right away tells the peer to retry later.
            if !device_active {
                debug!("vsock: host peer connected before the guest driver is up");
                continue;
            }
            if self.pending_host.len() >= MAX_PENDING_HOST || self.conns.len() >= MAX_CONNECTIONS {
                warn!("vsock: connection limit reached, refusing host peer");
                continue;
            }
            let fd = stream.as_raw_fd();
            if set_nonblocking(&stream).is_err() {
                continue;
            }
            match ctl.add(fd, EventSet::IN) {
                Ok(()) => {
                    self.pending_host.insert(
                        fd,
                        PendingHost {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) => warn!("vsock: cannot watch host peer: {e}"),
            }
        }
    }

    fn drop_pending(&mut self, fd: RawFd, ctl: &mut dyn EventLoopCtl) {
        ctl.remove(fd);
        self.pending_host.remove(&fd);
    }

    /// Read the `CONNECT <port>\n` line one byte at a time, so no byte of the data that
    /// follows it is consumed here.
    fn read_connect_line(&mut self, fd: RawFd, ctl: &mut dyn EventLoopCtl) {
        let Some(pending) = self.pending_host.get_mut(&fd) else {
            return;
        };
        loop {
            let mut byte = [0u8; 1];
            match pending.stream.read(&mut byte) {
                Ok(0) => return self.drop_pending(fd, ctl),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => {
                    pending.line.push(byte[0]);
                    if pending.line.len() > MAX_CONNECT_LINE {
                        debug!("vsock: host peer sent an overlong CONNECT line");
                        return self.drop_pending(fd, ctl);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.drop_pending(fd, ctl),
            }
        }
        let Some(port) = parse_connect_line(&pending.line) else {
            debug!(
                "vsock: bad CONNECT line {:?}",
                String::from_utf8_lossy(&pending.line)
            );
            return self.drop_pending(fd, ctl);
        };
        let Some(PendingHost { stream, .. }) = self.pending_host.remove(&fd) else {
            return;
        };
        let Some(local_port) = self.allocate_local_port(port) else {
            ctl.remove(fd);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        // Same fd, now a connection: switch to the stream's edge-triggered events.
        if let Err(e) = ctl.modify(fd, stream_events()) {
            warn!("vsock: cannot watch host connection: {e}");
            ctl.remove(fd);
            return;
        }
        self.by_fd.insert(fd, key);
        self.conns
            .insert(key, Connection::host_initiated(stream, key));
        self.schedule(key);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn connection_event(&mut self, key: ConnKey, events: EventSet, ctl: &mut dyn EventLoopCtl) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            debug!("vsock: host stream of {key:?} reported an error");
            return self.kill(key, ctl);
        }
        if events.contains(EventSet::HANG_UP) {
            conn.set_host_hung_up();
        } else if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
            conn.set_host_readable();
        }
        if events.contains(EventSet::OUT) {
            if let Err(e) = conn.flush_to_host() {
                debug!("vsock: resetting {key:?}: {e}");
                return self.kill(key, ctl);
            }
        }
        self.schedule(key);
    }

    /// Fill one rx buffer with the next packet for the guest. `None` if there is none.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
        ctl: &mut dyn EventLoopCtl,
    ) -> Option<u32> {
        if let Some(reset) = self.resets.pop_front() {
            self.write_reset(pkt, reset);
            return Some(0);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.fill_rx(pkt, self.guest_cid) {
                RxFill::Packet(len) => {
                    self.schedule(key);
                    return Some(len);
                }
                RxFill::Nothing => {}
                RxFill::Reset => {
                    self.remove(key, ctl);
                    self.write_reset(
                        pkt,
                        PendingReset {
                            src_cid: HOST_CID,
                            key,
                        },
                    );
                    return Some(0);
                }
            }
        }
        None
    }

    fn write_reset<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>, reset: PendingReset) {
        pkt.set_src_cid(reset.src_cid)
            .set_dst_cid(self.guest_cid)
            .set_src_port(reset.key.local_port)
            .set_dst_port(reset.key.peer_port)
            .set_len(0)
            .set_type(TYPE_STREAM)
            .set_op(OP_RST)
            .set_flags(0)
            .set_buf_alloc(0)
            .set_fwd_cnt(0);
    }

    /// The connection `key`, for tests.
    #[cfg(test)]
    pub fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(&key)
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours: leave nothing behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Whether `path` is a Unix socket file without a listener (connecting is refused).
fn is_stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    is_socket
        && matches!(
            UnixStream::connect(path),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
        )
}

/// Make `fd` non-blocking with `fcntl`: std's `set_nonblocking` on sockets is an
/// `ioctl(FIONBIO)`, which the event-loop thread's seccomp filter does not allow.
fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL on an fd owned by the caller; no memory is shared with the kernel.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, F_SETFL with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connect to the Unix socket at `path` without ever blocking the event loop: a listener
/// whose backlog is full answers `EAGAIN` instead of making us wait (std's
/// `UnixStream::connect` would block until the host process accepts).
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::{FromRawFd, OwnedFd};

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Keep a terminating NUL: paths must be strictly shorter than sun_path.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; OwnedFd closes it on every path.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and the length passed
    // is its size.
    let ret = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// `CONNECT <port>` (the newline already stripped; a trailing `\r` tolerated).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_connect_line;

    #[test]
    fn connect_line_grammar() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"connect 5",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"CONNECT 5 6",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }
}
