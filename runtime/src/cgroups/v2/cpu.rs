//! v2 `cpu` and `cpuset` controllers.

use std::path::Path;

use oci_spec::runtime::LinuxCpu;

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::{CpuStats, CpuUsage, ThrottlingData},
    CgroupError,
};

/// v1 `cpu.shares` (2..=262144, default 1024) to v2 `cpu.weight` (1..=10000, default 100),
/// the linear map runc and crun use.
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// `cpu.max` ("$QUOTA $PERIOD", quota `max` for unlimited) from OCI quota/period (0/None =
/// unset); `None` when neither is given.
pub(crate) fn cpu_max(quota: Option<i64>, period: Option<u64>) -> Option<String> {
    let quota = quota.unwrap_or(0);
    let period = period.unwrap_or(0);
    if quota == 0 && period == 0 {
        return None;
    }
    let mut s = if quota > 0 {
        quota.to_string()
    } else {
        "max".to_string()
    };
    if period != 0 {
        s.push_str(&format!(" {period}"));
    }
    Some(s)
}

pub(crate) fn settings(c: &LinuxCpu, probe: &dyn Probe) -> Result<Vec<Setting>, CgroupError> {
    let mut out = Vec::new();
    if c.realtime_runtime().is_some_and(|r| r != 0) || c.realtime_period().is_some_and(|p| p != 0) {
        return Err(CgroupError::Resource {
            field: "linux.resources.cpu.realtimeRuntime".into(),
            msg: "real-time CPU bandwidth is not supported by cgroup v2".into(),
        });
    }
    if let Some(shares) = c.shares().filter(|s| *s != 0) {
        out.push(Setting::new("cpu.weight", shares_to_weight(shares)));
    }
    if let Some(max) = cpu_max(c.quota(), c.period()) {
        out.push(Setting::new("cpu.max", max));
    }
    if let Some(burst) = c.burst() {
        if probe.exists("cpu.max.burst") {
            out.push(Setting::new("cpu.max.burst", burst));
        } else {
            tracing::warn!("cpu.max.burst is not available; linux.resources.cpu.burst ignored");
        }
    }
    if let Some(idle) = c.idle() {
        if probe.exists("cpu.idle") {
            out.push(Setting::new("cpu.idle", idle));
        } else {
            tracing::warn!("cpu.idle is not available; linux.resources.cpu.idle ignored");
        }
    }
    Ok(out)
}

pub(crate) fn cpuset_settings(c: &LinuxCpu) -> Vec<Setting> {
    let mut out = Vec::new();
    if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
        out.push(Setting::new("cpuset.cpus", cpus));
    }
    if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
        out.push(Setting::new("cpuset.mems", mems));
    }
    out
}

/// `cpu.stat` exists in every v2 cgroup (usage is core, throttling needs the cpu controller).
pub(crate) fn stats(dir: &Path) -> Result<CpuStats, CgroupError> {
    let stat = fs::read_flat_keyed("cpu", dir, "cpu.stat")?;
    let us = |k: &str| stat.get(k).copied().unwrap_or(0).saturating_mul(1000);
    Ok(CpuStats {
        usage: CpuUsage {
            total_ns: us("usage_usec"),
            per_cpu_ns: Vec::new(),
            user_ns: us("user_usec"),
            kernel_ns: us("system_usec"),
        },
        throttling: ThrottlingData {
            periods: stat.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: stat.get("nr_throttled").copied().unwrap_or(0),
            throttled_time_ns: us("throttled_usec"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::fs::tests_support::FakeProbe;
    use oci_spec::runtime::LinuxCpuBuilder;

    #[test]
    fn shares_convert_to_weight() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1, "clamped");
        assert_eq!(shares_to_weight(0), 0);
    }

    #[test]
    fn quota_period_to_cpu_max() {
        assert_eq!(
            cpu_max(Some(50_000), Some(100_000)).as_deref(),
            Some("50000 100000")
        );
        assert_eq!(
            cpu_max(Some(-1), Some(100_000)).as_deref(),
            Some("max 100000")
        );
        assert_eq!(cpu_max(Some(20_000), None).as_deref(), Some("20000"));
        assert_eq!(cpu_max(None, None), None);
    }

    #[test]
    fn realtime_is_rejected_and_weight_written() {
        let rt = LinuxCpuBuilder::default()
            .realtime_runtime(100)
            .build()
            .unwrap();
        let e = settings(&rt, &FakeProbe::new(&[])).unwrap_err().to_string();
        assert!(e.starts_with("linux.resources.cpu.realtimeRuntime"), "{e}");

        let c = LinuxCpuBuilder::default()
            .shares(1024u64)
            .quota(10_000)
            .period(100_000u64)
            .build()
            .unwrap();
        assert_eq!(
            settings(&c, &FakeProbe::new(&[])).unwrap(),
            [
                Setting::new("cpu.weight", 39),
                Setting::new("cpu.max", "10000 100000")
            ]
        );
    }
}
