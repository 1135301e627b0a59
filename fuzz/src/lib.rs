//! Shared harness for palisade's fuzz targets: a hostile "guest driver" for the virtio
//! devices, built only on `palisade-vmm`'s public API (the same path a KVM MMIO exit takes:
//! [`BusDevice`] register accesses on the [`MmioTransport`], then the device event loop's
//! `process_queue` / `handle_host_event`).
//!
//! Guest memory is two 64 KiB regions with a hole between them, so descriptors can point
//! into the hole, straddle a region end or lie beyond all memory. Each queue's rings live at
//! fixed places in the first region (`QUEUE_AREA * q`); the rest of guest memory is data
//! area that fuzz inputs fill with arbitrary descriptors, headers and payloads.

use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use palisade_vmm::devices::virtio::{MmioTransport, VirtioDevice};
use palisade_vmm::devices::BusDevice;
use palisade_vmm::event_loop::{EventLoopCtl, EventLoopError};
use palisade_vmm::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

/// First RAM region: rings + data.
pub const REGION0: (u64, usize) = (0, 0x1_0000);
/// Second RAM region, after a 64 KiB hole.
pub const REGION1: (u64, usize) = (0x2_0000, 0x1_0000);
/// Bytes reserved per queue for its descriptor table, available and used rings.
pub const QUEUE_AREA: u64 = 0x3000;
/// Offsets of the rings inside a queue's area (room for 256 entries each).
const DESC_OFF: u64 = 0x0;
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;

// virtio-mmio registers (virtio 1.2 table 4.1).
pub const REG_DEVICE_FEATURES: u64 = 0x10;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub const REG_DRIVER_FEATURES: u64 = 0x20;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub const REG_QUEUE_SEL: u64 = 0x30;
pub const REG_QUEUE_NUM: u64 = 0x38;
pub const REG_QUEUE_READY: u64 = 0x44;
pub const REG_STATUS: u64 = 0x70;
pub const REG_QUEUE_DESC_LOW: u64 = 0x80;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
pub const REG_QUEUE_USED_LOW: u64 = 0xa0;

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

/// Guest memory with the two regions above.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
    ])
    .expect("mapping 128 KiB of anonymous memory")
}

/// An [`EventLoopCtl`] that records the fds a device asks the loop to watch, so the harness
/// can deliver host events for them the way the real epoll loop would.
#[derive(Debug, Default)]
pub struct RecordingCtl {
    pub fds: Vec<(RawFd, EventSet)>,
}

impl EventLoopCtl for RecordingCtl {
    fn add(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError> {
        if self.fds.iter().any(|(f, _)| *f == fd) {
            return Err(EventLoopError::AlreadyRegistered(fd));
        }
        self.fds.push((fd, events));
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError> {
        if let Some(entry) = self.fds.iter_mut().find(|(f, _)| *f == fd) {
            entry.1 = events;
        }
        Ok(())
    }

    fn remove(&mut self, fd: RawFd) {
        self.fds.retain(|(f, _)| *f != fd);
    }
}

/// Where a descriptor points: mostly somewhere useful, sometimes anywhere at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// Offset into the data area of region 0 (after the rings of three queues).
    Data(u16),
    /// Offset into region 1.
    High(u16),
    /// Near the end of region 0 (to straddle it).
    Region0End(u8),
    /// Any 64-bit address (hole, beyond memory, overflow).
    Raw(u64),
}

impl Addr {
    pub fn resolve(self) -> u64 {
        match self {
            Addr::Data(off) => {
                3 * QUEUE_AREA + u64::from(off) % (REGION0.1 as u64 - 3 * QUEUE_AREA)
            }
            Addr::High(off) => REGION1.0 + u64::from(off),
            Addr::Region0End(back) => REGION0.1 as u64 - u64::from(back),
            Addr::Raw(a) => a,
        }
    }
}

/// A descriptor length: mostly small, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u16),
    Raw(u32),
}

impl Len {
    pub fn resolve(self) -> u32 {
        match self {
            Len::Small(l) => u32::from(l) % 0x2000,
            Len::Raw(l) => l,
        }
    }
}

/// Raw queue manipulation a hostile driver can do.
#[derive(Arbitrary, Debug, Clone)]
pub enum QueueOp {
    /// Write descriptor `index` of `queue` (flags keep NEXT/WRITE/INDIRECT bits only).
    Descriptor {
        queue: u8,
        index: u8,
        addr: Addr,
        len: Len,
        flags: u8,
        next: u16,
    },
    /// Put `head` in the next available-ring slot and publish it.
    Publish { queue: u8, head: u16 },
    /// Set `avail.idx` to anything (e.g. far ahead of what was published).
    AvailIdx { queue: u8, idx: u16 },
    /// Scribble anywhere in guest memory (rings included).
    Poke { addr: Addr, bytes: Vec<u8> },
    /// Notify the device about `queue` (any index, even nonexistent ones).
    Notify { queue: u8 },
}

/// A virtio device behind its transport, initialised the way a Linux driver does it.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub ctl: RecordingCtl,
    queue_sizes: Vec<u16>,
    published: Vec<u16>,
}

/// Lock ignoring poison (a panic already aborts the fuzzer).
pub fn lock<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl Guest {
    /// Wrap `device` in a transport over fresh guest memory (no driver init yet).
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let mem = guest_memory();
        let queue_sizes = lock(&device).queue_max_sizes().to_vec();
        let transport = MmioTransport::with_shared_device(mem.clone(), device.clone())
            .expect("transport for a device with valid queue sizes");
        let published = vec![0; queue_sizes.len()];
        Guest {
            mem,
            transport,
            device,
            ctl: RecordingCtl::default(),
            queue_sizes,
            published,
        }
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn queue_base(queue: usize) -> u64 {
        REGION0.0 + QUEUE_AREA * queue as u64
    }

    /// Driver initialisation (virtio 1.2 §3.1.1) with every queue at `size` entries (clamped
    /// to the device maximum). Returns whether the device reached `DRIVER_OK`.
    pub fn init(&mut self, size: u16) -> bool {
        self.write_reg(REG_STATUS, STATUS_ACK);
        self.write_reg(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
        for sel in 0..2 {
            self.write_reg(REG_DEVICE_FEATURES_SEL, sel);
            let features = self.read_reg(REG_DEVICE_FEATURES);
            self.write_reg(REG_DRIVER_FEATURES_SEL, sel);
            self.write_reg(REG_DRIVER_FEATURES, features);
        }
        self.write_reg(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        for q in 0..self.queue_sizes.len() {
            let size = size.min(self.queue_sizes[q]);
            let base = Self::queue_base(q);
            self.write_reg(REG_QUEUE_SEL, q as u32);
            self.write_reg(REG_QUEUE_NUM, u32::from(size));
            self.write_reg(REG_QUEUE_DESC_LOW, (base + DESC_OFF) as u32);
            self.write_reg(REG_QUEUE_AVAIL_LOW, (base + AVAIL_OFF) as u32);
            self.write_reg(REG_QUEUE_USED_LOW, (base + USED_OFF) as u32);
            self.write_reg(REG_QUEUE_READY, 1);
        }
        self.write_reg(
            REG_STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        self.transport.status() & STATUS_DRIVER_OK != 0
    }

    fn queue_index(&self, queue: u8) -> usize {
        usize::from(queue) % self.queue_sizes.len().max(1)
    }

    /// Write one descriptor (`VIRTQ_DESC_F_*` in `flags`).
    pub fn set_descriptor(
        &mut self,
        queue: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = Self::queue_base(queue) + DESC_OFF + 16 * u64::from(index % 256);
        let _ = self.mem.write_slice(&raw, GuestAddress(at));
    }

    /// Make `head` available on `queue` and bump `avail.idx`.
    pub fn publish(&mut self, queue: usize, head: u16) {
        let size = self.queue_sizes[queue].max(1);
        let avail = Self::queue_base(queue) + AVAIL_OFF;
        let slot = u64::from(self.published[queue] % size);
        let _ = self.mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot));
        self.published[queue] = self.published[queue].wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.published[queue], GuestAddress(avail + 2));
    }

    /// Run the device's queue handler, as the event loop does on a queue-notify eventfd.
    pub fn notify(&mut self, queue: usize) {
        lock(&self.device).process_queue(queue, &mut self.ctl);
    }

    /// Deliver the readiness the kernel reports for every fd the device registered (one
    /// round of the epoll loop, without blocking).
    pub fn host_events(&mut self) {
        let fds = self.ctl.fds.clone();
        for (fd, wanted) in fds {
            let mut pfd = libc::pollfd {
                fd,
                events: 0,
                revents: 0,
            };
            if wanted.contains(EventSet::IN) {
                pfd.events |= libc::POLLIN;
            }
            if wanted.contains(EventSet::OUT) {
                pfd.events |= libc::POLLOUT;
            }
            // SAFETY: `pfd` is a valid pollfd for the duration of the call; timeout 0.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n <= 0 || pfd.revents == 0 {
                continue;
            }
            let mut events = EventSet::empty();
            if pfd.revents & libc::POLLIN != 0 {
                events |= EventSet::IN;
            }
            if pfd.revents & libc::POLLOUT != 0 {
                events |= EventSet::OUT;
            }
            if pfd.revents & libc::POLLHUP != 0 {
                events |= EventSet::HANG_UP;
            }
            if pfd.revents & libc::POLLERR != 0 {
                events |= EventSet::ERROR;
            }
            // The fd may have been removed by an earlier handler call in this round.
            if self.ctl.fds.iter().any(|(f, _)| *f == fd) {
                lock(&self.device).handle_host_event(fd, events, &mut self.ctl);
            }
        }
    }

    /// Apply one raw queue operation.
    pub fn apply(&mut self, op: &QueueOp) {
        match *op {
            QueueOp::Descriptor {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let q = self.queue_index(queue);
                self.set_descriptor(
                    q,
                    u16::from(index),
                    addr.resolve(),
                    len.resolve(),
                    u16::from(flags & 7),
                    next,
                );
            }
            QueueOp::Publish { queue, head } => {
                let q = self.queue_index(queue);
                self.publish(q, head);
            }
            QueueOp::AvailIdx { queue, idx } => {
                let q = self.queue_index(queue);
                let avail = Self::queue_base(q) + AVAIL_OFF;
                let _ = self.mem.write_obj(idx, GuestAddress(avail + 2));
            }
            QueueOp::Poke { addr, ref bytes } => {
                let bytes = &bytes[..bytes.len().min(4096)];
                let _ = self.mem.write_slice(bytes, GuestAddress(addr.resolve()));
            }
            QueueOp::Notify { queue } => {
                // Out-of-range indexes go to the device as they are: it must ignore them.
                lock(&self.device).process_queue(usize::from(queue), &mut self.ctl);
            }
        }
    }
}

/// A process-wide scratch directory (disk images, vsock sockets), removed at exit by
/// nobody: libFuzzer exits with `_exit`, so it lives under the system temp dir and is
/// small.
pub fn scratch_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("palisade-fuzz-")
            .tempdir()
            .expect("creating a scratch dir")
    })
    .path()
}
