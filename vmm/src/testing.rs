//! Tiny guests for the KVM smoke tests and the start-up benchmark: an ELF64 builder and
//! hand-assembled 64-bit programs. They are booted exactly like a kernel (an ELF without a
//! PVH note enters in 64-bit mode at `e_entry`), so they exercise the real load path,
//! vCPU setup, run loop and buses. They end by pulsing the i8042 reset line, because with
//! an in-kernel irqchip `hlt` never leaves KVM.

use crate::arch::x86_64::layout::HIMEM_START;

pub mod tap;

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

/// Guest-physical address of the flood guest's transmit ring (descriptors; the available
/// ring follows at +0x1000, the used ring at +0x2000).
pub const FLOOD_TX_RING: u64 = 0x20_0000;
/// Length of the flood guest's well-formed frames (12-byte virtio-net header + 60 bytes).
pub const FLOOD_FRAME_LEN: usize = 72;
/// EtherType of the flood guest's frames (IEEE local experimental).
pub const FLOOD_ETHERTYPE: u16 = 0x88b5;

/// A hostile virtio-net driver for the device at `mmio_base`: it brings the device up
/// (VERSION_1 only, an empty receive queue at 0x210000, a 256-entry transmit queue at
/// [`FLOOD_TX_RING`]) whose descriptors alternate between a broadcast frame of
/// [`FLOOD_ETHERTYPE`] ([`FLOOD_FRAME_LEN`] bytes at 0x300000) and a 4-byte chain too short
/// for the virtio-net header. Then, without pause: make the whole ring available again
/// (`avail.idx = used.idx + 256`), notify the transmit queue and poll COM1 — until a byte
/// arrives on COM1, which it echoes followed by "\n" before resetting. The device event
/// loop must still deliver that byte (serial input is served on the same thread) while
/// the flood runs.
pub fn net_flood_guest(mmio_base: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xbb]; // movabs rbx, mmio_base
    code.extend_from_slice(&mmio_base.to_le_bytes());
    // Assembled with GNU as (intel syntax); one instruction per line.
    #[rustfmt::skip]
    const BODY: &[u8] = &[
        0xbf, 0x00, 0x00, 0x30, 0x00, // mov edi,0x300000
        0xc7, 0x47, 0x0c, 0xff, 0xff, 0xff, 0xff, // mov dword [rdi+0xc],0xffffffff
        0x66, 0xc7, 0x47, 0x10, 0xff, 0xff, // mov word [rdi+0x10],0xffff
        0xc7, 0x47, 0x12, 0x02, 0x00, 0x00, 0x00, // mov dword [rdi+0x12],0x2
        0x66, 0xc7, 0x47, 0x16, 0x00, 0x01, // mov word [rdi+0x16],0x100
        0x66, 0xc7, 0x47, 0x18, 0x88, 0xb5, // mov word [rdi+0x18],0xb588
        0xbf, 0x00, 0x00, 0x20, 0x00, // mov edi,0x200000
        0x31, 0xc9, // xor ecx,ecx
        0x48, 0xc7, 0x07, 0x00, 0x00, 0x30, 0x00, // mov qword [rdi],0x300000
        0xb8, 0x48, 0x00, 0x00, 0x00, // mov eax,0x48
        0xf7, 0xc1, 0x01, 0x00, 0x00, 0x00, // test ecx,0x1
        0x74, 0x05, // je .+5 (even index: a whole frame)
        0xb8, 0x04, 0x00, 0x00, 0x00, // mov eax,0x4
        0x89, 0x47, 0x08, // mov dword [rdi+0x8],eax
        0xc7, 0x47, 0x0c, 0x00, 0x00, 0x00, 0x00, // mov dword [rdi+0xc],0x0
        0x48, 0x83, 0xc7, 0x10, // add rdi,0x10
        0x66, 0x89, 0x0c, 0x4d, 0x04, 0x10, 0x20, 0x00, // mov word [rcx*2+0x201004],cx (avail ring[i] = i)
        0xff, 0xc1, // inc ecx
        0x81, 0xf9, 0x00, 0x01, 0x00, 0x00, // cmp ecx,0x100
        0x75, 0xc7, // jne descriptor loop
        0xc7, 0x43, 0x70, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+0x70],0x1
        0xc7, 0x43, 0x70, 0x03, 0x00, 0x00, 0x00, // mov dword [rbx+0x70],0x3
        0xc7, 0x43, 0x24, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+0x24],0x1
        0xc7, 0x43, 0x20, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+0x20],0x1
        0xc7, 0x43, 0x24, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0x24],0x0
        0xc7, 0x43, 0x20, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0x20],0x0
        0xc7, 0x43, 0x70, 0x0b, 0x00, 0x00, 0x00, // mov dword [rbx+0x70],0xb
        0xc7, 0x43, 0x30, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0x30],0x0
        0xc7, 0x43, 0x38, 0x00, 0x01, 0x00, 0x00, // mov dword [rbx+0x38],0x100
        0xc7, 0x83, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x21, 0x00, // mov dword [rbx+0x80],0x210000
        0xc7, 0x83, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0x84],0x0
        0xc7, 0x83, 0x90, 0x00, 0x00, 0x00, 0x00, 0x10, 0x21, 0x00, // mov dword [rbx+0x90],0x211000
        0xc7, 0x83, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0x94],0x0
        0xc7, 0x83, 0xa0, 0x00, 0x00, 0x00, 0x00, 0x20, 0x21, 0x00, // mov dword [rbx+0xa0],0x212000
        0xc7, 0x83, 0xa4, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0xa4],0x0
        0xc7, 0x43, 0x44, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+0x44],0x1
        0xc7, 0x43, 0x30, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+0x30],0x1
        0xc7, 0x43, 0x38, 0x00, 0x01, 0x00, 0x00, // mov dword [rbx+0x38],0x100
        0xc7, 0x83, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, // mov dword [rbx+0x80],0x200000
        0xc7, 0x83, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0x84],0x0
        0xc7, 0x83, 0x90, 0x00, 0x00, 0x00, 0x00, 0x10, 0x20, 0x00, // mov dword [rbx+0x90],0x201000
        0xc7, 0x83, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0x94],0x0
        0xc7, 0x83, 0xa0, 0x00, 0x00, 0x00, 0x00, 0x20, 0x20, 0x00, // mov dword [rbx+0xa0],0x202000
        0xc7, 0x83, 0xa4, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [rbx+0xa4],0x0
        0xc7, 0x43, 0x44, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+0x44],0x1
        0xc7, 0x43, 0x70, 0x0f, 0x00, 0x00, 0x00, // mov dword [rbx+0x70],0xf
        // flood:
        0x0f, 0xb7, 0x04, 0x25, 0x02, 0x20, 0x20, 0x00, // movzx eax,word [0x202002] (used idx)
        0x05, 0x00, 0x01, 0x00, 0x00, // add eax,0x100
        0x66, 0x89, 0x04, 0x25, 0x02, 0x10, 0x20, 0x00, // mov word [0x201002],ax (avail idx)
        0xc7, 0x43, 0x50, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+0x50],0x1
        0x66, 0xba, 0xfd, 0x03, // mov dx,0x3fd
        0xec, // in al,dx
        0xa8, 0x01, // test al,0x1
        0x74, 0xdb, // je flood
        0x66, 0xba, 0xf8, 0x03, // mov dx,0x3f8
        0xec, // in al,dx
        0xee, // out dx,al
        0xb0, 0x0a, // mov al,0xa
        0xee, // out dx,al
    ];
    code.extend_from_slice(BODY);
    code.extend_from_slice(&RESET_AND_PARK);
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
