//! virtio devices (vsock, block, net) and their virtio-mmio transport.
//!
//! - [`device`]: the [`VirtioDevice`] trait, the [`Interrupt`] line and the event-loop
//!   handler shared by all devices;
//! - [`mmio`]: the virtio-mmio v2 transport ([`MmioTransport`]), which implements
//!   [`crate::devices::BusDevice`] and [`crate::devices::VirtioMmioDevice`];
//! - [`block`]: virtio-blk on a raw file;
//! - [`vsock`]: virtio-vsock in Firecracker's hybrid mode (host side is a Unix socket);
//! - [`net`]: virtio-net on an existing tap interface.
//!
//! The VMM core only relies on `MmioTransport`: its queue-notify eventfds (KVM ioeventfds
//! at offset `0x50`, datamatch = queue index), its interrupt eventfd (KVM irqfd on the
//! device's GSI) and its event handler (device event loop).

pub mod block;
pub mod device;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

pub use device::{ActivateError, Activation, Interrupt, InterruptKind, VirtioDevice};
pub use mmio::{MmioError, MmioTransport, MMIO_WINDOW_SIZE};
