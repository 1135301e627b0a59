//! Discovery of the cgroup hierarchies: which cgroup (v1) and cgroup2 filesystems are
//! mounted where (`/proc/self/mountinfo`), and which cgroup the calling process is in
//! (`/proc/self/cgroup`). Parsing is separated from reading so it can be unit tested on
//! synthetic text.

use std::{collections::BTreeMap, fs, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::CgroupError;

/// The cgroup layout of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Only cgroup v1 hierarchies (one per controller or group of controllers).
    V1,
    /// Only the unified cgroup2 hierarchy (usually at `/sys/fs/cgroup`).
    V2,
    /// v1 controller hierarchies plus a cgroup2 mount (usually `/sys/fs/cgroup/unified`)
    /// that carries the controllers not bound to v1 (e.g. only `hugetlb`) or none.
    Hybrid,
}

impl std::fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupMode::V1 => "v1",
            CgroupMode::V2 => "v2",
            CgroupMode::Hybrid => "hybrid",
        })
    }
}

/// Controllers a v1 `cgroup` mount can carry (its super options name them). Named
/// hierarchies (`name=systemd`) carry none but are still joined, as runc does.
const V1_SUBSYSTEMS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// One v1 hierarchy as mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V1Mount {
    /// Controllers, plus `name=...` for a named hierarchy, in super-option order.
    pub subsystems: Vec<String>,
    pub mount_point: PathBuf,
    /// The cgroup (inside the hierarchy) that is mounted there; `/` unless we are inside a
    /// container that bind-mounted a sub-tree.
    pub root: String,
}

/// The cgroup2 mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V2Mount {
    pub mount_point: PathBuf,
    pub root: String,
}

/// Every cgroup filesystem of the mount namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Mounts {
    pub v1: Vec<V1Mount>,
    pub v2: Option<V2Mount>,
}

impl Mounts {
    /// Reads `/proc/self/mountinfo`.
    pub fn read() -> Result<Mounts, CgroupError> {
        let path = "/proc/self/mountinfo";
        let text = fs::read_to_string(path).map_err(|source| CgroupError::Io {
            context: format!("read {path}"),
            source,
        })?;
        Ok(parse_mountinfo(&text))
    }

    pub fn mode(&self) -> Result<CgroupMode, CgroupError> {
        match (self.v1.is_empty(), &self.v2) {
            (false, Some(_)) => Ok(CgroupMode::Hybrid),
            (false, None) => Ok(CgroupMode::V1),
            (true, Some(_)) => Ok(CgroupMode::V2),
            (true, None) => Err(CgroupError::NotMounted),
        }
    }
}

/// Detects how cgroups are mounted in the caller's mount namespace.
pub fn detect_mode() -> Result<CgroupMode, CgroupError> {
    Mounts::read()?.mode()
}

/// Undoes the octal escapes (`\040` for a space, ...) the kernel uses in mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(value) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text (see proc(5)) into the cgroup mounts it lists. A hierarchy mounted
/// more than once keeps its first mount; malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Mounts {
    let mut mounts = Mounts::default();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split_whitespace().collect();
        let right: Vec<&str> = right.split_whitespace().collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let root = unescape(left[3]);
        let mount_point = PathBuf::from(unescape(left[4]));
        match right[0] {
            "cgroup2" if mounts.v2.is_none() => {
                mounts.v2 = Some(V2Mount { mount_point, root });
            }
            "cgroup" => {
                let subsystems: Vec<String> = right[2]
                    .split(',')
                    .filter(|o| V1_SUBSYSTEMS.contains(o) || o.starts_with("name="))
                    .map(str::to_string)
                    .collect();
                if subsystems.is_empty() || mounts.v1.iter().any(|m| m.subsystems == subsystems) {
                    continue;
                }
                mounts.v1.push(V1Mount {
                    subsystems,
                    mount_point,
                    root,
                });
            }
            _ => {}
        }
    }
    mounts
}

/// The cgroups of a process, from `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ProcessCgroups {
    /// v1: subsystem (or `name=...`) → path inside that hierarchy.
    pub v1: BTreeMap<String, String>,
    /// The `0::<path>` line (cgroup2).
    pub v2: Option<String>,
}

impl ProcessCgroups {
    pub fn read_self() -> Result<ProcessCgroups, CgroupError> {
        let path = "/proc/self/cgroup";
        let text = fs::read_to_string(path).map_err(|source| CgroupError::Io {
            context: format!("read {path}"),
            source,
        })?;
        Ok(parse_proc_cgroup(&text))
    }
}

/// Parses `hierarchy-id:controller-list:path` lines.
pub(crate) fn parse_proc_cgroup(text: &str) -> ProcessCgroups {
    let mut out = ProcessCgroups::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            out.v2 = Some(path.to_string());
            continue;
        }
        for c in controllers.split(',').filter(|c| !c.is_empty()) {
            out.v1.insert(c.to_string(), path.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_is_detected_with_each_hierarchy() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.mode().unwrap(), CgroupMode::Hybrid);
        let subs: Vec<_> = m.v1.iter().map(|h| h.subsystems.join(",")).collect();
        assert_eq!(subs, ["cpu", "cpuacct", "memory", "name=systemd"]);
        assert_eq!(
            m.v2.unwrap().mount_point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn pure_v2_and_pure_v1_and_none() {
        let v2 = "25 22 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_mountinfo(v2).mode().unwrap(), CgroupMode::V2);

        let v1 = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 25 0:27 /docker/abc /other/memory rw - cgroup cgroup rw,memory
";
        let m = parse_mountinfo(v1);
        assert_eq!(m.mode().unwrap(), CgroupMode::V1);
        assert_eq!(m.v1.len(), 2, "a hierarchy mounted twice is kept once");
        assert_eq!(m.v1[0].subsystems, ["cpu", "cpuacct"]);
        assert_eq!(m.v1[1].root, "/docker/abc");

        let none = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n";
        assert!(matches!(
            parse_mountinfo(none).mode(),
            Err(CgroupError::NotMounted)
        ));
    }

    #[test]
    fn escaped_mount_points_and_optional_fields() {
        let text = "40 31 0:38 / /mnt/my\\040cg rw shared:5 master:1 - cgroup2 none rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.v2.unwrap().mount_point, PathBuf::from("/mnt/my cg"));
    }

    #[test]
    fn proc_cgroup_lines() {
        let p = parse_proc_cgroup(
            "9:name=systemd:/\n4:memory:/process_api/a6\n2:cpu,cpuacct:/x\n0::/user.slice\n",
        );
        assert_eq!(p.v1["memory"], "/process_api/a6");
        assert_eq!(p.v1["cpu"], "/x");
        assert_eq!(p.v1["cpuacct"], "/x");
        assert_eq!(p.v1["name=systemd"], "/");
        assert_eq!(p.v2.as_deref(), Some("/user.slice"));
    }
}
