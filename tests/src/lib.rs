//! Shared helpers for palisade integration tests: busybox bundles and OCI images built
//! locally (there is no registry access), and a private containerd.

pub mod bundle;
pub mod containerd;
pub mod hostile;
pub mod image;
pub mod leaks;
