//! v1 `cpu` and `cpuacct` controllers (they may share a hierarchy or not).

use std::path::Path;

use oci_spec::runtime::LinuxCpu;

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::{CpuStats, CpuUsage, ThrottlingData},
    CgroupError,
};

/// The `cpu.*` files for `c` (cpus/mems belong to cpuset). The period is written before the
/// quota so that a quota valid for the new period is accepted.
pub(crate) fn settings(c: &LinuxCpu, probe: &dyn Probe) -> Vec<Setting> {
    let mut out = Vec::new();
    if let Some(shares) = c.shares().filter(|s| *s != 0) {
        out.push(Setting::new("cpu.shares", shares));
    }
    if let Some(period) = c.period().filter(|p| *p != 0) {
        out.push(Setting::new("cpu.cfs_period_us", period));
    }
    if let Some(quota) = c.quota().filter(|q| *q != 0) {
        out.push(Setting::new("cpu.cfs_quota_us", quota));
    }
    if let Some(burst) = c.burst() {
        if probe.exists("cpu.cfs_burst_us") {
            out.push(Setting::new("cpu.cfs_burst_us", burst));
        } else {
            tracing::warn!("cpu.cfs_burst_us is not available; linux.resources.cpu.burst ignored");
        }
    }
    if let Some(period) = c.realtime_period().filter(|p| *p != 0) {
        out.push(Setting::new("cpu.rt_period_us", period));
    }
    if let Some(runtime) = c.realtime_runtime().filter(|r| *r != 0) {
        out.push(Setting::new("cpu.rt_runtime_us", runtime));
    }
    if let Some(idle) = c.idle() {
        if probe.exists("cpu.idle") {
            out.push(Setting::new("cpu.idle", idle));
        } else {
            tracing::warn!("cpu.idle is not available; linux.resources.cpu.idle ignored");
        }
    }
    out
}

/// CPU usage from `cpuacct` (usage, per-CPU, user/system) and throttling from `cpu.stat`.
pub(crate) fn stats(
    cpu_dir: Option<&Path>,
    cpuacct_dir: Option<&Path>,
) -> Result<CpuStats, CgroupError> {
    let mut out = CpuStats::default();
    if let Some(dir) = cpuacct_dir {
        let mut usage = CpuUsage {
            total_ns: fs::read_u64_optional("cpuacct", dir, "cpuacct.usage")?.unwrap_or(0),
            ..Default::default()
        };
        if let Some(text) = fs::read_optional("cpuacct", dir, "cpuacct.usage_percpu")? {
            usage.per_cpu_ns = text
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
        }
        // cpuacct.stat is in USER_HZ ticks; the _user/_sys files are in ns (Linux ≥ 4.7).
        match (
            fs::read_u64_optional("cpuacct", dir, "cpuacct.usage_user")?,
            fs::read_u64_optional("cpuacct", dir, "cpuacct.usage_sys")?,
        ) {
            (Some(user), Some(sys)) => {
                usage.user_ns = user;
                usage.kernel_ns = sys;
            }
            _ => {
                let stat = fs::read_flat_keyed("cpuacct", dir, "cpuacct.stat")?;
                let tick_ns = 1_000_000_000 / clock_ticks_per_second();
                usage.user_ns = stat.get("user").copied().unwrap_or(0) * tick_ns;
                usage.kernel_ns = stat.get("system").copied().unwrap_or(0) * tick_ns;
            }
        }
        out.usage = usage;
    }
    if let Some(dir) = cpu_dir {
        let stat = fs::read_flat_keyed("cpu", dir, "cpu.stat")?;
        out.throttling = ThrottlingData {
            periods: stat.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: stat.get("nr_throttled").copied().unwrap_or(0),
            throttled_time_ns: stat.get("throttled_time").copied().unwrap_or(0),
        };
    }
    Ok(out)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::fs::tests_support::FakeProbe;
    use oci_spec::runtime::LinuxCpuBuilder;

    #[test]
    fn shares_quota_period_realtime_map_to_v1_files() {
        let c = LinuxCpuBuilder::default()
            .shares(512u64)
            .quota(50_000)
            .period(100_000u64)
            .realtime_period(1_000_000u64)
            .realtime_runtime(950_000)
            .burst(1000u64)
            .build()
            .unwrap();
        let probe = FakeProbe::new(&[("cpu.cfs_burst_us", "0")]);
        let s: Vec<_> = settings(&c, &probe)
            .into_iter()
            .map(|s| (s.file, s.value))
            .collect();
        let expect = [
            ("cpu.shares", "512"),
            ("cpu.cfs_period_us", "100000"),
            ("cpu.cfs_quota_us", "50000"),
            ("cpu.cfs_burst_us", "1000"),
            ("cpu.rt_period_us", "1000000"),
            ("cpu.rt_runtime_us", "950000"),
        ];
        let expect: Vec<_> = expect
            .iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect();
        assert_eq!(s, expect);
    }

    #[test]
    fn unlimited_quota_is_minus_one() {
        let c = LinuxCpuBuilder::default().quota(-1).build().unwrap();
        let s = settings(&c, &FakeProbe::new(&[]));
        assert_eq!(s, [Setting::new("cpu.cfs_quota_us", -1)]);
    }
}
