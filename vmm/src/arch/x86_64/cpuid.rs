//! CPUID normalisation: start from `KVM_GET_SUPPORTED_CPUID` and make the topology the
//! guest sees match the VM (N single-threaded cores in one package, APIC id = vCPU index).
//!
//! The hypervisor leaves (0x4000_0000..) are kept as KVM reports them: the "KVMKVMKVM"
//! signature is how a KVM- or PVM-enlightened guest recognises its host.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (the package has more than one logical processor).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: CmpLegacy (AMD: multi-core package).
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0xb/0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` items (ceil(log2)).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Normalise `entries` for vCPU `cpu_index` of `cpu_count`.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], cpu_index: u8, cpu_count: u8) {
    let id = u32::from(cpu_index);
    let count = u32::from(cpu_count.max(1));
    let core_bits = bits_for(count);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in 8-byte units; keep [7:0] brand index.
                e.ebx = (id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: [31:26] cores per package - 1,
                // [25:14] logical processors sharing this cache - 1. L1/L2 are per core
                // (one thread each), L3 is shared by the package.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            0x6 => {
                // No thermal/power management MSRs are emulated.
                e.eax = 0;
                e.ecx &= !1; // no APERF/MPERF
            }
            0xa => {
                // No PMU: hide architectural performance monitoring.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core: no SMT bits
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index; // level type 0: invalid, ends enumeration
                    }
                }
            }
            0x8000_0001 => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 => {
                // AMD: ECX[15:12] APIC id bits for cores, [7:0] cores per package - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            0x8000_001e => {
                // AMD extended APIC id / compute unit / node: one core per unit, node 0.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// A copy of `base` normalised for vCPU `cpu_index` of `cpu_count`.
pub fn for_vcpu(base: &CpuId, cpu_index: u8, cpu_count: u8) -> CpuId {
    let mut cpuid = base.clone();
    normalize(cpuid.as_mut_slice(), cpu_index, cpu_count);
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_and_apic_ids() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                ebx: 0xff00_00ff,
                ..entry(1, 0)
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            kvm_cpuid_entry2 {
                eax: (3 << 5) | 0x3,
                ..entry(4, 3)
            },
            kvm_cpuid_entry2 {
                eax: 1 << 5,
                ..entry(4, 0)
            },
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ];
        normalize(&mut entries, 2, 3);
        let leaf1 = entries[0];
        assert_eq!(leaf1.ebx >> 24, 2, "APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 3, "logical count");
        assert_eq!(leaf1.ebx & 0xff, 0xff, "brand index kept");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);

        assert_eq!(
            (entries[1].ebx, entries[1].ecx >> 8, entries[1].edx),
            (1, 1, 2)
        );
        assert_eq!(entries[2].eax, 2, "3 cores need 2 APIC id bits");
        assert_eq!((entries[2].ebx, entries[2].ecx >> 8), (3, 2));
        assert_eq!(entries[3].ecx >> 8, 0, "enumeration ends");

        // L3 shared by all 3, L1 by one; cores per package - 1 = 2.
        assert_eq!((entries[4].eax >> 14) & 0xfff, 2);
        assert_eq!(entries[4].eax >> 26, 2);
        assert_eq!((entries[5].eax >> 14) & 0xfff, 0);
        assert_eq!(entries[6].ecx & 0xff, 2);
        assert_eq!((entries[6].ecx >> 12) & 0xf, 2);
        assert_eq!(entries[7].eax, 2);
    }

    #[test]
    fn single_cpu_has_no_htt_and_keeps_kvm_signature() {
        let sig = kvm_cpuid_entry2 {
            eax: 0x4000_0001,
            ebx: 0x4b4d_564b, // "KVMK"
            ecx: 0x564b_4d56, // "VMKV"
            edx: 0x4d,        // "M"
            ..entry(0x4000_0000, 0)
        };
        let mut entries = vec![
            kvm_cpuid_entry2 {
                edx: LEAF1_EDX_HTT,
                ..entry(1, 0)
            },
            sig,
        ];
        normalize(&mut entries, 0, 1);
        assert_eq!(entries[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(entries[1], sig);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
