//! `palisade-vmm`: a minimal KVM microVM monitor.
//!
//! Layout (one concern per module, after Firecracker's `src/vmm`):
//! - [`arch`]: x86_64 memory layout, boot CPU state, CPUID, MSRs, LAPIC, MP table;
//! - [`vstate`]: the KVM VM and the vCPU threads;
//! - [`memory`]: guest memory;
//! - [`loader`]: kernel/initrd/command line and boot parameters;
//! - [`devices`]: the PIO/MMIO buses, legacy devices, virtio devices;
//! - [`event_loop`]: the device event-loop thread (epoll) serving host fds;
//! - [`config`]: flags and JSON file, validated;
//! - [`vmm`]: building the VM from a configuration and running it;
//! - [`seccomp`]: per-thread syscall filters;
//! - [`api`]: the control socket;
//! - [`testing`]: tiny hand-assembled guests for smoke tests and benchmarks.

#![deny(missing_docs)]

pub mod api;
pub mod arch;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod loader;
pub mod memory;
pub mod seccomp;
pub mod testing;
pub mod vmm;
pub mod vstate;

pub use config::{Cli, VmConfig};
pub use vmm::{Outcome, Vmm};
