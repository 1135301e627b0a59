//! cgroup v1 (and the v1 side of hybrid hosts): one hierarchy per controller (or group of
//! controllers), each with the container's own directory.

pub(crate) mod blkio;
pub(crate) mod cpu;
pub(crate) mod cpuset;
pub(crate) mod devices;
pub(crate) mod freezer;
pub(crate) mod hugetlb;
pub(crate) mod memory;
pub(crate) mod net;

use std::path::Path;

use oci_spec::runtime::LinuxResources;

use super::{
    fs::{self, DirProbe, Setting},
    pids, rdma, v2, Cgroup, CgroupError, CgroupMode, Stats,
};

/// The container's directory for a controller the request needs.
fn require<'a>(
    cg: &'a Cgroup,
    controller: &'static str,
    field: &'static str,
) -> Result<&'a Path, CgroupError> {
    cg.v1_dir(controller)
        .ok_or(CgroupError::ControllerMissing { field, controller })
}

/// Writes `settings` if the controller is mounted; otherwise warns that `field` is ignored
/// (for controllers that are optional on real hosts: blkio, net_cls, net_prio, rdma).
fn write_optional(
    cg: &Cgroup,
    controller: &'static str,
    field: &str,
    settings: impl FnOnce(&Path) -> Vec<Setting>,
) -> Result<(), CgroupError> {
    match cg.v1_dir(controller) {
        Some(dir) => fs::write_all(controller, dir, &settings(dir)),
        None => {
            tracing::warn!("cgroup controller {controller} is not mounted; {field} ignored");
            Ok(())
        }
    }
}

/// Applies everything but `devices` (the caller owns the device policy).
pub(crate) fn apply(cg: &Cgroup, r: &LinuxResources) -> Result<(), CgroupError> {
    if let Some(m) = r.memory() {
        let dir = require(cg, "memory", "linux.resources.memory")?;
        fs::write_all("memory", dir, &memory::settings(m, &DirProbe(dir))?)?;
    }
    if let Some(c) = r.cpu() {
        let cpuset = cpuset::settings(c);
        if !cpuset.is_empty() {
            let dir = require(cg, "cpuset", "linux.resources.cpu.cpus")?;
            fs::write_all("cpuset", dir, &cpuset)?;
        }
        let needs_cpu = c.shares().is_some_and(|v| v != 0)
            || c.quota().is_some_and(|v| v != 0)
            || c.period().is_some_and(|v| v != 0)
            || c.realtime_runtime().is_some_and(|v| v != 0)
            || c.realtime_period().is_some_and(|v| v != 0)
            || c.burst().is_some()
            || c.idle().is_some();
        if needs_cpu {
            let dir = require(cg, "cpu", "linux.resources.cpu")?;
            fs::write_all("cpu", dir, &cpu::settings(c, &DirProbe(dir)))?;
        }
    }
    if let Some(p) = r.pids() {
        let s = pids::settings(p);
        if !s.is_empty() {
            fs::write_all("pids", require(cg, "pids", "linux.resources.pids")?, &s)?;
        }
    }
    if let Some(b) = r.block_io() {
        write_optional(cg, "blkio", "linux.resources.blockIO", |dir| {
            blkio::settings(b, &DirProbe(dir))
        })?;
    }
    if let Some(limits) = r.hugepage_limits().as_deref().filter(|l| !l.is_empty()) {
        apply_hugetlb(cg, limits)?;
    }
    if let Some(n) = r.network() {
        write_optional(cg, "net_cls", "linux.resources.network.classID", |_| {
            net::net_cls_settings(n)
        })?;
        write_optional(cg, "net_prio", "linux.resources.network.priorities", |_| {
            net::net_prio_settings(n)
        })?;
    }
    if let Some(map) = r.rdma().as_ref().filter(|m| !m.is_empty()) {
        write_optional(cg, "rdma", "linux.resources.rdma", |_| rdma::settings(map))?;
    }
    if let Some(map) = r.unified().as_ref().filter(|m| !m.is_empty()) {
        // Hybrid hosts have a cgroup2 directory for the container too; the keys are checked
        // against the controllers it offers.
        match (cg.mode(), cg.unified()) {
            (CgroupMode::Hybrid, Some(u)) => v2::apply_unified(&u.dir, map)?,
            _ => {
                return Err(CgroupError::Resource {
                    field: "linux.resources.unified".into(),
                    msg: "needs cgroup v2, and this host only has cgroup v1".into(),
                })
            }
        }
    }
    Ok(())
}

/// hugetlb lives in v1 when bound there, else (hybrid) in cgroup2. Hosts without it get a
/// warning rather than an error: kubelet sends limits for every page size it knows.
fn apply_hugetlb(
    cg: &Cgroup,
    limits: &[oci_spec::runtime::LinuxHugepageLimit],
) -> Result<(), CgroupError> {
    if let Some(dir) = cg.v1_dir("hugetlb") {
        return fs::write_all("hugetlb", dir, &hugetlb::settings(limits, &DirProbe(dir))?);
    }
    if let Some(u) = cg.unified() {
        if v2::available(&u.mount_point, "hugetlb") {
            v2::enable_controllers(&u.mount_point, &u.dir, Some(&["hugetlb"]))?;
            let s = v2::hugetlb::settings(limits, &DirProbe(&u.dir))?;
            return fs::write_all("hugetlb", &u.dir, &s);
        }
    }
    tracing::warn!("no hugetlb controller on this host; linux.resources.hugepageLimits ignored");
    Ok(())
}

pub(crate) fn stats(cg: &Cgroup) -> Result<Stats, CgroupError> {
    let mut stats = Stats {
        cpu: cpu::stats(cg.v1_dir("cpu"), cg.v1_dir("cpuacct"))?,
        ..Default::default()
    };
    if let Some(dir) = cg.v1_dir("memory") {
        stats.memory = memory::stats(dir)?;
    }
    if let Some(dir) = cg.v1_dir("pids") {
        stats.pids = pids::stats("pids", dir)?;
    }
    if let Some(dir) = cg.v1_dir("blkio") {
        stats.blkio = blkio::stats(dir)?;
    }
    if let Some(dir) = cg.v1_dir("hugetlb") {
        stats.hugetlb = hugetlb::stats(dir)?;
    } else if let Some(u) = cg.unified().filter(|u| u.dir.exists()) {
        stats.hugetlb = v2::hugetlb::stats(&u.dir)?;
    }
    Ok(stats)
}
