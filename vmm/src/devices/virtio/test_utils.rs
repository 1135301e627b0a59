//! Test helpers: a driver-side view of a split queue built on virtio-queue's
//! [`MockSplitQueue`], and an [`EventLoopCtl`] that records registrations.

use std::collections::HashMap;
use std::os::unix::io::RawFd;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::device::{Activation, Interrupt};
use crate::event_loop::{EventLoopCtl, EventLoopError};

/// Guest memory for tests: one region at 0.
pub fn test_memory(size: usize) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// One buffer of a descriptor chain as the driver would post it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A device-readable buffer.
pub fn rd(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// A device-writable buffer.
pub fn wr(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// The driver side of one split queue.
pub struct TestQueue<'a> {
    pub mock: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    size: u16,
    next_desc: u16,
    used_seen: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries whose rings start at `start`.
    ///
    /// The mock is created 4× larger than the queue: `MockSplitQueue` (virtio-queue 0.18)
    /// places the used ring `len` bytes after the available ring's entries instead of
    /// `2 * len` (`SplitQueueRing::end` counts elements), so with its own size the driver's
    /// avail entries from `len / 2` on overwrite the used ring's `flags`/`idx`. The device
    /// is configured with `size`; the spare room keeps the rings apart.
    pub fn new(mem: &'a GuestMemoryMmap<()>, start: u64, size: u16) -> Self {
        TestQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(start), size * 4),
            size,
            next_desc: 0,
            used_seen: 0,
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// A device-side queue configured like a driver would (ready, addresses set).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(self.mock.desc_table_addr())
            .unwrap();
        q.try_set_avail_ring_address(self.mock.avail_addr())
            .unwrap();
        q.try_set_used_ring_address(self.mock.used_addr()).unwrap();
        q.set_ready(true);
        q
    }

    /// Write descriptor `index` verbatim (for malformed chains).
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mock
            .desc_table()
            .store(
                index,
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }

    /// Make the chain starting at descriptor `head` available and return `head`.
    pub fn publish(&self, head: u16) -> u16 {
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
        head
    }

    /// Post a chain of `bufs` (linked in order) and return its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty() && bufs.len() <= usize::from(self.size));
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = (index + 1) % self.size;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store_desc(index, b.addr, b.len, flags, next);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head)
    }

    /// The next `(head, len)` the device put in the used ring, if any.
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        let used = self.mock.used();
        if used.idx().load() == self.used_seen {
            return None;
        }
        let elem: VirtqUsedElem = used
            .ring()
            .ref_at(usize::from(self.used_seen % self.size))
            .unwrap()
            .load();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((elem.id(), elem.len()))
    }
}

/// An [`Activation`] for `queues`.
pub fn activation(mem: &GuestMemoryMmap<()>, queues: Vec<Queue>) -> (Activation, Interrupt) {
    let interrupt = Interrupt::new().unwrap();
    (
        Activation {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            queues,
            acked_features: 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
        },
        interrupt,
    )
}

/// Whether the interrupt fired since the last call (and consume it).
pub fn interrupt_fired(interrupt: &Interrupt) -> bool {
    interrupt.event().read().is_ok()
}

/// Records the fds a handler registers.
#[derive(Debug, Default)]
pub struct RecordingCtl {
    pub fds: HashMap<RawFd, EventSet>,
}

impl EventLoopCtl for RecordingCtl {
    fn add(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError> {
        if self.fds.insert(fd, events).is_some() {
            return Err(EventLoopError::AlreadyRegistered(fd));
        }
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError> {
        match self.fds.get_mut(&fd) {
            Some(e) => {
                *e = events;
                Ok(())
            }
            None => Err(EventLoopError::AlreadyRegistered(fd)),
        }
    }

    fn remove(&mut self, fd: RawFd) {
        self.fds.remove(&fd);
    }
}

/// Drive `transport` through a complete Linux-style initialisation with `queues`
/// (ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK, queue setup, DRIVER_OK).
pub fn driver_init(transport: &mut super::MmioTransport, queues: &[&TestQueue]) {
    use crate::devices::BusDevice;
    let mut w = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes());
    w(0x70, 1);
    w(0x70, 3);
    w(0x24, 1);
    w(0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
    w(0x24, 0);
    w(0x20, 0);
    w(0x70, 11);
    for (index, q) in queues.iter().enumerate() {
        let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        w(0x30, index as u32);
        w(0x38, u32::from(q.size()));
        let (lo, hi) = split(q.mock.desc_table_addr());
        w(0x80, lo);
        w(0x84, hi);
        let (lo, hi) = split(q.mock.avail_addr());
        w(0x90, lo);
        w(0x94, hi);
        let (lo, hi) = split(q.mock.used_addr());
        w(0xa0, lo);
        w(0xa4, hi);
        w(0x44, 1);
    }
    w(0x70, 15);
    let mut status = [0u8; 4];
    transport.read(0x70, &mut status);
    assert_eq!(u32::from_le_bytes(status), 15, "device refused DRIVER_OK");
}

/// A small deterministic PRNG (xorshift64*) for the randomized hostile-guest tests.
pub struct Rng(std::cell::Cell<u64>);

impl Rng {
    /// A generator with a fixed, non-zero seed.
    pub fn new(seed: u64) -> Self {
        Rng(std::cell::Cell::new(seed | 1))
    }

    /// The next pseudo-random value.
    pub fn next(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// One of `choices`.
    pub fn pick<T: Copy>(&self, choices: &[T]) -> T {
        choices[(self.next() % choices.len() as u64) as usize]
    }
}
