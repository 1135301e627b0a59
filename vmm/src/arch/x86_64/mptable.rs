//! Intel MultiProcessor Specification 1.4 table: how an ACPI-less guest kernel
//! (`CONFIG_X86_MPPARSE`) discovers its CPUs, the IOAPIC and the interrupt routing.
//!
//! Written at [`MPTABLE_START`] (last KiB of conventional memory, which Linux scans):
//! the 16-byte floating pointer, then the configuration table with one processor entry per
//! vCPU (APIC id = index), the ISA bus, the IOAPIC (id = vCPU count), ISA IRQs 0..=23
//! routed 1:1 to IOAPIC pins, and LINT0 = ExtINT, LINT1 = NMI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{APIC_START, IOAPIC_START, IRQ_MAX, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

/// The table must fit in the KiB below 0xa0000: 284 + 20 bytes per CPU.
pub const MAX_CPUS: u8 = 32;

const MP_SPEC_REV: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 signature, FPU + APIC feature flags: what Linux prints, not what it uses.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
const ISA_BUS_ID: u8 = 0;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Zero or too many vCPUs.
    #[error("the MP table supports 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

/// Sum-to-zero checksum byte for `bytes`.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Build the floating pointer + configuration table for `cpus` vCPUs, to live at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // flags 0: polarity/trigger conform to the bus (ISA: active high, edge).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        // Destination 0xff: every local APIC.
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + FLOATING_LEN as u64;
    let table_len = HEADER_LEN + entries.len();

    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(MP_SPEC_REV);
    header.push(0); // checksum, patched below
    header.extend_from_slice(b"PALISADE");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&header);
    Ok(floating)
}

/// Write the MP table for `cpus` vCPUs into guest memory at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let table = build(cpus, MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::EBDA_START;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers() {
        for cpus in [1, 2, 4, MAX_CPUS] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
            let entries = u16::from_le_bytes(table[34..36].try_into().unwrap());
            assert_eq!(entries as usize, cpus as usize + 2 + 24 + 2);
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (2 + 24 + 2));
            // It fits below the legacy hole.
            assert!(MPTABLE_START as usize + t.len() <= (EBDA_START + 0x400) as usize);
        }
    }

    #[test]
    fn processor_entries() {
        let t = build(2, MPTABLE_START).unwrap();
        let cpu0 = &t[16 + 44..16 + 64];
        let cpu1 = &t[16 + 64..16 + 84];
        assert_eq!(cpu0[..4], [ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(cpu1[..4], [ENTRY_PROCESSOR, 1, APIC_VERSION, 1]);
        let ioapic = &t[16 + 84 + 8..16 + 84 + 16];
        assert_eq!(ioapic[..4], [ENTRY_IOAPIC, 2, IOAPIC_VERSION, 1]);
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(matches!(build(0, 0), Err(MpTableError::CpuCount(0))));
        assert!(matches!(
            build(MAX_CPUS + 1, 0),
            Err(MpTableError::CpuCount(_))
        ));
    }
}
