//! The device access rules of `linux.resources.devices`, validated once and then rendered as
//! v1 `devices.allow`/`devices.deny` lines or compiled into the v2 eBPF device program.
//!
//! Rule semantics (both hierarchies): rules are applied in order and a later rule overrides
//! an earlier one; access nobody allowed is denied. The runtime-spec's default devices
//! (`/dev/null`, `zero`, `full`, `random`, `urandom`, `tty`, `console`, `ptmx`, `pts/*`, and
//! `mknod` of any node) are appended after the spec's rules, as runc does, so a container can
//! always use them.

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::CgroupError;

/// Device node kind a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceKind {
    All,
    Char,
    Block,
}

pub(crate) const ACCESS_MKNOD: u8 = 1;
pub(crate) const ACCESS_READ: u8 = 2;
pub(crate) const ACCESS_WRITE: u8 = 4;
pub(crate) const ACCESS_ALL: u8 = ACCESS_MKNOD | ACCESS_READ | ACCESS_WRITE;

/// A validated device rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceRule {
    pub allow: bool,
    pub kind: DeviceKind,
    /// `None` is the `*` wildcard.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACCESS_*` bits (the kernel's `BPF_DEVCG_ACC_*` values).
    pub access: u8,
}

impl DeviceRule {
    const fn allow_char(major: u32, minor: Option<u32>) -> Self {
        DeviceRule {
            allow: true,
            kind: DeviceKind::Char,
            major: Some(major),
            minor,
            access: ACCESS_ALL,
        }
    }

    /// Validates one spec entry; `index` is its position in `linux.resources.devices`.
    pub fn from_spec(index: usize, d: &LinuxDeviceCgroup) -> Result<Self, CgroupError> {
        let field = |name: &str| format!("linux.resources.devices[{index}].{name}");
        let kind = match d.typ() {
            None | Some(LinuxDeviceType::A) => DeviceKind::All,
            Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => DeviceKind::Char,
            Some(LinuxDeviceType::B) => DeviceKind::Block,
            Some(LinuxDeviceType::P) => {
                return Err(CgroupError::Resource {
                    field: field("type"),
                    msg: "\"p\" (fifo) is not a device cgroup type; use a, b or c".into(),
                })
            }
        };
        let number = |v: Option<i64>, name: &str| -> Result<Option<u32>, CgroupError> {
            match v {
                None | Some(-1) => Ok(None),
                // Linux device numbers are 12 (major) and 20 (minor) bits; anything that
                // does not fit an i32 could not match and would not fit the eBPF immediate.
                Some(n) => match i32::try_from(n) {
                    Ok(v) if v >= 0 => Ok(Some(v as u32)),
                    _ => Err(CgroupError::Resource {
                        field: field(name),
                        msg: format!("{n} is not a device number (use -1 or omit for any)"),
                    }),
                },
            }
        };
        let mut access = 0;
        for c in d.access().as_deref().unwrap_or("").chars() {
            access |= match c {
                'r' => ACCESS_READ,
                'w' => ACCESS_WRITE,
                'm' => ACCESS_MKNOD,
                other => {
                    return Err(CgroupError::Resource {
                        field: field("access"),
                        msg: format!("invalid access {other:?}; use a combination of r, w, m"),
                    })
                }
            };
        }
        if access == 0 {
            // runc: an empty access string means everything.
            access = ACCESS_ALL;
        }
        Ok(DeviceRule {
            allow: d.allow(),
            kind,
            major: number(d.major(), "major")?,
            minor: number(d.minor(), "minor")?,
            access,
        })
    }

    fn is_everything(&self) -> bool {
        self.kind == DeviceKind::All
            && self.major.is_none()
            && self.minor.is_none()
            && self.access == ACCESS_ALL
    }

    /// The v1 `devices.allow`/`devices.deny` lines for this rule. A kernel `a` line resets
    /// the whole list, so an `a` rule narrower than "everything" is split into `b` and `c`.
    pub fn v1_lines(&self) -> Vec<String> {
        if self.is_everything() {
            return vec!["a".to_string()];
        }
        let num = |n: Option<u32>| n.map_or_else(|| "*".to_string(), |n| n.to_string());
        let mut access = String::new();
        for (bit, c) in [(ACCESS_READ, 'r'), (ACCESS_WRITE, 'w'), (ACCESS_MKNOD, 'm')] {
            if self.access & bit != 0 {
                access.push(c);
            }
        }
        let kinds: &[char] = match self.kind {
            DeviceKind::All => &['b', 'c'],
            DeviceKind::Char => &['c'],
            DeviceKind::Block => &['b'],
        };
        kinds
            .iter()
            .map(|k| format!("{k} {}:{} {access}", num(self.major), num(self.minor)))
            .collect()
    }
}

/// The devices every container may use (runtime-spec "Default Devices" plus mknod of
/// anything, which is harmless without access to the node).
pub(crate) fn default_rules() -> Vec<DeviceRule> {
    let mknod_any = |kind| DeviceRule {
        allow: true,
        kind,
        major: None,
        minor: None,
        access: ACCESS_MKNOD,
    };
    vec![
        mknod_any(DeviceKind::Char),
        mknod_any(DeviceKind::Block),
        DeviceRule::allow_char(1, Some(3)), // /dev/null
        DeviceRule::allow_char(1, Some(5)), // /dev/zero
        DeviceRule::allow_char(1, Some(7)), // /dev/full
        DeviceRule::allow_char(1, Some(8)), // /dev/random
        DeviceRule::allow_char(1, Some(9)), // /dev/urandom
        DeviceRule::allow_char(5, Some(0)), // /dev/tty
        DeviceRule::allow_char(5, Some(1)), // /dev/console
        DeviceRule::allow_char(5, Some(2)), // /dev/ptmx
        DeviceRule::allow_char(136, None),  // /dev/pts/*
    ]
}

/// The complete rule list for a container: deny everything, the spec's rules, then the
/// default devices.
pub(crate) fn effective_rules(spec: &[LinuxDeviceCgroup]) -> Result<Vec<DeviceRule>, CgroupError> {
    let mut rules = vec![DeviceRule {
        allow: false,
        kind: DeviceKind::All,
        major: None,
        minor: None,
        access: ACCESS_ALL,
    }];
    for (i, d) in spec.iter().enumerate() {
        rules.push(DeviceRule::from_spec(i, d)?);
    }
    rules.extend(default_rules());
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    #[test]
    fn spec_rules_validate_and_render_v1_lines() {
        let d = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(10)
            .minor(200)
            .access("rw")
            .build()
            .unwrap();
        let r = DeviceRule::from_spec(0, &d).unwrap();
        assert_eq!(r.v1_lines(), ["c 10:200 rw"]);

        let all = LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .unwrap();
        assert_eq!(DeviceRule::from_spec(0, &all).unwrap().v1_lines(), ["a"]);

        let narrow_a = LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .major(8)
            .access("w")
            .build()
            .unwrap();
        assert_eq!(
            DeviceRule::from_spec(0, &narrow_a).unwrap().v1_lines(),
            ["b 8:* w", "c 8:* w"]
        );
    }

    #[test]
    fn bad_rules_name_the_field() {
        let bad_access = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rx")
            .build()
            .unwrap();
        let e = DeviceRule::from_spec(2, &bad_access)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("linux.resources.devices[2].access"), "{e}");

        let fifo = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::P)
            .build()
            .unwrap();
        let e = DeviceRule::from_spec(0, &fifo).unwrap_err().to_string();
        assert!(e.starts_with("linux.resources.devices[0].type"), "{e}");

        let neg = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .major(-5)
            .build()
            .unwrap();
        assert!(DeviceRule::from_spec(0, &neg).is_err());
    }

    #[test]
    fn effective_rules_start_with_deny_all_and_end_with_defaults() {
        let rules = effective_rules(&[]).unwrap();
        assert_eq!(rules[0].v1_lines(), ["a"]);
        assert!(!rules[0].allow);
        let null = rules
            .iter()
            .find(|r| r.major == Some(1) && r.minor == Some(3));
        assert!(null.is_some_and(|r| r.allow && r.access == ACCESS_ALL));
    }
}
