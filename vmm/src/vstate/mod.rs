//! KVM state: the VM and its vCPUs.

pub mod vcpu;
pub mod vm;
