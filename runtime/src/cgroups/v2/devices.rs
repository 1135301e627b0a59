//! v2 device access control. cgroup v2 has no `devices.allow` file: access to device nodes
//! is decided by an eBPF program of type `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the
//! cgroup. [`program`] compiles the rule list into such a program; [`attach`] loads it and
//! swaps it for whatever device program was attached before (as runc and youki do).
//!
//! The program sees `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`
//! with `access_type = (access << 16) | type` and returns 1 to allow, 0 to deny. Rules are
//! checked from the last to the first and the first match decides, which gives "a later rule
//! overrides an earlier one". An allow rule matches when every requested access bit is in
//! the rule (as the v1 kernel does); a deny rule matches when any requested bit is.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use crate::cgroups::{
    devices::{DeviceKind, DeviceRule, ACCESS_ALL},
    CgroupError,
};

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BpfInsn {
    pub code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one (little-endian bitfields).
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x01 | 0x60; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_AND_K: u8 = 0x07 | 0x50;
const ALU64_RSH_K: u8 = 0x07 | 0x70;
const ALU64_MOV_K: u8 = 0x07 | 0xb0;
const ALU64_MOV_X: u8 = 0x07 | 0xb0 | 0x08;
const JMP_JEQ_K: u8 = 0x05 | 0x10;
const JMP_JNE_K: u8 = 0x05 | 0x50;
const JMP_EXIT: u8 = 0x05 | 0x90;

// Registers: r1 = ctx on entry; we keep type in r2, access in r3, major in r4, minor in r5
// and use r6 as scratch; r0 is the return value.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;

const DEVCG_DEV_BLOCK: i32 = 1;
const DEVCG_DEV_CHAR: i32 = 2;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (dst & 0x0f) | (src << 4),
        off,
        imm,
    }
}

/// A conditional jump to the end of the current rule block; the offset is patched once the
/// block is complete.
const SKIP_RULE: i16 = i16::MIN;

fn rule_block(rule: &DeviceRule) -> Vec<BpfInsn> {
    let mut block = Vec::new();
    match rule.kind {
        DeviceKind::All => {}
        DeviceKind::Char => block.push(insn(JMP_JNE_K, R2, 0, SKIP_RULE, DEVCG_DEV_CHAR)),
        DeviceKind::Block => block.push(insn(JMP_JNE_K, R2, 0, SKIP_RULE, DEVCG_DEV_BLOCK)),
    }
    if rule.access != ACCESS_ALL {
        block.push(insn(ALU64_MOV_X, R6, R3, 0, 0));
        if rule.allow {
            // Requested bits outside the rule → the rule does not cover this access.
            block.push(insn(
                ALU64_AND_K,
                R6,
                0,
                0,
                i32::from(!rule.access & ACCESS_ALL),
            ));
            block.push(insn(JMP_JNE_K, R6, 0, SKIP_RULE, 0));
        } else {
            block.push(insn(ALU64_AND_K, R6, 0, 0, i32::from(rule.access)));
            block.push(insn(JMP_JEQ_K, R6, 0, SKIP_RULE, 0));
        }
    }
    // Device numbers were validated to fit in an i32 (Linux: 12-bit major, 20-bit minor).
    if let Some(major) = rule.major {
        block.push(insn(JMP_JNE_K, R4, 0, SKIP_RULE, major as i32));
    }
    if let Some(minor) = rule.minor {
        block.push(insn(JMP_JNE_K, R5, 0, SKIP_RULE, minor as i32));
    }
    block.push(insn(ALU64_MOV_K, R0, 0, 0, i32::from(rule.allow)));
    block.push(insn(JMP_EXIT, 0, 0, 0, 0));
    let len = block.len();
    for (i, ins) in block.iter_mut().enumerate() {
        if ins.off == SKIP_RULE {
            // Jump past the rest of the block: offsets count from the next instruction.
            ins.off = (len - i - 1) as i16;
        }
    }
    block
}

/// Compiles `rules` into a device program (deny when no rule matches).
pub(crate) fn program(rules: &[DeviceRule]) -> Vec<BpfInsn> {
    let mut prog = vec![
        insn(LDX_MEM_W, R2, R1, 0, 0),
        insn(ALU64_AND_K, R2, 0, 0, 0xffff),
        insn(LDX_MEM_W, R3, R1, 0, 0),
        insn(ALU64_RSH_K, R3, 0, 0, 16),
        insn(LDX_MEM_W, R4, R1, 4, 0),
        insn(LDX_MEM_W, R5, R1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        prog.extend(rule_block(rule));
        if rule.kind == DeviceKind::All
            && rule.access == ACCESS_ALL
            && rule.major.is_none()
            && rule.minor.is_none()
        {
            // Matches everything: earlier rules and the default are unreachable, and the
            // verifier rejects unreachable instructions.
            return prog;
        }
    }
    prog.push(insn(ALU64_MOV_K, R0, 0, 0, 0));
    prog.push(insn(JMP_EXIT, 0, 0, 0, 0));
    prog
}

// bpf(2) commands and constants.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Calls `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `attr` must be the attribute struct the kernel expects for `cmd`, and every pointer in it
/// must be valid for the kernel to read/write for the duration of the call.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: guaranteed by the caller; the kernel copies `size_of::<T>()` bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> OwnedFd {
    // SAFETY: `rc` is a new file descriptor returned by bpf(2), owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Loads the program; on a verifier rejection the error carries the verifier log.
fn load(prog: &[BpfInsn]) -> Result<OwnedFd, CgroupError> {
    let license = c"Apache-2.0";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    attr.prog_name[..9].copy_from_slice(b"palisade\0");
    // SAFETY: `attr` is a BPF_PROG_LOAD attribute; `insns`/`license` point to live memory.
    match unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => Ok(fd_from(fd)),
        Err(first) => {
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            // SAFETY: as above; `log_buf` is writable for `log_size` bytes.
            let _ = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) };
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
            Err(CgroupError::Bpf {
                op: "BPF_PROG_LOAD",
                source: if text.is_empty() {
                    first
                } else {
                    io::Error::new(first.kind(), format!("{first}; verifier: {text}"))
                },
            })
        }
    }
}

/// Ids of the device programs attached to the cgroup `dir` itself.
fn attached(cgroup: &File) -> Result<Vec<u32>, CgroupError> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: BPF_PROG_QUERY attribute; `prog_ids` is writable for `prog_cnt` u32s.
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr) }.map_err(|source| CgroupError::Bpf {
        op: "BPF_PROG_QUERY",
        source,
    })?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// Replaces the cgroup's device program(s) with one compiled from `rules`. The new program
/// is attached before the old ones are detached, so there is no moment without a filter.
pub(crate) fn attach(dir: &Path, rules: &[DeviceRule]) -> Result<(), CgroupError> {
    let cgroup = File::open(dir).map_err(|source| CgroupError::Io {
        context: format!("open {}", dir.display()),
        source,
    })?;
    let old = attached(&cgroup)?;
    let prog = load(&program(rules))?;
    let mut attr = AttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    // SAFETY: BPF_PROG_ATTACH attribute with two live fds.
    unsafe { sys_bpf(BPF_PROG_ATTACH, &mut attr) }.map_err(|source| CgroupError::Bpf {
        op: "BPF_PROG_ATTACH",
        source,
    })?;
    for id in old {
        let mut get = GetFdByIdAttr {
            prog_id: id,
            ..Default::default()
        };
        // SAFETY: BPF_PROG_GET_FD_BY_ID attribute, no pointers.
        let old_fd = match unsafe { sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut get) } {
            Ok(fd) => fd_from(fd),
            // Detached concurrently.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(source) => {
                return Err(CgroupError::Bpf {
                    op: "BPF_PROG_GET_FD_BY_ID",
                    source,
                })
            }
        };
        let mut detach = AttachAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: old_fd.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_DEVICE,
            ..Default::default()
        };
        // SAFETY: BPF_PROG_DETACH attribute with two live fds.
        unsafe { sys_bpf(BPF_PROG_DETACH, &mut detach) }.map_err(|source| CgroupError::Bpf {
            op: "BPF_PROG_DETACH",
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::devices::{effective_rules, ACCESS_READ};

    /// Interprets the subset of eBPF the generator emits, to check the program's decisions
    /// without loading it.
    fn run(prog: &[BpfInsn], kind: i32, access: u8, major: u32, minor: u32) -> u64 {
        let ctx = [((access as u32) << 16) | kind as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let imm = i.imm as i64 as u64;
            let mut next = pc + 1;
            match i.code {
                LDX_MEM_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                ALU64_AND_K => r[dst] &= imm,
                ALU64_RSH_K => r[dst] >>= imm,
                ALU64_MOV_K => r[dst] = imm,
                ALU64_MOV_X => r[dst] = r[src],
                JMP_JNE_K if r[dst] != imm => next = pc + 1 + i.off as usize,
                JMP_JEQ_K if r[dst] == imm => next = pc + 1 + i.off as usize,
                JMP_JNE_K | JMP_JEQ_K => {}
                JMP_EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc = next;
        }
    }

    const RW: u8 = 2 | 4;

    #[test]
    fn default_rules_allow_null_and_deny_the_rest() {
        let prog = program(&effective_rules(&[]).unwrap());
        assert_eq!(run(&prog, DEVCG_DEV_CHAR, RW, 1, 3), 1, "/dev/null rw");
        assert_eq!(run(&prog, DEVCG_DEV_CHAR, RW, 136, 7), 1, "/dev/pts/7");
        assert_eq!(run(&prog, DEVCG_DEV_BLOCK, RW, 8, 0), 0, "/dev/sda");
        assert_eq!(run(&prog, DEVCG_DEV_BLOCK, 1, 8, 0), 1, "mknod sda");
        assert_eq!(run(&prog, DEVCG_DEV_CHAR, RW, 10, 200), 0, "/dev/net/tun");
    }

    #[test]
    fn later_rules_override_and_partial_deny_blocks_partial_access() {
        let mut rules = effective_rules(&[]).unwrap();
        // Allow all of block major 8, then deny writes to 8:0.
        rules.push(DeviceRule {
            allow: true,
            kind: DeviceKind::Block,
            major: Some(8),
            minor: None,
            access: ACCESS_ALL,
        });
        rules.push(DeviceRule {
            allow: false,
            kind: DeviceKind::Block,
            major: Some(8),
            minor: Some(0),
            access: 4,
        });
        let prog = program(&rules);
        assert_eq!(run(&prog, DEVCG_DEV_BLOCK, ACCESS_READ, 8, 0), 1);
        assert_eq!(run(&prog, DEVCG_DEV_BLOCK, RW, 8, 0), 0);
        assert_eq!(run(&prog, DEVCG_DEV_BLOCK, RW, 8, 16), 1);
    }

    /// Forks a child, moves it into `dir`, and has it open /dev/kmsg (c 1:11, not a default
    /// device) and /dev/null; returns its exit code: 0 both opened, else the kmsg errno (or
    /// 100 when /dev/null failed).
    fn open_kmsg_in(dir: &Path) -> i32 {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a writable array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child makes only raw syscalls before _exit (the harness is threaded).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: raw syscalls on literals and locals; _exit never returns.
            unsafe {
                let mut b = 0u8;
                libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                let code = if libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) < 0 {
                    100
                } else if libc::open(c"/dev/kmsg".as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) < 0 {
                    *libc::__errno_location()
                } else {
                    0
                };
                libc::_exit(code);
            }
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        let mut status = 0;
        // SAFETY: plain syscalls on our pipe and child.
        unsafe {
            libc::write(fds[1], b"x".as_ptr().cast(), 1);
            libc::close(fds[0]);
            libc::close(fds[1]);
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        }
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// Loads and attaches real programs. Needs root and a cgroup2 mount (v2 or hybrid host;
    /// CI hosts are hybrid, where this uses the cgroup2 hierarchy at /sys/fs/cgroup/unified).
    #[test]
    fn attached_program_is_enforced_and_replaced() {
        let mounts = crate::cgroups::mountinfo::Mounts::read().unwrap();
        let v2 = mounts.v2.expect("a cgroup2 mount");
        let dir = v2
            .mount_point
            .join(format!("palisade-bpf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let result = std::panic::catch_unwind(|| {
            let defaults = effective_rules(&[]).unwrap();
            attach(&dir, &defaults).unwrap();
            assert_eq!(open_kmsg_in(&dir), libc::EPERM, "kmsg denied, null allowed");

            let mut with_kmsg = defaults.clone();
            with_kmsg.push(DeviceRule {
                allow: true,
                kind: DeviceKind::Char,
                major: Some(1),
                minor: Some(11),
                access: ACCESS_READ,
            });
            attach(&dir, &with_kmsg).unwrap();
            let cgroup = File::open(&dir).unwrap();
            assert_eq!(attached(&cgroup).unwrap().len(), 1, "old program detached");
            assert_eq!(open_kmsg_in(&dir), 0, "kmsg allowed after the update");
        });
        std::fs::remove_dir(&dir).unwrap();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
