//! The boot GDT and the segment registers derived from it.
//!
//! Both boot paths use four descriptors: null, code, data, TSS. The TSS is a 64-bit *busy*
//! TSS: some KVM backends (kvm-pvm among them) refuse to enter a guest whose TR does not
//! reference a valid busy TSS.

use kvm_bindings::kvm_segment;

/// Pack a GDT descriptor from `flags` (access byte in bits 0-7, G/DB/L/AVL in 12-15),
/// a 32-bit base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// 64-bit code: present, DPL0, execute/read, accessed, L=1, G=1.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// 32-bit flat code: present, DPL0, execute/read, accessed, D=1, G=1.
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Flat data: present, DPL0, read/write, accessed, B=1, G=1.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// Busy 64-bit TSS (type 0xb), present.
pub const TSS64_BUSY: u64 = gdt_entry(0x808b, 0, 0xfffff);
/// Busy 32-bit TSS, byte granular (what PVH expects on entry).
pub const TSS32_BUSY: u64 = gdt_entry(0x008b, 0, 0x67);

/// Index of the code descriptor.
pub const CODE_INDEX: u16 = 1;
/// Index of the data descriptor.
pub const DATA_INDEX: u16 = 2;
/// Index of the TSS descriptor.
pub const TSS_INDEX: u16 = 3;

/// The GDT for the 64-bit Linux boot protocol entry (and the 64-bit test guests).
pub const LONG_MODE_GDT: [u64; 4] = [0, CODE64, DATA, TSS64_BUSY];
/// The GDT for the 32-bit PVH entry.
pub const PVH_GDT: [u64; 4] = [0, CODE32, DATA, TSS32_BUSY];

/// The hidden segment-register state KVM needs for descriptor `index` of a GDT.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32;
    let g = bit(55);
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_fields() {
        let s = segment_from_gdt(CODE64, CODE_INDEX);
        assert_eq!(s.selector, 0x8);
        assert_eq!(
            (s.type_, s.s, s.present, s.l, s.db, s.g),
            (0xb, 1, 1, 1, 0, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn tss_is_busy_system_segment() {
        let s = segment_from_gdt(TSS64_BUSY, TSS_INDEX);
        assert_eq!((s.type_, s.s, s.present), (0xb, 0, 1));
        assert_eq!(s.selector, 0x18);
        let t = segment_from_gdt(TSS32_BUSY, TSS_INDEX);
        assert_eq!((t.type_, t.g, t.limit), (0xb, 0, 0x67));
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 2);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
