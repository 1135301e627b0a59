//! virtio-vsock packet handling: a driver that initialised the device, then sends arbitrary
//! packets on the TX queue (any header field, length or op; header and data in one
//! descriptor, split, or scattered; raw descriptor abuse), posts RX buffers, while host
//! peers connect to the hybrid socket and a host listener accepts guest connections.
//! The VMM must never panic, leak without bound, or touch memory outside the guest's.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade_fuzz::{scratch_dir, Addr, Guest, Len, QueueOp};
use palisade_vmm::devices::virtio::vsock::packet::HEADER_SIZE;
use palisade_vmm::devices::virtio::vsock::VsockDevice;
use palisade_vmm::devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
/// The host port a listener is bound for (`<uds>_<port>`), so guest connections there work.
const LISTENING_PORT: u32 = 1024;
const RX: usize = 0;
const TX: usize = 1;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

#[derive(Arbitrary, Debug)]
enum Cid {
    Guest,
    Host,
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Port {
    Listening,
    Small(u8),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
enum Layout {
    /// Header and data in one descriptor (Linux >= 6.2).
    Single,
    /// Header descriptor, then data descriptor.
    Split,
    /// Header, then the data in `n` fragments.
    Scattered(u8),
}

#[derive(Arbitrary, Debug)]
struct Packet {
    src_cid: Cid,
    dst_cid: Cid,
    src_port: Port,
    dst_port: Port,
    /// `None`: the real payload length.
    len: Option<u32>,
    type_: Option<u16>,
    op: u8,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
    layout: Layout,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Tx(Packet),
    /// Post `n` RX buffers of `len` bytes (one descriptor each).
    RxBuffers {
        n: u8,
        len: Len,
        at: Addr,
    },
    /// A host process connects to the hybrid socket and sends this (e.g. `CONNECT 52\n`).
    HostConnect {
        port: Option<u32>,
        line: Vec<u8>,
    },
    /// A connected host peer writes bytes.
    HostWrite {
        peer: u8,
        bytes: Vec<u8>,
    },
    /// A host peer hangs up.
    HostClose {
        peer: u8,
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

fn cid(c: &Cid) -> u64 {
    match c {
        Cid::Guest => GUEST_CID,
        Cid::Host => 2,
        Cid::Any(v) => *v,
    }
}

fn port(p: &Port) -> u32 {
    match p {
        Port::Listening => LISTENING_PORT,
        Port::Small(v) => u32::from(*v),
        Port::Any(v) => *v,
    }
}

/// The next free descriptor of queue `q` (descriptors are handed out round-robin).
fn take(next_desc: &mut [u16; 3], q: usize, size: u16) -> u16 {
    let d = next_desc[q];
    next_desc[q] = d.wrapping_add(1) % size;
    d
}

/// Packet headers and payloads go to region 1; each op gets its own 4 KiB slot.
fn slot_addr(i: usize) -> u64 {
    palisade_fuzz::REGION1.0 + 0x1000 * (i as u64 % 16)
}

fuzz_target!(|input: Input| {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let uds = scratch_dir().join(format!("v{n}"));
    // Guest-initiated connections to LISTENING_PORT reach this listener; it is never
    // accepted from, the kernel backlog completes the connects.
    let host_listener = UnixListener::bind(format!("{}_{LISTENING_PORT}", uds.display()))
        .expect("binding the host-side listener");
    let device = VsockDevice::with_socket(GUEST_CID, &uds).expect("creating the vsock device");
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(device));
    let mut guest = Guest::new(device);
    let size = 1u16 << (input.queue_size_log2 % 9);
    // A well-behaved driver with rings inside guest memory must get the device running;
    // otherwise every op below would only exercise the inactive path.
    assert!(
        guest.init(size),
        "virtio-vsock refused a valid driver initialisation"
    );
    let mut peers: Vec<UnixStream> = Vec::new();
    let mut next_desc = [0u16; 3];

    for (i, op) in input.ops.iter().take(64).enumerate() {
        match op {
            Op::Tx(p) => {
                let data = &p.data[..p.data.len().min(2048)];
                let mut header = [0u8; HEADER_SIZE];
                header[0..8].copy_from_slice(&cid(&p.src_cid).to_le_bytes());
                header[8..16].copy_from_slice(&cid(&p.dst_cid).to_le_bytes());
                header[16..20].copy_from_slice(&port(&p.src_port).to_le_bytes());
                header[20..24].copy_from_slice(&port(&p.dst_port).to_le_bytes());
                let len = p.len.unwrap_or(data.len() as u32);
                header[24..28].copy_from_slice(&len.to_le_bytes());
                header[28..30].copy_from_slice(&p.type_.unwrap_or(1).to_le_bytes());
                header[30..32].copy_from_slice(&u16::from(p.op % 9).to_le_bytes());
                header[32..36].copy_from_slice(&p.flags.to_le_bytes());
                header[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
                header[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
                let base = slot_addr(i);
                let _ = guest.mem.write_slice(&header, GuestAddress(base));
                let data_addr = base + HEADER_SIZE as u64;
                let _ = guest.mem.write_slice(data, GuestAddress(data_addr));
                let mut chain: Vec<(u64, u32)> = Vec::new();
                match p.layout {
                    Layout::Single => chain.push((base, (HEADER_SIZE + data.len()) as u32)),
                    Layout::Split => {
                        chain.push((base, HEADER_SIZE as u32));
                        chain.push((data_addr, data.len() as u32));
                    }
                    Layout::Scattered(frags) => {
                        chain.push((base, HEADER_SIZE as u32));
                        let frags = usize::from(frags % 8) + 1;
                        let step = data.len().div_ceil(frags).max(1);
                        for start in (0..data.len()).step_by(step) {
                            let end = (start + step).min(data.len());
                            chain.push((data_addr + start as u64, (end - start) as u32));
                        }
                    }
                }
                let head = next_desc[TX];
                for (j, (addr, len)) in chain.iter().enumerate() {
                    let index = take(&mut next_desc, TX, size);
                    let last = j + 1 == chain.len();
                    let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    guest.set_descriptor(TX, index, *addr, *len, flags, next_desc[TX]);
                }
                guest.publish(TX, head);
                guest.notify(TX);
            }
            Op::RxBuffers { n, len, at } => {
                let base = at.resolve();
                let len = len.resolve();
                for k in 0..u64::from(*n % 16) {
                    let index = take(&mut next_desc, RX, size);
                    let addr = base.wrapping_add(k * u64::from(len.min(0x1000)));
                    guest.set_descriptor(RX, index, addr, len, VIRTQ_DESC_F_WRITE, 0);
                    guest.publish(RX, index);
                }
                guest.notify(RX);
            }
            Op::HostConnect { port, line } => {
                if peers.len() >= 8 {
                    continue;
                }
                if let Ok(mut s) = UnixStream::connect(&uds) {
                    let _ = s.set_nonblocking(true);
                    let _ = match port {
                        Some(p) => s.write_all(format!("CONNECT {p}\n").as_bytes()),
                        None => s.write_all(&line[..line.len().min(512)]),
                    };
                    peers.push(s);
                }
                guest.host_events();
            }
            Op::HostWrite { peer, bytes } => {
                let count = peers.len().max(1);
                if let Some(s) = peers.get_mut(usize::from(*peer) % count) {
                    let _ = s.write(&bytes[..bytes.len().min(4096)]);
                }
                guest.host_events();
            }
            Op::HostClose { peer } => {
                if !peers.is_empty() {
                    peers.remove(usize::from(*peer) % peers.len());
                }
                guest.host_events();
            }
            Op::HostEvents => guest.host_events(),
            Op::Raw(op) => guest.apply(op),
        }
    }
    guest.host_events();
    guest.notify(TX);
    guest.notify(RX);
    // Reset (driver writes status 0) must release every connection.
    guest.write_reg(palisade_fuzz::REG_STATUS, 0);
    drop(guest);
    drop(host_listener);
    let _ = std::fs::remove_file(format!("{}_{LISTENING_PORT}", uds.display()));
});
