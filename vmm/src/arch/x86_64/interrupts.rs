//! Local APIC setup: LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as the MP table
//! describes and as a BIOS would leave them.

use kvm_bindings::kvm_lapic_state;

/// Offset of LVT LINT0 in the APIC register page.
const APIC_LVT0: usize = 0x350;
/// Offset of LVT LINT1.
const APIC_LVT1: usize = 0x360;
/// Delivery mode field of an LVT entry (bits 8-10).
const DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !DELIVERY_MODE_MASK) | (mode << 8)
}

/// Program LINT0 = ExtINT and LINT1 = NMI in `lapic`.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked entries with some vector bits set must keep them.
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0000 | 0x700 | 0x31);
        set_reg(&mut lapic, APIC_LVT1, 0x0001_0000);
        set_lint(&mut lapic);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x0001_0731);
        assert_eq!(get_reg(&lapic, APIC_LVT1), 0x0001_0400);
    }
}
