//! Resource usage of a container's cgroup, in one shape for v1 and v2. The shim converts it
//! to containerd's `io.containerd.cgroups.v1.Metrics` or `...v2.Metrics` depending on
//! [`Stats::mode`]; fields a hierarchy does not provide stay at their defaults (0 / empty /
//! `None`) and `*_raw` maps carry every counter the kernel reported.
//!
//! Units: time in nanoseconds, memory in bytes. "Unlimited" limits are `u64::MAX`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CgroupMode;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// How the numbers were obtained (the shim picks the containerd metrics type from it).
    pub mode: Option<CgroupMode>,
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
    pub blkio: BlkioStats,
    /// Keyed by page size as the kernel names it (`2MB`, `1GB`).
    pub hugetlb: BTreeMap<String, HugetlbStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStats {
    pub usage: CpuUsage,
    pub throttling: ThrottlingData,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuUsage {
    pub total_ns: u64,
    /// Per-CPU usage (v1 `cpuacct.usage_percpu`; empty on v2, which does not report it).
    pub per_cpu_ns: Vec<u64>,
    pub user_ns: u64,
    pub kernel_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottlingData {
    pub periods: u64,
    pub throttled_periods: u64,
    pub throttled_time_ns: u64,
}

/// One memory counter family (v1: `memory.{usage_in_bytes,max_usage_in_bytes,
/// limit_in_bytes,failcnt}`; v2: `memory.{current,peak,max}` and `memory.events max`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryData {
    pub usage: u64,
    pub max_usage: u64,
    pub limit: u64,
    pub failcnt: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub usage: MemoryData,
    /// v1 only: memory+swap (`memory.memsw.*`), if swap accounting is enabled.
    pub mem_swap: Option<MemoryData>,
    /// v2 only: swap alone (`memory.swap.{current,max}`).
    pub swap: Option<MemoryData>,
    /// v1 only: `memory.kmem.*`.
    pub kernel: Option<MemoryData>,
    /// Page cache (v1 `cache`, v2 `file`).
    pub cache: u64,
    /// Anonymous memory (v1 `rss`, v2 `anon`).
    pub rss: u64,
    /// Times the cgroup hit its limit and the OOM path ran (v1 `under_oom` transitions are
    /// not counted by the kernel, so this is v2 `memory.events oom`; 0 on v1).
    pub oom_events: u64,
    /// Processes killed by the OOM killer in this cgroup.
    pub oom_kill: u64,
    /// `memory.stat` as the kernel reported it.
    pub stat_raw: BTreeMap<String, u64>,
    /// v2 `memory.events` as the kernel reported it.
    pub events_raw: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidsStats {
    pub current: u64,
    /// `u64::MAX` when unlimited.
    pub limit: u64,
}

/// One `major:minor op value` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkioEntry {
    pub major: u64,
    pub minor: u64,
    /// `Read`, `Write`, `Sync`, `Async`, `Discard`, `Total` (v1 names; v2 maps
    /// rbytes/rios → Read, wbytes/wios → Write, dbytes/dios → Discard).
    pub op: String,
    pub value: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkioStats {
    pub io_service_bytes_recursive: Vec<BlkioEntry>,
    pub io_serviced_recursive: Vec<BlkioEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugetlbStats {
    pub usage: u64,
    pub max_usage: u64,
    pub limit: u64,
    pub failcnt: u64,
}
