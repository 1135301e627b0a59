//! v1 `cpuset` controller. A new v1 cpuset cgroup starts with empty `cpuset.cpus` and
//! `cpuset.mems`, and no task can join it until both are set: [`populate`] copies them from
//! the parent, level by level, right after the directories are created.

use std::path::Path;

use oci_spec::runtime::LinuxCpu;

use crate::cgroups::{
    fs::{self, Setting},
    CgroupError,
};

pub(crate) fn settings(c: &LinuxCpu) -> Vec<Setting> {
    let mut out = Vec::new();
    if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
        out.push(Setting::new("cpuset.cpus", cpus));
    }
    if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
        out.push(Setting::new("cpuset.mems", mems));
    }
    out
}

/// Fills empty `cpuset.cpus`/`cpuset.mems` from the parent for every level from below
/// `mount_point` down to `dir`.
pub(crate) fn populate(mount_point: &Path, dir: &Path) -> Result<(), CgroupError> {
    let Ok(rel) = dir.strip_prefix(mount_point) else {
        return Ok(());
    };
    let mut parent = mount_point.to_path_buf();
    for part in rel.components() {
        let child = parent.join(part);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let current = fs::read("cpuset", &child, file)?;
            if current.trim().is_empty() {
                let from_parent = fs::read("cpuset", &parent, file)?;
                fs::write("cpuset", &child, file, from_parent.trim())?;
            }
        }
        parent = child;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxCpuBuilder;

    #[test]
    fn cpus_and_mems() {
        let c = LinuxCpuBuilder::default()
            .cpus("0-1")
            .mems("0")
            .build()
            .unwrap();
        assert_eq!(
            settings(&c),
            [
                Setting::new("cpuset.cpus", "0-1"),
                Setting::new("cpuset.mems", "0")
            ]
        );
        let empty = LinuxCpuBuilder::default().cpus("").build().unwrap();
        assert!(settings(&empty).is_empty());
    }
}
