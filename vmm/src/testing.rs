//! Tiny guests for the KVM smoke tests and the start-up benchmark: an ELF64 builder and
//! hand-assembled 64-bit programs. They are booted exactly like a kernel (an ELF without a
//! PVH note enters in 64-bit mode at `e_entry`), so they exercise the real load path,
//! vCPU setup, run loop and buses. They end by pulsing the i8042 reset line, because with
//! an in-kernel irqchip `hlt` never leaves KVM.

use crate::arch::x86_64::layout::HIMEM_START;

/// Where tiny guests are loaded and entered.
pub const TINY_GUEST_LOAD: u64 = HIMEM_START;

/// `out 0x64, 0xfe` (i8042 "pulse reset line"), then `hlt; jmp .-1` in case the VMM
/// lets the vCPU run on.
const RESET_AND_PARK: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes "OK\n" to COM1 and resets.
pub fn serial_ok_guest() -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    ];
    code.extend_from_slice(&RESET_AND_PARK);
    code
}

/// Reads the 32-bit registers at `mmio_base + 0, 4, 8` (virtio-mmio MagicValue, Version,
/// DeviceID), writes their 12 little-endian bytes to COM1, and resets.
pub fn virtio_probe_guest(mmio_base: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xbb]; // movabs rbx, imm64 (a 32-bit displacement would sign-extend)
    code.extend_from_slice(&mmio_base.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb9, 0x03, 0x00, 0x00, 0x00, // mov ecx, 3
        // loop:
        0x8b, 0x03, // mov eax, [rbx]
        0xee, // out dx, al
        0xc1, 0xe8, 0x08, 0xee, // shr eax, 8; out dx, al
        0xc1, 0xe8, 0x08, 0xee, // shr eax, 8; out dx, al
        0xc1, 0xe8, 0x08, 0xee, // shr eax, 8; out dx, al
        0x48, 0x83, 0xc3, 0x04, // add rbx, 4
        0xff, 0xc9, // dec ecx
        0x75, 0xe9, // jnz loop (-23)
    ]);
    code.extend_from_slice(&RESET_AND_PARK);
    code
}

/// Polls COM1's line status until a byte arrives, echoes it followed by "\n", and resets.
pub fn serial_echo_guest() -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (line status)
        0xec, // poll: in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz poll
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx (receive buffer)
        0xee, // out dx, al (echo)
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    ];
    code.extend_from_slice(&RESET_AND_PARK);
    code
}

/// Pokes everything it can reach, then prints "OK\n" and resets: for each port below
/// 0x1000 a byte read, a zero byte write (harmless for the reset ports: 0x64 needs 0xfe,
/// 0xcf9 needs bit 2), 16- and 32-bit reads and a 32-bit write of what was read; then for
/// each 32-bit word of the first two virtio-mmio windows, writes its inverted value back.
pub fn hostile_guest(mmio_base: u64) -> Vec<u8> {
    let mut code = vec![
        0x31, 0xc9, // xor ecx, ecx
        // ports:
        0x89, 0xca, // mov edx, ecx
        0xec, // in al, dx
        0xb0, 0x00, // mov al, 0
        0xee, // out dx, al
        0x66, 0xed, // in ax, dx
        0xed, // in eax, dx
        0xef, // out dx, eax
        0xff, 0xc1, // inc ecx
        0x81, 0xf9, 0x00, 0x10, 0x00, 0x00, // cmp ecx, 0x1000
        0x75, 0xec, // jne ports (-20)
        0x48, 0xbb, // movabs rbx, mmio_base
    ];
    code.extend_from_slice(&mmio_base.to_le_bytes());
    code.extend_from_slice(&[
        0xb9, 0x00, 0x08, 0x00, 0x00, // mov ecx, 0x800 (two 4 KiB windows)
        // words:
        0x8b, 0x03, // mov eax, [rbx]
        0xf7, 0xd0, // not eax
        0x89, 0x03, // mov [rbx], eax
        0x48, 0x83, 0xc3, 0x04, // add rbx, 4
        0xff, 0xc9, // dec ecx
        0x75, 0xf2, // jnz words (-14)
    ]);
    code.extend_from_slice(&serial_ok_guest());
    code
}

/// Executes `ud2` with no usable IDT: #UD -> #GP -> #DF -> triple fault.
pub fn triple_fault_guest() -> Vec<u8> {
    vec![0x0f, 0x0b]
}

/// Never ends on its own: `jmp .` (for pause/resume/shutdown tests).
pub fn spin_guest() -> Vec<u8> {
    let mut code = serial_ok_guest();
    let reset = code.len() - RESET_AND_PARK.len();
    code.truncate(reset);
    code.extend_from_slice(&[0xeb, 0xfe]);
    code
}

/// A minimal ELF64 executable: one `PT_LOAD` of `code` at `load` with entry `load`, and,
/// if `pvh_entry` is given, a `PT_NOTE` with the Xen PVH entry note.
pub fn tiny_elf(code: &[u8], load: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum: usize = if pvh_entry.is_some() { 2 } else { 1 };
    let note_off = EHDR + PHDR * phnum;
    let note: Vec<u8> = match pvh_entry {
        Some(entry) => {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&entry.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let code_off = (note_off + note.len()).next_multiple_of(16);

    let mut elf = Vec::with_capacity(code_off + code.len());
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&load.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(phnum as u16).to_le_bytes());
    elf.extend_from_slice(&[0; 6]); // no section headers

    let phdr = |elf: &mut Vec<u8>,
                p_type: u32,
                flags: u32,
                off: usize,
                addr: u64,
                size: usize,
                align: u64| {
        elf.extend_from_slice(&p_type.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        elf.extend_from_slice(&(off as u64).to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes()); // vaddr
        elf.extend_from_slice(&addr.to_le_bytes()); // paddr
        elf.extend_from_slice(&(size as u64).to_le_bytes()); // filesz
        elf.extend_from_slice(&(size as u64).to_le_bytes()); // memsz
        elf.extend_from_slice(&align.to_le_bytes());
    };
    phdr(&mut elf, 1, 5, code_off, load, code.len(), 16); // PT_LOAD, R+X
    if pvh_entry.is_some() {
        // Notes are 4-byte aligned; loaders such as QEMU's pad name/desc to p_align.
        phdr(&mut elf, 4, 4, note_off, 0, note.len(), 4); // PT_NOTE, R
    }
    elf.extend_from_slice(&note);
    elf.resize(code_off, 0);
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_loop_branch_targets_loop_start() {
        let code = virtio_probe_guest(0xd000_0000);
        // movabs (10) + mov dx (4) + mov ecx (5) = loop start at 19; jnz ends at 19 + 23.
        let jnz = 19 + 21;
        assert_eq!(code[jnz], 0x75);
        assert_eq!((jnz as i64 + 2) + (code[jnz + 1] as i8 as i64), 19);
        assert_eq!(&code[2..10], &0xd000_0000u64.to_le_bytes());
    }

    #[test]
    fn hostile_guest_branches() {
        let code = hostile_guest(0xd000_0000);
        // Port loop: starts at 2, jne at 20..22.
        assert_eq!(code[20], 0x75);
        assert_eq!(22 + (code[21] as i8 as i64), 2);
        // MMIO loop: movabs at 22..32, mov ecx 32..37, loop at 37, jnz at 49..51.
        assert_eq!(code[49], 0x75);
        assert_eq!(51 + (code[50] as i8 as i64), 37);
    }

    #[test]
    fn elf_layout() {
        let elf = tiny_elf(&[0x90, 0xf4], 0x10_0000, Some(0x10_0000));
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([elf[56], elf[57]]), 2, "phnum");
        assert_eq!(&elf[elf.len() - 2..], &[0x90, 0xf4]);
    }
}
