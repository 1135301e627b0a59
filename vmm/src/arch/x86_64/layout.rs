//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_0520  boot IDT (empty)
//! 0x0000_6000  PVH hvm_start_info  0x0000_6040  PVH module list (initrd)
//! 0x0000_7000  zero page (Linux boot protocol) or PVH memory map
//! 0x0000_8ff0  boot stack top      0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. 4 PDs
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA)     0x000a_0000 - 0x000f_ffff  legacy hole (not RAM)
//! 0x0010_0000  kernel (HIMEM_START) ... RAM up to the MMIO gap
//! 0xd000_0000  MMIO gap: virtio-mmio windows (4 KiB each), IOAPIC, LAPIC, KVM TSS
//! 0x1_0000_0000  RAM above 4 GiB, if the guest has more than fits below the gap
//! ```

use vm_memory::GuestAddress;

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (a single null entry: no exceptions are handled before the kernel's own IDT).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (the PVH and Linux boot paths are exclusive, so it shares the page).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol "zero page" (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux boot protocol entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4.
pub const PML4_START: u64 = 0x9000;
/// Boot page tables: PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Boot page tables: four page directories (identity map of the low 4 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Command-line capacity including the NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer + configuration table, in the last KiB of conventional memory.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional (low) RAM; the BIOS area follows.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded and "high" memory starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the real-mode TSS on Intel (`KVM_SET_TSS_ADDR`).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// One page for the EPT identity map (`KVM_SET_IDENTITY_MAP_ADDR`), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// First GSI for virtio devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last IOAPIC pin.
pub const IRQ_MAX: u32 = 23;

/// Largest guest memory accepted (bounded by 4 PDs only for the boot identity map, which
/// is independent of RAM size; this bound is about sane configuration).
pub const MAX_MEM_SIZE: u64 = 1 << 40;

/// Errors of the memory layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Not enough memory to hold the boot structures and a kernel.
    #[error("guest memory of {0} bytes is too small (need at least {min} bytes)", min = MIN_MEM_SIZE)]
    TooSmall(u64),
    /// More memory than this VMM supports.
    #[error("guest memory of {0} bytes is too large (max {max} bytes)", max = MAX_MEM_SIZE)]
    TooLarge(u64),
    /// Not page-aligned.
    #[error("guest memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
}

/// Smallest useful guest: boot structures + a kernel.
pub const MIN_MEM_SIZE: u64 = 16 << 20;

/// The RAM regions of a guest with `mem_size` bytes: everything below the MMIO gap, the
/// rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Result<Vec<(GuestAddress, u64)>, LayoutError> {
    if mem_size < MIN_MEM_SIZE {
        return Err(LayoutError::TooSmall(mem_size));
    }
    if mem_size > MAX_MEM_SIZE {
        return Err(LayoutError::TooLarge(mem_size));
    }
    if mem_size % 4096 != 0 {
        return Err(LayoutError::Unaligned(mem_size));
    }
    if mem_size <= MMIO_GAP_START {
        Ok(vec![(GuestAddress(0), mem_size)])
    } else {
        Ok(vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ])
    }
}

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The memory map given to the guest (e820 / PVH memmap) for `regions` from [`ram_regions`]:
/// low RAM up to the EBDA, RAM from 1 MiB, RAM above 4 GiB; the legacy hole is left out.
pub fn memory_map(regions: &[(GuestAddress, u64)]) -> Vec<MemMapEntry> {
    let mut map = vec![MemMapEntry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    for &(start, size) in regions {
        let end = start.0 + size;
        let start = start.0.max(HIMEM_START);
        if end > start {
            map.push(MemMapEntry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Highest usable address below the MMIO gap + 1 (where a high initrd must end).
pub fn low_ram_end(regions: &[(GuestAddress, u64)]) -> u64 {
    regions
        .first()
        .map_or(0, |(s, sz)| (s.0 + sz).min(MMIO_GAP_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let r = ram_regions(128 << 20).unwrap();
        assert_eq!(r, vec![(GuestAddress(0), 128 << 20)]);
        let map = memory_map(&r);
        assert_eq!(
            map,
            vec![
                MemMapEntry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                MemMapEntry {
                    addr: HIMEM_START,
                    size: (128 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
        assert_eq!(low_ram_end(&r), 128 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let size = 4u64 << 30;
        let r = ram_regions(size).unwrap();
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)
            ]
        );
        let map = memory_map(&r);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(map[2].addr, MMIO_GAP_END);
        assert_eq!(map[2].size, size - MMIO_GAP_START);
        // Total RAM reported = all RAM minus the legacy hole.
        let total: u64 = map.iter().map(|e| e.size).sum();
        assert_eq!(total, size - (HIMEM_START - EBDA_START));
        assert_eq!(low_ram_end(&r), MMIO_GAP_START);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert_eq!(ram_regions(1 << 20), Err(LayoutError::TooSmall(1 << 20)));
        assert_eq!(
            ram_regions((64 << 20) + 1),
            Err(LayoutError::Unaligned((64 << 20) + 1))
        );
        assert_eq!(ram_regions(2 << 40), Err(LayoutError::TooLarge(2 << 40)));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x4000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
        const { assert!(MPTABLE_START + 0x400 <= HIMEM_START) };
    }
}
