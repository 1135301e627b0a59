//! virtio-vsock wire constants (virtio 1.2 §5.10.6) and tx packet parsing: `virtio-vsock`'s
//! [`VsockPacket`] first, a scatter-gather fallback for payloads spread over several
//! descriptors, and the raw header of rejected packets (so they can be answered with RST).

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{Error as VsockError, VsockPacket};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use crate::memory::GuestMemoryMmap;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const OP_RST: u16 = 3;
/// Half or full close; `flags` carries [`SHUTDOWN_RCV`] / [`SHUTDOWN_SEND`].
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Ask the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// The sender will not receive any more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will not send any more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both directions.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = 44;
/// Largest data payload accepted in one tx packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); also caps what one rx packet carries.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// A packet header, read straight from guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Sender port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// `TYPE_*`.
    pub type_: u16,
    /// `OP_*`.
    pub op: u16,
    /// Op-specific flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// Read the header at `addr`, if all of it is inside guest memory.
    pub fn read(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<Self> {
        let mut b = [0u8; HEADER_SIZE];
        mem.read_slice(&mut b, addr).ok()?;
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }
}

/// A packet from the guest's tx queue: header plus its payload as guest-memory slices.
#[derive(Debug)]
pub struct TxPacket<'a> {
    /// The header.
    pub header: Header,
    /// The payload, in order; empty for control packets.
    pub data: Vec<VolatileSlice<'a>>,
}

impl<'a> TxPacket<'a> {
    /// Parse a tx chain with `virtio-vsock`'s [`VsockPacket`] (header and data in one
    /// descriptor, or data in a second one). Since Linux 6.12.y (and 6.16) payloads larger
    /// than ~32 KiB are page fragments, one descriptor each, which `VsockPacket` rejects
    /// as `DescriptorLengthTooSmall`: those chains are gathered descriptor by descriptor.
    pub fn parse(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, TxError> {
        let mut parse_chain = chain.clone();
        match VsockPacket::from_tx_virtq_chain(mem, &mut parse_chain, MAX_PKT_DATA) {
            Ok(pkt) => Ok(TxPacket {
                header: Header {
                    src_cid: pkt.src_cid(),
                    dst_cid: pkt.dst_cid(),
                    src_port: pkt.src_port(),
                    dst_port: pkt.dst_port(),
                    len: pkt.len(),
                    type_: pkt.type_(),
                    op: pkt.op(),
                    flags: pkt.flags(),
                    buf_alloc: pkt.buf_alloc(),
                    fwd_cnt: pkt.fwd_cnt(),
                },
                data: pkt.data_slice().into_iter().cloned().collect(),
            }),
            Err(VsockError::DescriptorLengthTooSmall) => Self::gather(mem, chain),
            Err(e) => Err(TxError::Parse(e, Self::readable_header(mem, chain))),
        }
    }

    /// The header of a chain whose first descriptor is device-readable and holds one.
    fn readable_header(
        mem: &GuestMemoryMmap,
        mut chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<Header> {
        let head = chain.next()?;
        if head.is_write_only() || (head.len() as usize) < HEADER_SIZE {
            return None;
        }
        Header::read(mem, head.addr())
    }

    /// Header in the first descriptor, payload in that descriptor's remainder and the
    /// following device-readable descriptors.
    fn gather(
        mem: &'a GuestMemoryMmap,
        mut chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, TxError> {
        let header = Self::readable_header(mem, chain.clone())
            .ok_or(TxError::Malformed("no readable header", None))?;
        let bad = |what| TxError::Malformed(what, Some(header));
        if header.len > MAX_PKT_DATA {
            return Err(bad("payload longer than 64 KiB"));
        }
        let mut need = header.len as usize;
        let mut data = Vec::new();
        let mut first = true;
        while need > 0 {
            let desc = chain.next().ok_or(bad("chain shorter than the payload"))?;
            if desc.is_write_only() {
                return Err(bad("device-writable descriptor in a tx chain"));
            }
            let (mut addr, mut len) = (desc.addr(), desc.len() as usize);
            if first {
                // The header descriptor may carry the start of the payload.
                addr = addr
                    .checked_add(HEADER_SIZE as u64)
                    .ok_or(bad("address overflow"))?;
                len -= HEADER_SIZE;
                first = false;
            }
            let take = len.min(need);
            if take == 0 {
                continue;
            }
            let slices = mem
                .get_slices(addr, take, Permissions::Read)
                .map_err(|_| bad("payload outside guest memory"))?;
            for slice in slices {
                data.push(slice.map_err(|_| bad("payload outside guest memory"))?);
            }
            need -= take;
        }
        Ok(TxPacket { header, data })
    }
}

/// Why a tx chain was not a usable packet.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// `virtio-vsock` rejected it; the header, if it was readable.
    #[error("{0}")]
    Parse(VsockError, Option<Header>),
    /// The scatter-gather path rejected it; the header, if it was readable.
    #[error("{0}")]
    Malformed(&'static str, Option<Header>),
}

impl TxError {
    /// The header of the rejected packet, when it could be read (to reset its connection).
    pub fn header(&self) -> Option<Header> {
        match self {
            TxError::Parse(_, h) | TxError::Malformed(_, h) => *h,
        }
    }
}
