//! Shared helpers for palisade integration tests: busybox bundles and OCI images built
//! locally (there is no registry access), a private containerd, and a CRI client.

pub mod bundle;
pub mod containerd;
pub mod cri;
pub mod hostile;
pub mod image;
pub mod leaks;
pub mod netns;
pub mod procfs;
