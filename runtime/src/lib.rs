//! `palisade-runtime`: an OCI runtime-spec implementation for Linux.

pub mod cgroups;
pub mod seccomp;
