//! virtio devices (vsock, block) and their virtio-mmio transport.
//!
//! Owned by the virtio work; the VMM core only relies on: `MmioTransport` implementing
//! [`super::BusDevice`], and a way to register each transport's queue-notify ioeventfds and
//! interrupt irqfd with KVM, and the device's host-side fds with the device event loop.
