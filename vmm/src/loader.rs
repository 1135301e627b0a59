//! Loading the guest kernel, initrd and command line, and writing the boot parameters.
//!
//! Kernel formats (all through `linux-loader`):
//! - ELF `vmlinux` with a PVH note: entered at the PVH entry in 32-bit mode with an
//!   `hvm_start_info` (preferred: no decompressor, no real-mode setup code);
//! - ELF without a PVH note: entered at `e_entry` in 64-bit mode with a zero page;
//! - bzImage: its protected-mode kernel is loaded at 1 MiB and entered at the 64-bit entry
//!   (`startup_64`, 0x200 into it) with a zero page built from its setup header.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{
    self, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::arch::x86_64::regs::BootEntry;
use crate::devices::MmioSlot;
use crate::memory::GuestMemoryMmap;

/// Command line used when none is configured.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("kernel image is neither a valid ELF vmlinux ({elf}) nor a bzImage ({bzimage})")]
    Kernel {
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x} (kernel ends at {kernel_end:#x})")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// End of low RAM.
        limit: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
    },
    /// Reading the initrd failed.
    #[error("cannot read the initrd: {0}")]
    Initrd(#[source] std::io::Error),
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy the initrd into guest memory: {0}")]
    InitrdCopy(#[source] vm_memory::GuestMemoryError),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line: {0}")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// Writing boot parameters failed.
    #[error("cannot write boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// How the kernel was loaded.
#[derive(Clone, Copy, Debug)]
pub enum KernelKind {
    /// PVH entry point (32-bit).
    Pvh {
        /// Guest-physical PVH entry.
        entry: u64,
    },
    /// 64-bit Linux boot protocol entry.
    Linux64 {
        /// Guest-physical 64-bit entry.
        entry: u64,
        /// bzImage setup header to copy into the zero page.
        setup_header: Option<setup_header>,
    },
}

/// A loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// How to enter it.
    pub kind: KernelKind,
    /// First guest-physical byte after the kernel image (including its BSS).
    pub end: u64,
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest-physical start.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Load `kernel` (ELF vmlinux or bzImage) at/above 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, LoadError> {
    let himem = Some(GuestAddress(HIMEM_START));
    let elf_err = match Elf::load(mem, None, kernel, himem) {
        Ok(r) => {
            let kind = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => KernelKind::Pvh { entry: entry.0 },
                _ => KernelKind::Linux64 {
                    entry: r.kernel_load.0,
                    setup_header: None,
                },
            };
            return Ok(LoadedKernel {
                kind,
                end: r.kernel_end,
            });
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, kernel, himem) {
        Ok(r) => Ok(LoadedKernel {
            kind: KernelKind::Linux64 {
                // startup_64 sits 0x200 bytes into the protected-mode kernel.
                entry: r.kernel_load.0 + 0x200,
                setup_header: r.setup_header,
            },
            end: r.kernel_end,
        }),
        Err(bzimage) => Err(LoadError::Kernel {
            elf: elf_err,
            bzimage,
        }),
    }
}

/// Copy `initrd` to the top of low memory (page aligned), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    regions: &[(GuestAddress, u64)],
    kernel_end: u64,
    initrd: &mut File,
) -> Result<InitrdRegion, LoadError> {
    let size = initrd.seek(SeekFrom::End(0)).map_err(LoadError::Initrd)?;
    initrd.rewind().map_err(LoadError::Initrd)?;
    let limit = layout::low_ram_end(regions);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(LoadError::InitrdTooLarge {
            size,
            limit,
            kernel_end,
        })?;
    let len = usize::try_from(size).map_err(|_| LoadError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(LoadError::InitrdCopy)?;
    Ok(InitrdRegion { addr, size })
}

/// The kernel command line: `base` followed by one `virtio_mmio.device=` entry per slot.
pub fn build_cmdline(base: &str, slots: &[MmioSlot]) -> Result<Cmdline, LoadError> {
    // The kernel parses the command line as printable ASCII; anything else is a mistake.
    if !base.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(LoadError::Cmdline(
            linux_loader::cmdline::Error::InvalidAscii,
        ));
    }
    let mut cmdline = Cmdline::try_from(base, CMDLINE_MAX_SIZE).map_err(LoadError::Cmdline)?;
    for slot in slots {
        cmdline
            .add_virtio_mmio_device(slot.size, GuestAddress(slot.base), slot.gsi, None)
            .map_err(LoadError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Write the command line and the boot parameters for `kernel`; returns how to enter it.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    regions: &[(GuestAddress, u64)],
    kernel: &LoadedKernel,
    initrd: Option<InitrdRegion>,
    cmdline: &Cmdline,
) -> Result<BootEntry, LoadError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(LoadError::CmdlineWrite)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(LoadError::Cmdline)?
        .as_bytes()
        .len();
    let map = layout::memory_map(regions);
    match kernel.kind {
        KernelKind::Pvh { entry } => {
            let memmap: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind,
                    reserved: 0,
                })
                .collect();
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: memmap.len() as u32,
                ..Default::default()
            };
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            if let Some(initrd) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
                let module = hvm_modlist_entry {
                    paddr: initrd.addr,
                    size: initrd.size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(LoadError::BootParams)?;
            Ok(BootEntry::Pvh {
                entry,
                start_info: PVH_INFO_START,
            })
        }
        KernelKind::Linux64 {
            entry,
            setup_header,
        } => {
            let mut zero_page = boot_params::default();
            if let Some(hdr) = setup_header {
                zero_page.hdr = hdr;
            }
            zero_page.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            zero_page.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            zero_page.hdr.header = KERNEL_HDR_MAGIC;
            zero_page.hdr.cmd_line_ptr = CMDLINE_START as u32;
            zero_page.hdr.cmdline_size = cmdline_len as u32;
            zero_page.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some(initrd) = initrd {
                zero_page.hdr.ramdisk_image = initrd.addr as u32;
                zero_page.hdr.ramdisk_size = initrd.size as u32;
            }
            for (slot, e) in zero_page.e820_table.iter_mut().zip(&map) {
                *slot = boot_e820_entry {
                    addr: e.addr,
                    size: e.size,
                    r#type: e.kind,
                };
            }
            zero_page.e820_entries = map.len().min(zero_page.e820_table.len()) as u8;
            let params = BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem).map_err(LoadError::BootParams)?;
            Ok(BootEntry::Linux64 {
                entry,
                zero_page: ZERO_PAGE_START,
            })
        }
    }
}

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `type_of_loader`: "undefined" boot loader id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;
    use std::io::Write;
    use vm_memory::GuestMemoryBackend;

    /// A minimal ELF64 executable: one PT_LOAD of `code` at `load`, entry at `load`,
    /// optionally a PVH note pointing at `pvh_entry`.
    pub(crate) fn tiny_elf(code: &[u8], load: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        crate::testing::tiny_elf(code, load, pvh_entry)
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn cmdline_gets_virtio_entries() {
        let slots = [
            MmioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            MmioSlot {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        let c = build_cmdline(DEFAULT_CMDLINE, &slots).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k panic=1 pci=off \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        // Same syntax as our own slot formatting.
        assert!(c
            .as_cstring()
            .unwrap()
            .to_str()
            .unwrap()
            .contains(&slots[1].cmdline_entry()));
    }

    #[test]
    fn cmdline_errors() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(LoadError::Cmdline(_))
        ));
        assert!(matches!(
            build_cmdline("bad\u{7}char", &[]),
            Err(LoadError::Cmdline(_))
        ));
    }

    #[test]
    fn elf_without_pvh_note_boots_64bit_with_zero_page() {
        let (mem, regions) = memory::create(32 << 20).unwrap();
        let mut f = file_with(&tiny_elf(&[0xf4], HIMEM_START, None));
        let k = load_kernel(&mem, &mut f).unwrap();
        assert!(matches!(k.kind, KernelKind::Linux64 { entry, .. } if entry == HIMEM_START));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIMEM_START)).unwrap(), 0xf4);
        let mut initrd = file_with(&[7u8; 5000]);
        let rd = load_initrd(&mem, &regions, k.end, &mut initrd).unwrap();
        assert_eq!(rd.addr % 4096, 0);
        assert!(rd.addr + rd.size <= 32 << 20);
        let cmdline = build_cmdline("console=ttyS0", &[]).unwrap();
        let entry = write_boot_params(&mem, &regions, &k, Some(rd), &cmdline).unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: HIMEM_START,
                zero_page: ZERO_PAGE_START
            }
        );
        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ zp.hdr.ramdisk_image } as u64, rd.addr);
        assert_eq!({ zp.hdr.cmdline_size }, 13);
        assert_eq!(zp.e820_entries, 2);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn elf_with_pvh_note_gets_start_info() {
        let (mem, regions) = memory::create(32 << 20).unwrap();
        let mut f = file_with(&tiny_elf(&[0xf4], HIMEM_START, Some(0x10_0000)));
        let k = load_kernel(&mem, &mut f).unwrap();
        assert!(matches!(k.kind, KernelKind::Pvh { entry: 0x10_0000 }));
        let mut initrd = file_with(&[1u8; 100]);
        let rd = load_initrd(&mem, &regions, k.end, &mut initrd).unwrap();
        let cmdline = build_cmdline(DEFAULT_CMDLINE, &[]).unwrap();
        let entry = write_boot_params(&mem, &regions, &k, Some(rd), &cmdline).unwrap();
        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: 0x10_0000,
                start_info: PVH_INFO_START
            }
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!((info.nr_modules, info.memmap_entries), (1, 2));
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (rd.addr, 100));
        let e1: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e1.addr, e1.size), (HIMEM_START, (32 << 20) - HIMEM_START));
    }

    #[test]
    fn garbage_kernel_and_huge_initrd_are_rejected() {
        let (mem, regions) = memory::create(16 << 20).unwrap();
        let mut f = file_with(b"this is not a kernel at all, not even close................");
        assert!(matches!(
            load_kernel(&mem, &mut f),
            Err(LoadError::Kernel { .. })
        ));
        let mut big = tempfile::tempfile().unwrap();
        big.set_len(32 << 20).unwrap();
        assert!(matches!(
            load_initrd(&mem, &regions, 2 << 20, &mut big),
            Err(LoadError::InitrdTooLarge { .. })
        ));
        // Below the kernel end is refused too.
        let mut small = file_with(&[0u8; 4096]);
        assert!(matches!(
            load_initrd(&mem, &regions, 16 << 20, &mut small),
            Err(LoadError::InitrdTooLarge { .. })
        ));
    }
}
