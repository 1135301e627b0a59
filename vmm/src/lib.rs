//! `palisade-vmm`: a minimal KVM microVM monitor.
