//! virtio-blk request handling on arbitrary descriptor chains: a driver that initialised
//! the device correctly, then lays out any descriptors (headers of any type/sector, data
//! and status buffers of any length, direction, address or indirection) and publishes them.
//! The VMM must answer or drop each request without panicking or touching memory outside
//! the guest's.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade_fuzz::{scratch_dir, Addr, Guest, Len, QueueOp};
use palisade_vmm::devices::virtio::block::{BlockDevice, SECTOR_SIZE};
use vm_memory::{Bytes, GuestAddress};

/// Disk size: 64 sectors, so sector numbers near and past the end are easy to hit.
const DISK_SECTORS: u64 = 64;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A well-formed-looking request: header (type, sector), `data` segments, status.
    Request {
        kind: u8,
        sector: u64,
        segments: Vec<(Addr, Len, bool)>,
        status_at: Addr,
        indirect: bool,
    },
    /// Raw queue manipulation.
    Raw(QueueOp),
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    queue_size_log2: u8,
    ops: Vec<Op>,
}

fn disk_path(read_only: bool) -> std::path::PathBuf {
    static MADE: OnceLock<()> = OnceLock::new();
    let dir = scratch_dir();
    MADE.get_or_init(|| {
        let image = vec![0xa5u8; (DISK_SECTORS * SECTOR_SIZE) as usize];
        std::fs::write(dir.join("rw.img"), &image).expect("writing the rw image");
        std::fs::write(dir.join("ro.img"), &image).expect("writing the ro image");
    });
    dir.join(if read_only { "ro.img" } else { "rw.img" })
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

fuzz_target!(|input: Input| {
    let device = BlockDevice::open(&disk_path(input.read_only), input.read_only)
        .expect("opening the scratch image");
    let device: Arc<Mutex<dyn palisade_vmm::devices::virtio::VirtioDevice>> =
        Arc::new(Mutex::new(device));
    let mut guest = Guest::new(device);
    let size = 1u16 << (input.queue_size_log2 % 9);
    // A well-behaved driver with rings inside guest memory must get the device running;
    // otherwise every op below would only exercise the inactive path.
    assert!(
        guest.init(size),
        "virtio-blk refused a valid driver initialisation"
    );
    // Head index for the next request chain; chains use consecutive descriptors.
    let mut next_desc: u16 = 0;
    for op in input.ops.iter().take(64) {
        match op {
            Op::Request {
                kind,
                sector,
                segments,
                status_at,
                indirect,
            } => {
                // Header in the data area at a fixed spot per request slot.
                let header_addr = 0x9000 + 16 * u64::from(next_desc % 256);
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&u32::from(*kind % 10).to_le_bytes());
                let sector = *sector % (2 * DISK_SECTORS + 2);
                header[8..].copy_from_slice(&sector.to_le_bytes());
                let _ = guest.mem.write_slice(&header, GuestAddress(header_addr));
                let mut chain: Vec<(u64, u32, u16)> = vec![(header_addr, 16, 0)];
                for (addr, len, writable) in segments.iter().take(8) {
                    let flags = if *writable { VIRTQ_DESC_F_WRITE } else { 0 };
                    chain.push((addr.resolve(), len.resolve(), flags));
                }
                chain.push((status_at.resolve(), 1, VIRTQ_DESC_F_WRITE));
                let head = next_desc;
                if *indirect {
                    // The chain goes to an indirect table in region 1; one ring slot.
                    let table = palisade_fuzz::REGION1.0 + 0x8000;
                    for (i, (addr, len, flags)) in chain.iter().enumerate() {
                        let last = i + 1 == chain.len();
                        let mut raw = [0u8; 16];
                        raw[..8].copy_from_slice(&addr.to_le_bytes());
                        raw[8..12].copy_from_slice(&len.to_le_bytes());
                        let f = flags | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                        raw[12..14].copy_from_slice(&f.to_le_bytes());
                        raw[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
                        let _ = guest
                            .mem
                            .write_slice(&raw, GuestAddress(table + 16 * i as u64));
                    }
                    guest.set_descriptor(
                        0,
                        head,
                        table,
                        16 * chain.len() as u32,
                        VIRTQ_DESC_F_INDIRECT,
                        0,
                    );
                    next_desc = next_desc.wrapping_add(1) % size;
                } else {
                    for (i, (addr, len, flags)) in chain.iter().enumerate() {
                        let index = next_desc;
                        next_desc = next_desc.wrapping_add(1) % size;
                        let last = i + 1 == chain.len();
                        let f = flags | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                        guest.set_descriptor(0, index, *addr, *len, f, next_desc);
                    }
                }
                guest.publish(0, head);
                guest.notify(0);
            }
            Op::Raw(op) => guest.apply(op),
        }
    }
    guest.notify(0);
});
