//! What every virtio device implements, and the pieces the transport hands it.
//!
//! A device lives behind an `Arc<Mutex<_>>` shared by two threads: the vCPU thread reaches it
//! through [`super::MmioTransport`] (feature negotiation, config space, activation, reset) and
//! the device event-loop thread through [`VirtioEventHandler`] (queue notifications, host fds).
//! Lock order is always transport → device; the event handler only takes the device lock.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::event_loop::{EventHandler, EventLoopCtl};
use crate::memory::GuestMemoryMmap;

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured fewer or more queues than the device has.
    #[error("expected {expected} queues, the transport provided {actual}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        actual: usize,
    },
    /// A queue the device cannot work without was not made ready by the driver.
    #[error("queue {0} is required but was not enabled by the driver")]
    QueueNotReady(usize),
    /// The driver's configuration of a queue is not usable (size, alignment, or rings
    /// outside guest memory).
    #[error("queue {index} is misconfigured: {reason}")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// `activate` was called on a device that is already running.
    #[error("the device is already activated")]
    AlreadyActive,
}

/// Everything a device needs to start serving its queues, handed over at `DRIVER_OK`.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// How the device raises its interrupt.
    pub interrupt: Interrupt,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], configured by the driver.
    /// Queues the driver did not enable are passed with `ready() == false`.
    pub queues: Vec<Queue>,
    /// The feature bits the driver accepted (a subset of the device's).
    pub acked_features: u64,
}

/// A virtio device model, independent of the transport that exposes it to the guest.
///
/// Every method may be driven by a hostile guest: implementations validate all guest
/// addresses and lengths, never panic, and keep memory use bounded.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Read device configuration space at `offset` (unknown bytes read as zero; `data` is
    /// zeroed by the caller).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration space. Read-only config (the default) ignores writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start serving the queues. Called once per driver initialisation, at `DRIVER_OK`.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Whether [`VirtioDevice::activate`] succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// Return to the pre-activation state: drop the queues, memory and interrupt, close
    /// per-driver host resources. Called by the transport when the driver writes status 0.
    fn reset(&mut self);
    /// Host fds (besides the queue-notify eventfds) the event loop watches from the start.
    fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// The guest notified queue `queue_index` (or the transport asked for a poll after
    /// activation). Called on the event-loop thread; must tolerate a non-activated device.
    fn process_queue(&mut self, queue_index: usize, ctl: &mut dyn EventLoopCtl);
    /// One of the device's host fds is ready.
    fn handle_host_event(&mut self, _fd: RawFd, _events: EventSet, _ctl: &mut dyn EventLoopCtl) {}
}

/// Lock a device, recovering from poisoning (see [`crate::devices::bus::lock`] for why).
pub(crate) fn lock_device<D: ?Sized>(device: &Mutex<D>) -> MutexGuard<'_, D> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copy the part of `config` that `[offset, offset + data.len())` overlaps into `data`;
/// bytes outside the structure stay zero.
pub(crate) fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Why the device interrupted the driver (the virtio-mmio `InterruptStatus` bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device put buffers in a used ring.
    UsedRing,
    /// The device configuration space changed.
    ConfigChange,
}

impl InterruptKind {
    fn status_bit(self) -> u32 {
        match self {
            InterruptKind::UsedRing => VIRTIO_MMIO_INT_VRING,
            InterruptKind::ConfigChange => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

#[derive(Debug)]
struct InterruptInner {
    status: AtomicU32,
    irq_evt: EventFd,
}

/// A device's interrupt line: the `InterruptStatus` bits the driver reads and acknowledges,
/// plus the eventfd the VMM registers as a KVM irqfd on the device's GSI. Cheap to clone;
/// clones share state.
#[derive(Clone, Debug)]
pub struct Interrupt {
    inner: Arc<InterruptInner>,
}

impl Interrupt {
    /// A new interrupt with a non-blocking eventfd and no pending status.
    pub fn new() -> io::Result<Self> {
        Ok(Interrupt {
            inner: Arc::new(InterruptInner {
                status: AtomicU32::new(0),
                irq_evt: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Record `kind` in the status register and raise the interrupt.
    pub fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.inner
            .status
            .fetch_or(kind.status_bit(), Ordering::SeqCst);
        match self.inner.irq_evt.write(1) {
            Ok(()) => Ok(()),
            // The counter is saturated: an interrupt is pending anyway.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Raise a used-ring interrupt after the `device` completed buffers. A failure is only
    /// logged: the device goes on, and the driver still finds the buffers when it next looks
    /// (a guest never makes an eventfd write fail; only the host running out of something
    /// can).
    pub fn signal_used(&self, device: &str) {
        if let Err(e) = self.trigger(InterruptKind::UsedRing) {
            tracing::warn!("{device}: cannot raise interrupt: {e}");
        }
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged the `bits` (`InterruptACK` register).
    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Forget pending status bits (device reset).
    pub(crate) fn clear(&self) {
        self.inner.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd written on every trigger.
    pub fn event(&self) -> &EventFd {
        &self.inner.irq_evt
    }
}

/// The device-event-loop handler of one virtio device: reads queue-notify eventfds and
/// routes them and the device's host fds to the device.
pub struct VirtioEventHandler {
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue_evts: Vec<EventFd>,
}

impl std::fmt::Debug for VirtioEventHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioEventHandler")
            .field("queue_evts", &self.queue_evts)
            .finish_non_exhaustive()
    }
}

impl VirtioEventHandler {
    /// A handler for `device`, reading `queue_evts[i]` for queue `i`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, queue_evts: Vec<EventFd>) -> Self {
        VirtioEventHandler { device, queue_evts }
    }
}

impl EventHandler for VirtioEventHandler {
    fn fds(&self) -> Vec<(RawFd, EventSet)> {
        let mut fds: Vec<(RawFd, EventSet)> = self
            .queue_evts
            .iter()
            .map(|evt| (evt.as_raw_fd(), EventSet::IN))
            .collect();
        fds.extend(lock_device(&self.device).host_fds());
        fds
    }

    fn handle(&mut self, fd: RawFd, events: EventSet, ctl: &mut dyn EventLoopCtl) {
        if let Some(index) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            // Reading resets the counter; several notifications coalesce into one pass.
            let _ = self.queue_evts[index].read();
            lock_device(&self.device).process_queue(index, ctl);
        } else {
            lock_device(&self.device).handle_host_event(fd, events, ctl);
        }
    }
}
