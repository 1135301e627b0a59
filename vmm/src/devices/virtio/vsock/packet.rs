//! virtio-vsock wire constants (virtio 1.2 §5.10.6) and a raw header reader for packets
//! that `virtio-vsock`'s parser rejected (so they can still be answered with RST).

use vm_memory::{Bytes, GuestAddress};

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

/// The addressing fields of a header, read straight from guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeader {
    /// Sender CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Sender port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// `OP_*`.
    pub op: u16,
}

impl RawHeader {
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
        Some(RawHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            op: u16::from_le_bytes([b[30], b[31]]),
        })
    }
}
