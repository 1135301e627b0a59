//! Emulated devices and the buses that route guest accesses to them.
//!
//! Contract between the VMM core (vCPU run loop, legacy devices) and the virtio devices:
//! every device the guest reaches through a port or an MMIO address implements [`BusDevice`];
//! the vCPU thread dispatches `KVM_EXIT_IO` / `KVM_EXIT_MMIO` to it with the offset from the
//! start of the device's range. Devices driven by host file descriptors (vsock's Unix socket,
//! queue-notify ioeventfds) are served by the device event-loop thread instead, see
//! [`virtio::VirtioDevice`].

pub mod virtio;

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
