//! `palisade-vmm`: a minimal KVM microVM monitor.
//!
//! Layout (one concern per module, after Firecracker's `src/vmm`):
//! - [`event_loop`]: the device event-loop thread (epoll) serving host fds;
//! - [`devices`]: the PIO/MMIO buses, legacy devices, virtio devices;
//! - [`memory`]: guest memory.

#![deny(missing_docs)]

pub mod devices;
pub mod event_loop;
pub mod memory;
