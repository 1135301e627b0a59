//! One vsock stream connection between a guest socket and a host Unix stream.
//!
//! Flow control is virtio-vsock's credit scheme, in both directions:
//! - guest → host: we advertise `buf_alloc = CONN_BUF_SIZE` and `fwd_cnt` = bytes handed
//!   to the host stream. A well-behaved guest never has more than `CONN_BUF_SIZE` bytes in
//!   flight, so the per-connection buffer for a slow host peer is bounded by that; a guest
//!   that overruns its credit gets the connection reset.
//! - host → guest: we only read from the host stream as much as the guest's advertised
//!   credit (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) allows, and ask for a credit
//!   update when it runs out. Unread data stays in the host socket's buffer.
//!
//! Host streams are registered edge-triggered, so `host_readable` remembers that the
//! stream may have data until a read returns `WouldBlock`.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use tracing::debug;
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileSlice, WriteVolatile};

use super::packet::{
    HOST_CID, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise per connection (guest → host direction).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much was forwarded unreported.
/// Any value ≤ `CONN_BUF_SIZE` avoids deadlock (a guest blocked on credit has
/// `CONN_BUF_SIZE` unreported bytes once we drain); half keeps the pipe full.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 2;

/// Identifies a connection: (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The port on the host (CID 2) side.
    pub local_port: u32,
    /// The port on the guest side.
    pub peer_port: u32,
}

/// Lifecycle of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// A host peer asked for it (`CONNECT <port>`); REQUEST sent or pending, waiting for
    /// the guest's RESPONSE.
    LocalInit,
    /// Data flows both ways.
    Established,
    /// The host peer stopped sending; SHUTDOWN sent to the guest. The guest may still
    /// send (to a half-closed peer) until it closes with SHUTDOWN or RST.
    Closing,
}

/// Control packets a connection owes the guest (bit set).
const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_CREDIT_UPDATE: u8 = 4;

/// What filling one rx buffer for a connection produced.
#[derive(Debug, PartialEq, Eq)]
pub enum RxFill {
    /// A packet with this many data bytes was written.
    Packet(u32),
    /// Nothing to send right now.
    Nothing,
    /// The host stream failed: the connection must be reset.
    Reset,
}

/// Why a connection must be torn down.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit we gave it.
    #[error("guest overran its credit ({buffered} bytes buffered, {incoming} more arrived)")]
    CreditOverrun {
        /// Bytes waiting for the host stream.
        buffered: usize,
        /// Size of the offending packet.
        incoming: usize,
    },
    /// Writing to the host stream failed.
    #[error("host stream write failed: {0}")]
    HostWrite(#[source] io::Error),
}

/// A guest ⟷ host stream connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side of the connection.
    pub stream: UnixStream,
    /// (host port, guest port).
    pub key: ConnKey,
    /// Where in its lifecycle the connection is.
    pub state: ConnState,
    /// In the muxer's rx queue already.
    pub queued: bool,
    pending: u8,
    host_readable: bool,
    /// The host peer closed both directions (EPOLLHUP), not just its sending side.
    host_hung_up: bool,
    peer_shutdown: u32,
    // guest → host
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are ours (the `OK` line), not guest data.
    tx_uncounted: usize,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    shutdown_host_write: bool,
    // host → guest
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, state: ConnState, pending: u8) -> Self {
        Connection {
            stream,
            key,
            state,
            queued: false,
            pending,
            host_readable: state == ConnState::Established,
            host_hung_up: false,
            peer_shutdown: 0,
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            shutdown_host_write: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
        }
    }

    /// A connection a host peer asked for; a REQUEST to the guest is pending.
    pub fn host_initiated(stream: UnixStream, key: ConnKey) -> Self {
        Self::new(stream, key, ConnState::LocalInit, PENDING_REQUEST)
    }

    /// A connection the guest asked for and the host accepted; a RESPONSE is pending.
    pub fn guest_initiated(stream: UnixStream, key: ConnKey) -> Self {
        Self::new(stream, key, ConnState::Established, PENDING_RESPONSE)
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than we sent gets no extra credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn may_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_rx(&self) -> bool {
        self.pending != 0
            || (self.may_send_data() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Record the credit information every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// The guest asked how much we can take.
    pub fn request_credit_update(&mut self) {
        self.pending |= PENDING_CREDIT_UPDATE;
    }

    /// The host stream became readable (or hung up: the read will tell).
    pub fn set_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host peer closed the stream entirely.
    pub fn set_host_hung_up(&mut self) {
        self.host_hung_up = true;
        self.host_readable = true;
    }

    /// The guest accepted a host-initiated connection: tell the host peer which port it
    /// got, and start moving data.
    pub fn establish(&mut self) -> Result<(), ConnError> {
        self.state = ConnState::Established;
        self.host_readable = true;
        let line = format!("OK {}\n", self.key.local_port);
        self.tx_buf.extend(line.as_bytes());
        self.tx_uncounted += line.len();
        self.flush_to_host()
    }

    /// The guest shut down one or both directions. Returns true when both are closed and
    /// the connection should be reset (how virtio-vsock completes a close).
    pub fn peer_shutdown(&mut self, flags: u32) -> bool {
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            self.shutdown_host_write = true;
            // Whatever the guest sent before is still delivered if the host takes it now.
            if let Err(e) = self.flush_to_host() {
                debug!("vsock: flush on shutdown of {:?}: {e}", self.key);
            }
        }
        self.peer_shutdown == SHUTDOWN_BOTH
    }

    /// Data from the guest for the host stream, as the guest-memory slices of one packet.
    pub fn send_to_host<B: BitmapSlice>(
        &mut self,
        data: &[VolatileSlice<'_, B>],
    ) -> Result<(), ConnError> {
        let len: usize = data.iter().map(|s| s.len()).sum();
        let buffered = self.tx_buf.len() - self.tx_uncounted;
        if buffered + len > CONN_BUF_SIZE as usize {
            return Err(ConnError::CreditOverrun {
                buffered,
                incoming: len,
            });
        }
        let mut written = 0;
        for slice in data {
            // Straight to the host while nothing is queued; queue the rest in order.
            let mut done = 0;
            if self.tx_buf.is_empty() {
                match self.stream.write_volatile(slice) {
                    Ok(n) => done = n,
                    Err(vm_memory::VolatileMemoryError::IOError(e))
                        if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(ConnError::HostWrite(io::Error::other(e.to_string()))),
                }
            }
            written += done;
            if done < slice.len() {
                let mut rest = vec![0u8; slice.len() - done];
                if let Ok(tail) = slice.offset(done) {
                    tail.copy_to(&mut rest[..]);
                }
                self.tx_buf.extend(rest);
            }
        }
        self.forwarded(written);
        Ok(())
    }

    /// Write buffered data to the host stream (it became writable).
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ours = n.min(self.tx_uncounted);
                    self.tx_uncounted -= ours;
                    self.forwarded(n - ours);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::HostWrite(e)),
            }
        }
        if self.tx_buf.is_empty() {
            // Release the memory of a burst once it is delivered.
            self.tx_buf.shrink_to(4096);
            if self.shutdown_host_write {
                // The host peer sees EOF; a failure means it is gone, which the next
                // read will report.
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        Ok(())
    }

    fn forwarded(&mut self, bytes: usize) {
        self.fwd_cnt += Wrapping(bytes as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
    }

    /// Fill `pkt` (an rx buffer from the guest) with the next packet this connection owes
    /// the guest.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
        guest_cid: u64,
    ) -> RxFill {
        let (op, flags, len) = match self.next_rx(pkt) {
            Ok(Some(p)) => p,
            Ok(None) => return RxFill::Nothing,
            Err(e) => {
                debug!("vsock: host stream of {:?} failed: {e}", self.key);
                return RxFill::Reset;
            }
        };
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(guest_cid)
            .set_src_port(self.key.local_port)
            .set_dst_port(self.key.peer_port)
            .set_len(len)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_buf_alloc(CONN_BUF_SIZE)
            .set_fwd_cnt(self.fwd_cnt.0);
        // Every header carries our credit: nothing more to report for now.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !PENDING_CREDIT_UPDATE;
        RxFill::Packet(len)
    }

    fn take(&mut self, bit: u8) -> bool {
        let set = self.pending & bit != 0;
        self.pending &= !bit;
        set
    }

    /// Decide the next packet: `(op, flags, data length)`.
    fn next_rx<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
    ) -> io::Result<Option<(u16, u32, u32)>> {
        if self.take(PENDING_REQUEST) {
            return Ok(Some((OP_REQUEST, 0, 0)));
        }
        if self.take(PENDING_RESPONSE) {
            return Ok(Some((OP_RESPONSE, 0, 0)));
        }
        if self.may_send_data() {
            let credit = self.peer_credit();
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Ok(Some((OP_CREDIT_REQUEST, 0, 0)));
                }
            } else if let Some(slice) = pkt.data_slice() {
                let max = (slice.len() as u32).min(credit).min(MAX_PKT_DATA) as usize;
                let mut buf = slice
                    .subslice(0, max)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                match self.stream.read_volatile(&mut buf) {
                    Ok(0) => {
                        // The host peer will send no more. If it only half-closed it may
                        // still read the guest's answer, so only a full hang-up closes
                        // both directions; the guest completes the close with RST.
                        self.host_readable = false;
                        self.state = ConnState::Closing;
                        let flags = if self.host_hung_up {
                            SHUTDOWN_BOTH
                        } else {
                            SHUTDOWN_SEND
                        };
                        return Ok(Some((OP_SHUTDOWN, flags, 0)));
                    }
                    Ok(n) => {
                        self.rx_cnt += Wrapping(n as u32);
                        return Ok(Some((OP_RW, 0, n as u32)));
                    }
                    Err(vm_memory::VolatileMemoryError::IOError(e))
                        if e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        self.host_readable = false;
                    }
                    Err(vm_memory::VolatileMemoryError::IOError(e))
                        if e.kind() == io::ErrorKind::ConnectionReset =>
                    {
                        return Err(e);
                    }
                    Err(e) => return Err(io::Error::other(e.to_string())),
                }
            }
        }
        if self.take(PENDING_CREDIT_UPDATE) {
            return Ok(Some((OP_CREDIT_UPDATE, 0, 0)));
        }
        Ok(None)
    }

    /// Bytes from the guest waiting for the host stream (for tests and metrics).
    pub fn buffered_to_host(&self) -> usize {
        self.tx_buf.len() - self.tx_uncounted
    }
}
