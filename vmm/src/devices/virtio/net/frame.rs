//! Moving one frame between a descriptor chain and a buffer, and checking its virtio-net
//! header against the negotiated features.
//!
//! Every frame starts with a 12-byte `virtio_net_hdr_v1` (virtio 1.2 §5.1.6): `flags`,
//! `gso_type`, `hdr_len`, `gso_size`, `csum_start`, `csum_offset`, `num_buffers`. The tap
//! uses the same layout (`TUNSETVNETHDRSZ` 12), so frames pass through unchanged once
//! checked. Chains are read and written through virtio-queue's [`Reader`]/[`Writer`], which
//! check every descriptor against guest memory.

use std::io::{Read, Write};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::memory::GuestMemoryMmap;

/// Size of `virtio_net_hdr_v1`, the header in front of every frame (VERSION_1 always has
/// `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame accepted in either direction, header included: a 64 KiB GSO packet plus
/// Ethernet and VLAN headers (the bound Firecracker and QEMU use too).
pub const MAX_FRAME_LEN: usize = 65562;

const FLAGS: usize = 0;
const GSO_TYPE: usize = 1;
const NUM_BUFFERS: usize = 10;

/// Why a frame was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The transmit chain has device-writable descriptors.
    #[error("transmit chain has device-writable descriptors")]
    WritableTx,
    /// A descriptor points outside guest memory (or the lengths overflow).
    #[error("descriptor chain is not inside guest memory: {0}")]
    BadChain(String),
    /// Shorter than the virtio-net header.
    #[error("{0} bytes is shorter than the {VNET_HDR_LEN}-byte virtio-net header")]
    TooShort(usize),
    /// Longer than [`MAX_FRAME_LEN`].
    #[error("{0} bytes is longer than the {MAX_FRAME_LEN}-byte frame limit")]
    TooLong(usize),
    /// The header asks for an offload that was not negotiated.
    #[error("header needs an offload that was not negotiated (flags {flags:#x}, gso_type {gso_type:#x})")]
    Offload {
        /// `flags` byte.
        flags: u8,
        /// `gso_type` byte.
        gso_type: u8,
    },
    /// The receive buffer cannot hold the frame.
    #[error("{frame} byte frame does not fit the {buffer}-byte receive buffer")]
    NoRoom {
        /// Frame length, header included.
        frame: usize,
        /// Writable bytes of the chain.
        buffer: usize,
    },
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The `TUN_F_*` offloads matching the guest's acknowledged features: what the tap may
/// hand us. Segmentation offloads need checksum offload (the kernel ignores them
/// otherwise), exactly as the virtio spec makes GUEST_TSO* depend on GUEST_CSUM.
pub fn tun_offload(acked: u64) -> u32 {
    if !has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(acked, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(acked, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// Whether a header with `flags`/`gso_type` only uses offloads enabled by `csum` and the
/// TSO bits.
fn offloads_allowed(flags: u8, gso_type: u8, csum: bool, tso4: bool, tso6: bool) -> bool {
    let known_flags = (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8;
    if flags & !known_flags != 0 {
        return false;
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !csum {
        return false;
    }
    match u32::from(gso_type) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        // GSO implies a partial checksum the receiver completes (virtio 1.2 §5.1.6.2).
        VIRTIO_NET_HDR_GSO_TCPV4 => csum && tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => csum && tso6,
        // UDP fragmentation, ECN and anything unknown are never negotiated.
        _ => false,
    }
}

/// Copy the guest's transmit chain into `buf` and check its header against `acked`.
/// Returns the frame length (header included).
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    acked: u64,
    buf: &mut [u8],
) -> Result<usize, FrameError> {
    let writable = Writer::new(mem, chain.clone())
        .map_err(|e| FrameError::BadChain(e.to_string()))?
        .available_bytes();
    if writable != 0 {
        return Err(FrameError::WritableTx);
    }
    let mut reader = Reader::new(mem, chain).map_err(|e| FrameError::BadChain(e.to_string()))?;
    let len = reader.available_bytes();
    if len < VNET_HDR_LEN {
        return Err(FrameError::TooShort(len));
    }
    if len > MAX_FRAME_LEN || len > buf.len() {
        return Err(FrameError::TooLong(len));
    }
    reader
        .read_exact(&mut buf[..len])
        .map_err(|e| FrameError::BadChain(e.to_string()))?;
    let (flags, gso_type) = (buf[FLAGS], buf[GSO_TYPE]);
    let allowed = offloads_allowed(
        flags & !(VIRTIO_NET_HDR_F_DATA_VALID as u8),
        gso_type,
        has(acked, VIRTIO_NET_F_CSUM),
        has(acked, VIRTIO_NET_F_HOST_TSO4),
        has(acked, VIRTIO_NET_F_HOST_TSO6),
    );
    // DATA_VALID is meaningless on transmit: the driver must not set it.
    if !allowed || flags & VIRTIO_NET_HDR_F_DATA_VALID as u8 != 0 {
        return Err(FrameError::Offload { flags, gso_type });
    }
    Ok(len)
}

/// Make the header of a received `frame` fit what the guest negotiated: `num_buffers` 1
/// (no mergeable buffers), `DATA_VALID` only with GUEST_CSUM. Frames that need an
/// offload the guest lacks (left in the tap from an earlier driver) are refused.
pub fn prepare_rx(frame: &mut [u8], acked: u64) -> Result<(), FrameError> {
    if frame.len() < VNET_HDR_LEN {
        return Err(FrameError::TooShort(frame.len()));
    }
    let (flags, gso_type) = (frame[FLAGS], frame[GSO_TYPE]);
    let csum = has(acked, VIRTIO_NET_F_GUEST_CSUM);
    if !offloads_allowed(
        flags,
        gso_type,
        csum,
        has(acked, VIRTIO_NET_F_GUEST_TSO4),
        has(acked, VIRTIO_NET_F_GUEST_TSO6),
    ) {
        return Err(FrameError::Offload { flags, gso_type });
    }
    if !csum {
        // "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to zero."
        frame[FLAGS] = 0;
    }
    frame[NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
    Ok(())
}

/// Outcome of trying to place a frame in a receive chain.
#[derive(Debug, PartialEq, Eq)]
pub enum RxPlacement {
    /// Written; the used length.
    Written(u32),
    /// The chain itself is unusable (outside memory, no room for even a header): complete
    /// it empty, keep the frame for the next chain.
    BadChain(FrameError),
    /// The chain is fine but smaller than this frame: give the chain back, drop the frame.
    TooSmall(FrameError),
}

/// Write `frame` (header already prepared) into the writable part of `chain`.
pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> RxPlacement {
    let mut writer = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(e) => return RxPlacement::BadChain(FrameError::BadChain(e.to_string())),
    };
    let room = writer.available_bytes();
    if room < VNET_HDR_LEN {
        return RxPlacement::BadChain(FrameError::TooShort(room));
    }
    if room < frame.len() {
        return RxPlacement::TooSmall(FrameError::NoRoom {
            frame: frame.len(),
            buffer: room,
        });
    }
    match writer.write_all(frame) {
        // `frame.len()` ≤ MAX_FRAME_LEN, far below u32::MAX.
        Ok(()) => RxPlacement::Written(frame.len() as u32),
        Err(e) => RxPlacement::BadChain(FrameError::BadChain(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_HOST_TSO6;

    #[test]
    fn tap_offloads_follow_guest_features() {
        assert_eq!(tun_offload(0), 0);
        // TSO without checksum offload is not valid: nothing is enabled.
        assert_eq!(tun_offload(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(tun_offload(1 << VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tun_offload(ALL),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        // Host-side (transmit) features do not change what the tap may send us.
        assert_eq!(
            tun_offload(1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_CSUM),
            0
        );
    }

    fn header(flags: u32, gso: u32) -> [u8; VNET_HDR_LEN] {
        let mut h = [0xeeu8; VNET_HDR_LEN];
        h[FLAGS] = flags as u8;
        h[GSO_TYPE] = gso as u8;
        h
    }

    #[test]
    fn rx_header_is_fitted_to_the_guest() {
        let mut h = header(VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_NONE);
        prepare_rx(&mut h, 0).unwrap();
        assert_eq!(h[FLAGS], 0, "DATA_VALID cleared without GUEST_CSUM");
        assert_eq!(&h[NUM_BUFFERS..], &[1, 0]);

        let mut h = header(VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_NONE);
        prepare_rx(&mut h, ALL).unwrap();
        assert_eq!(h[FLAGS], VIRTIO_NET_HDR_F_DATA_VALID as u8);

        let mut h = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
        assert!(prepare_rx(&mut h, 0).is_err());
        assert!(prepare_rx(&mut h, 1 << VIRTIO_NET_F_GUEST_CSUM).is_err());
        prepare_rx(&mut h, ALL).unwrap();

        for gso in [3u32, 5, 0x81, 0x7f] {
            let mut h = header(0, gso);
            assert!(prepare_rx(&mut h, ALL).is_err(), "gso {gso:#x}");
        }
        assert!(prepare_rx(&mut [0u8; 4], ALL).is_err());
    }

    #[test]
    fn tx_offloads_need_host_features() {
        let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        assert!(offloads_allowed(0, 0, false, false, false));
        assert!(!offloads_allowed(csum, 0, false, false, false));
        assert!(offloads_allowed(csum, 0, true, false, false));
        assert!(!offloads_allowed(csum, 1, true, false, false));
        assert!(offloads_allowed(csum, 1, true, true, false));
        assert!(!offloads_allowed(csum, 4, true, true, false));
        assert!(offloads_allowed(csum, 4, true, true, true));
        assert!(!offloads_allowed(0x80, 0, true, true, true));
    }
}
