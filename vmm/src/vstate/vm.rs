//! The KVM VM: guest memory slots, in-kernel irqchip and PIT, TSS/identity-map addresses,
//! irqfd/ioeventfd registration.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::devices::{MmioSlot, VIRTIO_MMIO_QUEUE_NOTIFY};
use crate::memory::GuestMemoryMmap;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A capability the VMM relies on is missing.
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl on the VM failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Capabilities without which the VM cannot work as designed.
const REQUIRED_CAPS: [Cap; 7] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::ExtCpuid,
];

/// A KVM VM with its in-kernel interrupt controllers.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Open KVM, check the API and capabilities, and create a VM with the TSS and
    /// identity-map pages placed in the MMIO gap, an in-kernel irqchip (PIC + IOAPIC +
    /// LAPICs) and a PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(api));
        }
        if let Some(cap) = REQUIRED_CAPS.into_iter().find(|c| !kvm.check_extension(*c)) {
            return Err(VmError::MissingCap(cap));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        // The PIT is the guest's early timer (calibration). A dummy speaker port avoids
        // exits for port 0x61 polling.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Vm { kvm, fd })
    }

    /// Register every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::Kvm {
                    what: "guest memory host address",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [userspace_addr, +memory_size) is the mmap owned by
            // `mem`; the VMM keeps `mem` alive for as long as the VM (both live until exit)
            // and slots do not overlap because guest regions do not.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// The CPUID leaves KVM can expose, before per-vCPU normalisation.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Largest vCPU count KVM recommends for a VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_nr_vcpus()
    }

    /// Create vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    }

    /// Make a write to `evt` raise interrupt line `gsi` (edge) in the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// Make a guest write of `queue` to the QueueNotify register of `slot` signal `evt`
    /// inside the kernel, without a vCPU exit to userspace.
    pub fn register_queue_notify(
        &self,
        slot: &MmioSlot,
        queue: u32,
        evt: &EventFd,
    ) -> Result<(), VmError> {
        let addr = IoEventAddress::Mmio(slot.base + VIRTIO_MMIO_QUEUE_NOTIFY);
        self.fd
            .register_ioevent(evt, &addr, queue)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// The raw VM fd (for devices that need other VM ioctls).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
