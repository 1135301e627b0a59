//! Boot-time register state of the boot vCPU, and the tables it points at.
//!
//! Two entry modes:
//! - [`BootEntry::Pvh`]: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`
//!   (the PVH boot ABI; what our `vmlinux` uses).
//! - [`BootEntry::Linux64`]: 64-bit long mode with the low 4 GiB identity-mapped by 2 MiB
//!   pages, `rsi` = zero page (the Linux 64-bit boot protocol: bzImage's `startup_64`, or
//!   an ELF without a PVH note).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::gdt::{self, segment_from_gdt};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};
use crate::memory::GuestMemoryMmap;

/// How the boot vCPU enters the guest kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit entry at `entry` with `ebx = start_info`.
    Pvh {
        /// Guest-physical entry point (from the PVH ELF note).
        entry: u64,
        /// Guest-physical address of `hvm_start_info`.
        start_info: u64,
    },
    /// 64-bit Linux boot protocol: entry at `entry` with `rsi = zero_page`.
    Linux64 {
        /// Guest-physical (= identity-mapped virtual) entry point.
        entry: u64,
        /// Guest-physical address of `boot_params`.
        zero_page: u64,
    },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry bit: 2 MiB page.
const PDE_PAGE_SIZE: u64 = 0x80;
/// Number of page directories: each maps 1 GiB.
const PD_COUNT: u64 = 4;

/// Write the GDT and IDT for `entry`, plus the identity-map page tables in long mode.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), GuestMemoryError> {
    let gdt = match entry {
        BootEntry::Pvh { .. } => gdt::PVH_GDT,
        BootEntry::Linux64 { .. } => gdt::LONG_MODE_GDT,
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    if let BootEntry::Linux64 { .. } = entry {
        mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))?;
        for pd in 0..PD_COUNT {
            let pd_addr = PDE_START + pd * 0x1000;
            mem.write_obj(pd_addr | PTE_PRESENT_RW, GuestAddress(PDPTE_START + pd * 8))?;
            for i in 0..512u64 {
                let phys = (pd << 30) | (i << 21);
                mem.write_obj(
                    phys | PTE_PRESENT_RW | PDE_PAGE_SIZE,
                    GuestAddress(pd_addr + i * 8),
                )?;
            }
        }
    }
    Ok(())
}

/// General-purpose registers at entry.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
        BootEntry::Linux64 { entry, zero_page } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: zero_page,
            ..Default::default()
        },
    }
}

/// Segment and control registers at entry, starting from the vCPU's current `sregs` (so
/// fields KVM manages, such as the APIC base, keep their values).
pub fn boot_sregs(entry: BootEntry, mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = match entry {
        BootEntry::Pvh { .. } => gdt::PVH_GDT,
        BootEntry::Linux64 { .. } => gdt::LONG_MODE_GDT,
    };
    let code = segment_from_gdt(gdt[gdt::CODE_INDEX as usize], gdt::CODE_INDEX);
    let data = segment_from_gdt(gdt[gdt::DATA_INDEX as usize], gdt::DATA_INDEX);
    let tss = segment_from_gdt(gdt[gdt::TSS_INDEX as usize], gdt::TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// FPU state at entry: x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_tables_identity_map_4g() {
        let m = mem();
        let entry = BootEntry::Linux64 {
            entry: 0x10_0000,
            zero_page: 0x7000,
        };
        write_boot_tables(&m, entry).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // 0xd000_0000 = PD 3, entry 128.
        let pdpte3: u64 = m.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpte3 & !0xfff, PDE_START + 0x3000);
        let pde: u64 = m
            .read_obj(GuestAddress((pdpte3 & !0xfff) + 128 * 8))
            .unwrap();
        assert_eq!(pde, 0xd000_0000 | 0x83);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt::CODE64);
    }

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(
            BootEntry::Linux64 {
                entry: 0,
                zero_page: 0,
            },
            kvm_sregs::default(),
        );
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.tr.type_, 0xb);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn pvh_state() {
        let e = BootEntry::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        };
        let s = boot_sregs(e, kvm_sregs::default());
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        let r = boot_regs(e);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, 0x6000, 2));
        // PVH does not touch the page-table area.
        let m = mem();
        write_boot_tables(&m, e).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(), 0);
    }
}
