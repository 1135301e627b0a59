//! cgroup v2: a single hierarchy. Controllers must be enabled top-down through each parent's
//! `cgroup.subtree_control` before a child can use them.

pub(crate) mod cpu;
pub(crate) mod devices;
pub(crate) mod freezer;
pub(crate) mod hugetlb;
pub(crate) mod io;
pub(crate) mod memory;
pub(crate) mod unified;

use std::{collections::HashMap, path::Path};

use oci_spec::runtime::LinuxResources;

use super::{
    fs::{self, DirProbe},
    pids, rdma, CgroupError, Stats,
};

/// Controllers enabled for `dir` by its parent (its `cgroup.controllers`).
pub(crate) fn controllers(dir: &Path) -> Result<Vec<String>, CgroupError> {
    Ok(fs::read("cgroup", dir, "cgroup.controllers")?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// Whether the hierarchy offers `controller` at all (root `cgroup.controllers`).
pub(crate) fn available(mount_point: &Path, controller: &str) -> bool {
    controllers(mount_point).is_ok_and(|c| c.iter().any(|x| x == controller))
}

/// Enables controllers in `cgroup.subtree_control` of every cgroup from the hierarchy root
/// down to `dir`'s parent, so `dir` can use them: all available ones (`wanted == None`, as
/// runc does on v2 hosts; one that cannot be enabled, e.g. because of a busy intermediate
/// cgroup, is logged and left out) or exactly `wanted` (errors are returned).
pub(crate) fn enable_controllers(
    mount_point: &Path,
    dir: &Path,
    wanted: Option<&[&str]>,
) -> Result<(), CgroupError> {
    let Ok(rel) = dir.strip_prefix(mount_point) else {
        return Ok(());
    };
    let mut current = mount_point.to_path_buf();
    for part in rel.components() {
        let available = controllers(&current)?;
        let enabled = fs::read("cgroup", &current, "cgroup.subtree_control")?;
        let enabled: Vec<&str> = enabled.split_whitespace().collect();
        for c in &available {
            if enabled.contains(&c.as_str()) {
                continue;
            }
            match wanted {
                None => {
                    if let Err(e) = fs::write(
                        "cgroup",
                        &current,
                        "cgroup.subtree_control",
                        &format!("+{c}"),
                    ) {
                        tracing::warn!("cannot enable cgroup controller {c}: {e}");
                    }
                }
                Some(w) if w.contains(&c.as_str()) => {
                    fs::write(
                        "cgroup",
                        &current,
                        "cgroup.subtree_control",
                        &format!("+{c}"),
                    )?;
                }
                Some(_) => {}
            }
        }
        current.push(part);
    }
    Ok(())
}

/// Applies everything but `devices` (the caller owns the device policy).
pub(crate) fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
    let enabled = controllers(dir)?;
    let has = |c: &str| enabled.iter().any(|x| x == c);
    let require = |controller: &'static str, field: &'static str| {
        if has(controller) {
            Ok(())
        } else {
            Err(CgroupError::ControllerMissing { field, controller })
        }
    };
    let probe = DirProbe(dir);
    if let Some(m) = r.memory() {
        let s = memory::settings(m, &probe)?;
        if !s.is_empty() {
            require("memory", "linux.resources.memory")?;
            fs::write_all("memory", dir, &s)?;
        }
    }
    if let Some(c) = r.cpu() {
        let s = cpu::cpuset_settings(c);
        if !s.is_empty() {
            require("cpuset", "linux.resources.cpu.cpus")?;
            fs::write_all("cpuset", dir, &s)?;
        }
        let s = cpu::settings(c, &probe)?;
        if !s.is_empty() {
            require("cpu", "linux.resources.cpu")?;
            fs::write_all("cpu", dir, &s)?;
        }
    }
    if let Some(p) = r.pids() {
        let s = pids::settings(p);
        if !s.is_empty() {
            require("pids", "linux.resources.pids")?;
            fs::write_all("pids", dir, &s)?;
        }
    }
    if let Some(b) = r.block_io() {
        let s = io::settings(b, &probe);
        if !s.is_empty() {
            if has("io") {
                fs::write_all("io", dir, &s)?;
            } else {
                tracing::warn!(
                    "cgroup controller io is not enabled; linux.resources.blockIO ignored"
                );
            }
        }
    }
    if let Some(limits) = r.hugepage_limits().as_deref().filter(|l| !l.is_empty()) {
        if has("hugetlb") {
            fs::write_all("hugetlb", dir, &hugetlb::settings(limits, &probe)?)?;
        } else {
            tracing::warn!("no hugetlb controller; linux.resources.hugepageLimits ignored");
        }
    }
    if r.network().is_some() {
        tracing::warn!("cgroup v2 has no net_cls/net_prio; linux.resources.network ignored");
    }
    if let Some(map) = r.rdma().as_ref().filter(|m| !m.is_empty()) {
        if has("rdma") {
            fs::write_all("rdma", dir, &rdma::settings(map))?;
        } else {
            tracing::warn!("cgroup controller rdma is not enabled; linux.resources.rdma ignored");
        }
    }
    if let Some(map) = r.unified().as_ref().filter(|m| !m.is_empty()) {
        apply_unified(dir, map)?;
    }
    Ok(())
}

/// Writes `linux.resources.unified` after validating every key.
pub(crate) fn apply_unified(dir: &Path, map: &HashMap<String, String>) -> Result<(), CgroupError> {
    let s = unified::settings(map, &controllers(dir)?)?;
    fs::write_all("unified", dir, &s)
}

pub(crate) fn stats(dir: &Path) -> Result<Stats, CgroupError> {
    let enabled = controllers(dir)?;
    let has = |c: &str| enabled.iter().any(|x| x == c);
    let mut stats = Stats {
        cpu: cpu::stats(dir)?,
        ..Default::default()
    };
    if has("memory") {
        stats.memory = memory::stats(dir)?;
    }
    if has("pids") {
        stats.pids = pids::stats("pids", dir)?;
    }
    if has("io") {
        stats.blkio = io::stats(dir)?;
    }
    if has("hugetlb") {
        stats.hugetlb = hugetlb::stats(dir)?;
    }
    Ok(stats)
}
