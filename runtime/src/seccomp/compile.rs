//! The profile compiler.
//!
//! seccompiler's model is one filter = one "match" action and one "mismatch" action, with
//! per-syscall rule chains (rules ORed, conditions inside a rule ANDed). An OCI profile has
//! an action per rule, so the profile is split into one group per distinct action, each
//! group compiled by seccompiler with a private sentinel as its mismatch action, and the
//! groups are chained: in group *n*, every `RET sentinel` becomes a jump to group *n+1*, and
//! the last group falls through to `RET defaultAction`. Groups are ordered by severity, so a
//! call matched by rules of several actions gets the most severe one.
//!
//! ```text
//! [arch == native, else KILL_PROCESS]
//! [x86_64: nr >= 0x40000000 (x32 ABI) and nr != -1 → KILL_PROCESS]
//! [group KILL_PROCESS: LD nr; per syscall chains … RET KILL_PROCESS | JA next]
//! [group ERRNO(1) …]
//! [group ALLOW …]
//! [default not ALLOW/LOG: nr > highest syscall the profile names → ERRNO(ENOSYS)]
//! RET defaultAction
//! ```

use std::collections::BTreeMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde_json::Value;

use super::{syscalls, CompiledFilter, SeccompError};

// Classic BPF opcodes (linux/bpf_common.h).
/// BPF_LD | BPF_W | BPF_ABS (the first two are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGT_K: u16 = 0x05 | 0x20;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// The kernel's limit on a classic BPF program (BPF_MAXINSNS).
const BPF_MAX_LEN: usize = 4096;
/// Instructions seccompiler puts in front of every program to check `seccomp_data.arch`.
const ARCH_CHECK_LEN: usize = 3;
/// `__X32_SYSCALL_BIT`.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The largest errno the kernel passes through (MAX_ERRNO).
const MAX_ERRNO: u32 = 4095;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn native_arch() -> Result<(TargetArch, Arch), SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok((TargetArch::x86_64, Arch::ScmpArchX86_64)),
        "aarch64" => Ok((TargetArch::aarch64, Arch::ScmpArchAarch64)),
        "riscv64" => Ok((TargetArch::riscv64, Arch::ScmpArchRiscv64)),
        other => Err(SeccompError::Unsupported(format!(
            "seccomp on architecture {other}"
        ))),
    }
}

/// Maps an OCI action (+ errnoRet) to seccompiler's; `field` names it in errors.
fn action(
    a: LinuxSeccompAction,
    errno_ret: Option<u32>,
    field: &str,
) -> Result<SeccompAction, SeccompError> {
    let data = |max: u32| -> Result<u32, SeccompError> {
        let v = errno_ret.unwrap_or(libc::EPERM as u32);
        if v > max {
            return Err(SeccompError::Invalid {
                field: field
                    .replace("action", "errnoRet")
                    .replace("defaultAction", "defaultErrnoRet"),
                msg: format!("{v} is out of range 0..={max}"),
            });
        }
        Ok(v)
    };
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(data(MAX_ERRNO)?),
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(data(u32::from(u16::MAX))?),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Unsupported(format!(
                "SCMP_ACT_NOTIFY (seccomp user notification, {field})"
            )))
        }
    })
}

/// Severity rank: lower is more severe (kernel precedence between filters).
fn rank(a: &SeccompAction) -> u8 {
    match a {
        SeccompAction::KillProcess => 0,
        SeccompAction::KillThread => 1,
        SeccompAction::Trap => 2,
        SeccompAction::Errno(_) => 3,
        SeccompAction::Trace(_) => 4,
        SeccompAction::Log => 5,
        SeccompAction::Allow => 6,
    }
}

/// Rules of one action: syscall number → `None` (unconditional) or ORed argument rules.
type Group = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn flags_of(s: &LinuxSeccomp) -> libc::c_ulong {
    let mut flags: libc::c_ulong = 0;
    for f in s.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                // Only meaningful with a notification listener, which is not supported; the
                // kernel rejects it without one.
                tracing::warn!(
                    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV ignored (no SCMP_ACT_NOTIFY)"
                );
                0
            }
        };
    }
    flags
}

fn condition(
    field: &str,
    arg: &oci_spec::runtime::LinuxSeccompArg,
) -> Result<SeccompCondition, SeccompError> {
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|i| *i <= 5)
        .ok_or_else(|| SeccompError::Invalid {
            field: format!("{field}.index"),
            msg: format!("{} is not a syscall argument index (0..=5)", arg.index()),
        })?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        // libseccomp: (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    // libseccomp compares all 64 bits.
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SeccompError::Compile(format!("{field}: {e}")))
}

/// Compiles `linux.seccomp` for the native architecture.
pub fn compile(s: &LinuxSeccomp) -> Result<CompiledFilter, SeccompError> {
    let (target, native) = native_arch()?;
    if let Some(archs) = s.architectures().as_ref().filter(|a| !a.is_empty()) {
        if !archs
            .iter()
            .any(|a| *a == native || *a == Arch::ScmpArchNative)
        {
            return Err(SeccompError::Invalid {
                field: "linux.seccomp.architectures".into(),
                msg: format!(
                    "none of {archs:?} is this machine's architecture ({})",
                    std::env::consts::ARCH
                ),
            });
        }
    }
    let default = action(
        s.default_action(),
        s.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;

    // (severity, return value) → group, so ERRNO(1) and ERRNO(38) are separate groups.
    let mut groups: BTreeMap<(u8, u32), (SeccompAction, Group)> = BTreeMap::new();
    // The highest syscall number the profile names (see the ENOSYS stub below).
    let mut max_nr: Option<i64> = None;
    for (i, entry) in s.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let act = action(
            entry.action(),
            entry.errno_ret(),
            &format!("{field}.action"),
        )?;
        let conditions = entry
            .args()
            .iter()
            .flatten()
            .enumerate()
            .map(|(j, arg)| condition(&format!("{field}.args[{j}]"), arg))
            .collect::<Result<Vec<_>, _>>()?;
        if act == default {
            max_nr = entry
                .names()
                .iter()
                .filter_map(|n| syscalls::number(n))
                .chain(max_nr)
                .max();
            continue;
        }
        let rule = if conditions.is_empty() {
            None
        } else {
            Some(
                SeccompRule::new(conditions)
                    .map_err(|e| SeccompError::Compile(format!("{field}: {e}")))?,
            )
        };
        let key = (rank(&act), u32::from(act.clone()));
        let group = &mut groups.entry(key).or_insert_with(|| (act, Group::new())).1;
        for name in entry.names() {
            let Some(nr) = syscalls::number(name).inspect(|nr| {
                max_nr = Some(max_nr.map_or(*nr, |m| m.max(*nr)));
            }) else {
                tracing::warn!(
                    "{field}: syscall {name:?} is unknown on {}; skipped",
                    std::env::consts::ARCH
                );
                continue;
            };
            match (group.get_mut(&nr), &rule) {
                // Already unconditional: nothing can widen it.
                (Some(None), _) => {}
                (Some(rules @ Some(_)), None) => *rules = None,
                (Some(Some(rules)), Some(r)) => rules.push(r.clone()),
                (None, r) => {
                    group.insert(nr, r.clone().map(|r| vec![r]));
                }
            }
        }
    }

    let mut program = arch_check(target, &default)?;
    if target == TargetArch::x86_64 {
        // x32 syscalls carry AUDIT_ARCH_X86_64 too, with bit 30 set in the number: they
        // would bypass every rule. -1 is what a tracer sets to skip a call; let it through.
        program.extend([
            stmt(BPF_LD_W_ABS, 0),
            jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 2),
            jump(BPF_JMP_JEQ_K, u32::MAX, 1, 0),
            stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        ]);
    }
    for (action, group) in groups.into_values().filter(|(_, g)| !g.is_empty()) {
        program.extend(compile_group(target, action, group)?);
    }
    if let (Some(max), false) = (
        max_nr,
        matches!(default, SeccompAction::Allow | SeccompAction::Log),
    ) {
        // runc's rule: a syscall newer than anything the profile knows about fails with
        // ENOSYS rather than the default errno, so that libcs fall back to older calls
        // (glibc retries clone3 as clone only on ENOSYS). -1 (a tracer's skip) is exempt.
        program.extend([
            stmt(BPF_LD_W_ABS, 0),
            jump(BPF_JMP_JEQ_K, u32::MAX, 2, 0),
            jump(BPF_JMP_JGT_K, max as u32, 0, 1),
            stmt(
                BPF_RET_K,
                u32::from(SeccompAction::Errno(libc::ENOSYS as u32)),
            ),
        ]);
    }
    program.push(stmt(BPF_RET_K, u32::from(default)));
    if program.len() > BPF_MAX_LEN {
        return Err(SeccompError::Compile(format!(
            "the profile compiles to {} BPF instructions, more than the kernel's {BPF_MAX_LEN}",
            program.len()
        )));
    }
    Ok(CompiledFilter {
        program,
        flags: flags_of(s),
    })
}

/// The architecture check seccompiler emits (arch == native, else KILL_PROCESS).
fn arch_check(
    target: TargetArch,
    default: &SeccompAction,
) -> Result<Vec<sock_filter>, SeccompError> {
    let other = if *default == SeccompAction::Allow {
        SeccompAction::Log
    } else {
        SeccompAction::Allow
    };
    let filter = SeccompFilter::new(BTreeMap::new(), default.clone(), other, target)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.to_string()))?;
    Ok(prog[..ARCH_CHECK_LEN.min(prog.len())].to_vec())
}

/// Compiles one action's rules and turns its "no match" returns into jumps past its end.
fn compile_group(
    target: TargetArch,
    action: SeccompAction,
    group: Group,
) -> Result<Vec<sock_filter>, SeccompError> {
    // A return value this group can never produce itself.
    let sentinel = [SeccompAction::Trace(0xffff), SeccompAction::Errno(0xffff)]
        .into_iter()
        .find(|s| *s != action)
        .unwrap_or(SeccompAction::Trace(0xfffe));
    let sentinel_k = u32::from(sentinel.clone());
    let rules = group
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, sentinel, action, target)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.to_string()))?;
    let mut body = prog[ARCH_CHECK_LEN..].to_vec();
    let len = body.len();
    for (i, ins) in body.iter_mut().enumerate() {
        if ins.code == BPF_RET_K && ins.k == sentinel_k {
            // Relative to the next instruction; lands on the first one after this group.
            *ins = stmt(BPF_JMP_JA, (len - i - 1) as u32);
        }
    }
    Ok(body)
}

const ACTIONS: &[&str] = &[
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_NOTIFY",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_LOG",
    "SCMP_ACT_ALLOW",
];
const OPS: &[&str] = &[
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
];
const FLAGS: &[&str] = &[
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
];

/// Checks the strings of a raw `linux.seccomp` JSON object (actions, operators,
/// architectures, flags) so that a typo is reported with its field, e.g.
/// `linux.seccomp.syscalls[3].action: unknown action "SCMP_ACT_FOO"`. Call it before
/// deserializing the spec; it does not check anything the typed compile checks.
pub fn check_json(seccomp: &Value) -> Result<(), SeccompError> {
    fn check(
        v: Option<&Value>,
        field: String,
        what: &str,
        known: &[&str],
    ) -> Result<(), SeccompError> {
        match v {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) if known.contains(&s.as_str()) => Ok(()),
            Some(Value::String(s)) => Err(SeccompError::Invalid {
                field,
                msg: format!("unknown {what} {s:?}"),
            }),
            Some(other) => Err(SeccompError::Invalid {
                field,
                msg: format!("expected a string, found {other}"),
            }),
        }
    }
    fn list<'a>(v: Option<&'a Value>, field: &str) -> Result<&'a [Value], SeccompError> {
        match v {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(SeccompError::Invalid {
                field: field.to_string(),
                msg: format!("expected an array, found {other}"),
            }),
        }
    }
    let base = "linux.seccomp";
    let Some(obj) = seccomp.as_object() else {
        return Err(SeccompError::Invalid {
            field: base.into(),
            msg: "expected an object".into(),
        });
    };
    check(
        obj.get("defaultAction"),
        format!("{base}.defaultAction"),
        "action",
        ACTIONS,
    )?;
    for (i, a) in list(obj.get("architectures"), "linux.seccomp.architectures")?
        .iter()
        .enumerate()
    {
        let known = a
            .as_str()
            .is_some_and(|s| serde_json::from_value::<Arch>(Value::String(s.into())).is_ok());
        if !known {
            return Err(SeccompError::Invalid {
                field: format!("{base}.architectures[{i}]"),
                msg: format!("unknown architecture {a}"),
            });
        }
    }
    for (i, f) in list(obj.get("flags"), "linux.seccomp.flags")?
        .iter()
        .enumerate()
    {
        check(Some(f), format!("{base}.flags[{i}]"), "flag", FLAGS)?;
    }
    for (i, sc) in list(obj.get("syscalls"), "linux.seccomp.syscalls")?
        .iter()
        .enumerate()
    {
        let field = format!("{base}.syscalls[{i}]");
        check(
            sc.get("action"),
            format!("{field}.action"),
            "action",
            ACTIONS,
        )?;
        for (j, arg) in list(sc.get("args"), &format!("{field}.args"))?
            .iter()
            .enumerate()
        {
            check(
                arg.get("op"),
                format!("{field}.args[{j}].op"),
                "operator",
                OPS,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
