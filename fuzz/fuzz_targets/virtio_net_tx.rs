//! virtio-net frame handling: a driver that initialised the device (every offered
//! feature acked), then sends frames of any header (flags, GSO type, sizes), length and
//! layout (one descriptor, header apart, scattered, device-writable descriptors mixed in,
//! raw descriptor abuse) and posts receive buffers of any size and place, while the host
//! side of the backend (a datagram socket pair standing in for the tap) sends frames of
//! any size and header. The VMM must never panic, loop without bound or touch memory
//! outside the guest's.
#![no_main]

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade_fuzz::{Addr, Guest, Len, QueueOp};
use palisade_vmm::devices::virtio::net::{Backend, NetDevice, VNET_HDR_LEN};
use palisade_vmm::devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// The tap stand-in: one datagram per frame, non-blocking both ways.
struct PairBackend(UnixDatagram);

impl AsRawFd for PairBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Backend for PairBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.send(frame).map(drop)
    }
    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Layout {
    /// Header and frame in one descriptor.
    Single,
    /// Header descriptor, then the frame.
    Split,
    /// The whole buffer in `n` fragments (splitting the header too).
    Scattered(u8),
}

#[derive(Arbitrary, Debug)]
struct Frame {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
    data: Vec<u8>,
    /// Declared length of the last descriptor instead of the real one (over-long
    /// descriptors, up to and past the frame limit).
    last_len: Option<Len>,
    layout: Layout,
    /// Append a device-writable descriptor (not allowed in a transmit chain).
    writable_tail: bool,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Tx(Frame),
    /// Post `n` receive buffers of `len` bytes (one descriptor each, or `parts`).
    RxBuffers {
        n: u8,
        len: Len,
        at: Addr,
        parts: u8,
    },
    /// The host sends a frame of `len` bytes (the first bytes from `head`).
    HostFrame {
        head: Vec<u8>,
        len: u16,
    },
    /// One round of the event loop over every fd the device watches.
    HostEvents,
    Raw(QueueOp),
}

#[derive(Arbitrary, Debug)]
struct Input {
    queue_size_log2: u8,
    ops: Vec<Op>,
}

/// The next free descriptor of queue `q` (descriptors are handed out round-robin).
fn take(next_desc: &mut [u16; 2], q: usize, size: u16) -> u16 {
    let d = next_desc[q];
    next_desc[q] = d.wrapping_add(1) % size;
    d
}

/// Frames go to region 1; each op gets its own 4 KiB slot.
fn slot_addr(i: usize) -> u64 {
    palisade_fuzz::REGION1.0 + 0x1000 * (i as u64 % 16)
}

fuzz_target!(|input: Input| {
    let (ours, host) = UnixDatagram::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking socket");
    host.set_nonblocking(true).expect("non-blocking socket");
    let device = NetDevice::with_backend(
        Box::new(PairBackend(ours)),
        Some([0x02, 0, 0, 0, 0, 1]),
        Some(1500),
    )
    .expect("creating the net device");
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(device));
    let host_fds = palisade_fuzz::lock(&device).host_fds();
    let mut guest = Guest::new(device);
    // The device's own fds (the transmit resume eventfd) are watched from the start.
    guest.ctl.fds.extend(host_fds);
    let size = 1u16 << (input.queue_size_log2 % 9);
    assert!(
        guest.init(size),
        "virtio-net refused a valid driver initialisation"
    );
    let mut next_desc = [0u16; 2];
    let mut host_buf = vec![0u8; 70_000];

    for (i, op) in input.ops.iter().take(64).enumerate() {
        match op {
            Op::Tx(f) => {
                let data = &f.data[..f.data.len().min(2048)];
                let mut buf = vec![0u8; VNET_HDR_LEN];
                buf[0] = f.flags;
                buf[1] = f.gso_type;
                buf[2..4].copy_from_slice(&f.hdr_len.to_le_bytes());
                buf[4..6].copy_from_slice(&f.gso_size.to_le_bytes());
                buf[6..8].copy_from_slice(&f.csum_start.to_le_bytes());
                buf[8..10].copy_from_slice(&f.csum_offset.to_le_bytes());
                buf.extend_from_slice(data);
                let base = slot_addr(i);
                let _ = guest.mem.write_slice(&buf, GuestAddress(base));
                let mut chain: Vec<(u64, u32, u16)> = Vec::new();
                match f.layout {
                    Layout::Single => chain.push((base, buf.len() as u32, 0)),
                    Layout::Split => {
                        chain.push((base, VNET_HDR_LEN as u32, 0));
                        chain.push((base + VNET_HDR_LEN as u64, data.len() as u32, 0));
                    }
                    Layout::Scattered(frags) => {
                        let frags = usize::from(frags % 8) + 1;
                        let step = buf.len().div_ceil(frags).max(1);
                        for start in (0..buf.len()).step_by(step) {
                            let end = (start + step).min(buf.len());
                            chain.push((base + start as u64, (end - start) as u32, 0));
                        }
                    }
                }
                if let (Some(len), Some(last)) = (f.last_len, chain.last_mut()) {
                    last.1 = len.resolve();
                }
                if f.writable_tail {
                    chain.push((base, 64, VIRTQ_DESC_F_WRITE));
                }
                let head = next_desc[TX];
                for (j, (addr, len, flags)) in chain.iter().enumerate() {
                    let index = take(&mut next_desc, TX, size);
                    let next = if j + 1 == chain.len() {
                        0
                    } else {
                        VIRTQ_DESC_F_NEXT
                    };
                    guest.set_descriptor(TX, index, *addr, *len, flags | next, next_desc[TX]);
                }
                guest.publish(TX, head);
                guest.notify(TX);
            }
            Op::RxBuffers { n, len, at, parts } => {
                let base = at.resolve();
                let len = len.resolve();
                let parts = u16::from(parts % 4) + 1;
                for k in 0..u64::from(n % 16) {
                    let addr = base.wrapping_add(k * u64::from(len.min(0x1000)));
                    let head = next_desc[RX];
                    for p in 0..parts {
                        let index = take(&mut next_desc, RX, size);
                        let flags = if p + 1 == parts {
                            VIRTQ_DESC_F_WRITE
                        } else {
                            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT
                        };
                        let piece = len / u32::from(parts);
                        let at = addr.wrapping_add(u64::from(p) * u64::from(piece));
                        guest.set_descriptor(RX, index, at, piece, flags, next_desc[RX]);
                    }
                    guest.publish(RX, head);
                }
                guest.notify(RX);
            }
            Op::HostFrame { head, len } => {
                let len = usize::from(*len);
                let mut frame = vec![0u8; len];
                let n = head.len().min(len);
                frame[..n].copy_from_slice(&head[..n]);
                let _ = host.send(&frame);
                guest.host_events();
            }
            Op::HostEvents => guest.host_events(),
            Op::Raw(op) => guest.apply(op),
        }
        // What the guest sent is gone from the "wire": keep the socket buffer from
        // filling, as a real tap would.
        while host.recv(&mut host_buf).is_ok() {}
    }
    guest.host_events();
    guest.notify(TX);
    guest.notify(RX);
    // Reset (driver writes status 0) and the device must go quiet.
    guest.write_reg(palisade_fuzz::REG_STATUS, 0);
    guest.host_events();
});
