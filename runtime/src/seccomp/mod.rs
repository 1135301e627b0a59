//! OCI seccomp profile → BPF (seccompiler), and its installation.
