//! The virtio-mmio transport under arbitrary register traffic: reads and writes of any width
//! (0-8 bytes) at any offset, status transitions in any order, queue addresses anywhere
//! (activation with garbage rings must be refused, not crash), interleaved with queue
//! notifications and host events so a device activated on garbage gets exercised too.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade_fuzz::{scratch_dir, Guest, QueueOp};
use palisade_vmm::devices::virtio::block::BlockDevice;
use palisade_vmm::devices::virtio::vsock::VsockDevice;
use palisade_vmm::devices::virtio::VirtioDevice;
use palisade_vmm::devices::BusDevice;

#[derive(Arbitrary, Debug)]
enum Offset {
    /// One of the 4-byte registers or config words (0x000-0x3fc).
    Register(u8),
    /// Anywhere in (or past) the window, unaligned included.
    Raw(u16),
}

impl Offset {
    fn resolve(&self) -> u64 {
        match self {
            Offset::Register(r) => u64::from(*r) * 4,
            Offset::Raw(o) => u64::from(*o),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: Offset,
        width: u8,
    },
    Write {
        offset: Offset,
        width: u8,
        value: u64,
    },
    /// The driver's usual initialisation (to reach deeper states quickly).
    Init {
        size_log2: u8,
    },
    Notify {
        queue: u8,
    },
    HostEvents,
    Raw(QueueOp),
}

#[derive(Arbitrary, Debug)]
struct Input {
    vsock: bool,
    ops: Vec<Op>,
}

fn block_device() -> BlockDevice {
    static IMAGE: OnceLock<std::path::PathBuf> = OnceLock::new();
    let path = IMAGE.get_or_init(|| {
        let path = scratch_dir().join("mmio.img");
        std::fs::write(&path, vec![0u8; 8192]).expect("writing the image");
        path
    });
    BlockDevice::open(path, true).expect("opening the scratch image")
}

fuzz_target!(|input: Input| {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let device: Arc<Mutex<dyn VirtioDevice>> = if input.vsock {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let uds = scratch_dir().join(format!("m{n}"));
        Arc::new(Mutex::new(
            VsockDevice::with_socket(3, &uds).expect("creating the vsock device"),
        ))
    } else {
        Arc::new(Mutex::new(block_device()))
    };
    let mut guest = Guest::new(device);
    for op in input.ops.iter().take(256) {
        match op {
            Op::Read { offset, width } => {
                let mut data = [0u8; 8];
                let n = usize::from(*width % 9);
                guest.transport.read(offset.resolve(), &mut data[..n]);
            }
            Op::Write {
                offset,
                width,
                value,
            } => {
                let n = usize::from(*width % 9);
                guest
                    .transport
                    .write(offset.resolve(), &value.to_le_bytes()[..n]);
            }
            Op::Init { size_log2 } => {
                guest.init(1 << (size_log2 % 16));
            }
            Op::Notify { queue } => guest.notify(usize::from(*queue)),
            Op::HostEvents => guest.host_events(),
            Op::Raw(op) => guest.apply(op),
        }
    }
});
