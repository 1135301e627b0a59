//! Emulated devices and the buses that route guest accesses to them.
//!
//! Contract between the VMM core (vCPU run loop, legacy devices) and the virtio devices:
//! every device the guest reaches through a port or an MMIO address implements [`BusDevice`];
//! the vCPU thread dispatches `KVM_EXIT_IO` / `KVM_EXIT_MMIO` to it with the offset from the
//! start of the device's range. Devices driven by host file descriptors (vsock's Unix socket,
//! queue-notify ioeventfds) are served by the device event-loop thread instead
//! ([`crate::event_loop`]).
//!
//! A virtio-mmio device is attached by the VMM in three steps (see [`VirtioMmioDevice`]):
//! 1. the VMM picks an [`MmioSlot`] (base address, size, GSI) and adds the transport to the
//!    MMIO bus at `slot.base`;
//! 2. it registers each queue-notify eventfd with KVM as an ioeventfd on
//!    `slot.base + VIRTIO_MMIO_QUEUE_NOTIFY` with `datamatch = queue index` (so a notify
//!    never leaves the kernel), and the interrupt eventfd as an irqfd on `slot.gsi`;
//! 3. it adds the device's [`EventHandler`] to the device event loop, and appends
//!    `virtio_mmio.device=<size>@<base>:<gsi>` to the guest kernel command line.

pub mod bus;
pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::EventHandler;

pub use bus::{Bus, BusError};

/// A device mapped on the PIO or MMIO bus.
///
/// Implementations must treat `offset` and `data` as guest-controlled: any offset or access
/// width is possible, and unknown ones are ignored (reads return zeroes), never a panic.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Offset of the QueueNotify register in a virtio-mmio device's register window.
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Where the VMM placed a virtio-mmio device and which interrupt line it raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base address of the register window.
    pub base: u64,
    /// Size of the register window in bytes.
    pub size: u64,
    /// IOAPIC pin / GSI the device's irqfd is routed to.
    pub gsi: u32,
}

impl MmioSlot {
    /// The kernel command-line fragment that makes the guest probe this device
    /// (needs `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.size / 1024,
            self.base,
            self.gsi
        )
    }
}

/// What the VMM needs from a virtio-mmio transport to wire it into KVM and the event loop.
pub trait VirtioMmioDevice: BusDevice {
    /// `(queue index, eventfd)` for every queue: the VMM registers each as an ioeventfd on
    /// `base + VIRTIO_MMIO_QUEUE_NOTIFY` matching that index. The fds are clones; the device
    /// keeps (and reads) its own copies.
    fn queue_notify_events(&self) -> std::io::Result<Vec<(u32, EventFd)>>;
    /// The eventfd the device writes to raise its interrupt; the VMM makes it an irqfd.
    fn interrupt_event(&self) -> std::io::Result<EventFd>;
    /// The handler serving this device's host fds on the device event loop, taken once at
    /// attach time. `None` if the device needs no host fds.
    fn take_event_handler(&mut self) -> Option<Box<dyn EventHandler>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_entry_matches_kernel_syntax() {
        let slot = MmioSlot {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 5,
        };
        assert_eq!(slot.cmdline_entry(), "virtio_mmio.device=4K@0xd0000000:5");
    }
}
