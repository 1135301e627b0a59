//! v1 `memory` controller.

use std::path::Path;

use oci_spec::runtime::LinuxMemory;

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::{MemoryData, MemoryStats},
    CgroupError,
};

const LIMIT: &str = "memory.limit_in_bytes";
const MEMSW: &str = "memory.memsw.limit_in_bytes";

fn field(name: &str) -> String {
    format!("linux.resources.memory.{name}")
}

/// The files to write for `m`, in the order they must be written.
pub(crate) fn settings(m: &LinuxMemory, probe: &dyn Probe) -> Result<Vec<Setting>, CgroupError> {
    let mut out = Vec::new();
    let limit = m.limit().unwrap_or(0);
    let mut swap = m.swap().unwrap_or(0);
    for (name, v) in [("limit", limit), ("swap", swap)] {
        if v < -1 {
            return Err(CgroupError::Resource {
                field: field(name),
                msg: format!("{v} is invalid (use -1 for unlimited)"),
            });
        }
    }
    if m.check_before_update() == Some(true) && limit > 0 {
        if let Some(usage) = probe.read_i64("memory.usage_in_bytes") {
            if limit < usage {
                return Err(CgroupError::Resource {
                    field: field("limit"),
                    msg: format!("{limit} is below the current usage {usage} (checkBeforeUpdate)"),
                });
            }
        }
    }
    let has_memsw = probe.exists(MEMSW);
    // "Unlimited memory" without a swap value means unlimited memory+swap too (runc).
    if limit == -1 && swap == 0 && has_memsw {
        swap = -1;
    }
    if swap != 0 && !has_memsw {
        tracing::warn!("swap accounting is disabled on this host; ignoring memory.swap");
        swap = 0;
    }
    if swap > 0 && limit > 0 && swap < limit {
        return Err(CgroupError::Resource {
            field: field("swap"),
            msg: format!("memory+swap limit {swap} must not be below the memory limit {limit}"),
        });
    }
    if limit != 0 && swap != 0 {
        // memsw.limit must always stay >= limit, so the write order depends on whether we
        // grow or shrink (runc does the same).
        let current = probe.read_i64(LIMIT).unwrap_or(i64::MAX);
        if swap == -1 || current < swap {
            out.push(Setting::new(MEMSW, swap));
            out.push(Setting::new(LIMIT, limit));
        } else {
            out.push(Setting::new(LIMIT, limit));
            out.push(Setting::new(MEMSW, swap));
        }
    } else {
        if limit != 0 {
            out.push(Setting::new(LIMIT, limit));
        }
        if swap != 0 {
            out.push(Setting::new(MEMSW, swap));
        }
    }
    if let Some(r) = m.reservation().filter(|r| *r != 0) {
        out.push(Setting::new("memory.soft_limit_in_bytes", r));
    }
    #[allow(deprecated)]
    if m.kernel().is_some() {
        tracing::warn!("linux.resources.memory.kernel is obsolete since Linux 5.4; ignored");
    }
    if let Some(tcp) = m.kernel_tcp() {
        if probe.exists("memory.kmem.tcp.limit_in_bytes") {
            out.push(Setting::new("memory.kmem.tcp.limit_in_bytes", tcp));
        } else {
            tracing::warn!("memory.kmem.tcp.limit_in_bytes is not available; kernelTCP ignored");
        }
    }
    if let Some(s) = m.swappiness() {
        if s > 100 {
            return Err(CgroupError::Resource {
                field: field("swappiness"),
                msg: format!("{s} is out of range 0..=100"),
            });
        }
        out.push(Setting::new("memory.swappiness", s));
    }
    if let Some(disable) = m.disable_oom_killer() {
        out.push(Setting::new("memory.oom_control", u8::from(disable)));
    }
    match m.use_hierarchy() {
        Some(true) => out.push(Setting::new("memory.use_hierarchy", 1)),
        Some(false) => tracing::warn!("memory.use_hierarchy cannot be disabled on this kernel"),
        None => {}
    }
    Ok(out)
}

fn data(dir: &Path, prefix: &str) -> Result<Option<MemoryData>, CgroupError> {
    let get = |suffix: &str| fs::read_u64_optional("memory", dir, &format!("{prefix}{suffix}"));
    let Some(usage) = get("usage_in_bytes")? else {
        return Ok(None);
    };
    Ok(Some(MemoryData {
        usage,
        max_usage: get("max_usage_in_bytes")?.unwrap_or(0),
        limit: get("limit_in_bytes")?.unwrap_or(u64::MAX),
        failcnt: get("failcnt")?.unwrap_or(0),
    }))
}

pub(crate) fn stats(dir: &Path) -> Result<MemoryStats, CgroupError> {
    let stat_raw = fs::read_flat_keyed("memory", dir, "memory.stat")?;
    let oom_control = fs::read_flat_keyed("memory", dir, "memory.oom_control")?;
    Ok(MemoryStats {
        usage: data(dir, "memory.")?.unwrap_or_default(),
        mem_swap: data(dir, "memory.memsw.")?,
        swap: None,
        kernel: data(dir, "memory.kmem.")?,
        cache: stat_raw
            .get("total_cache")
            .or(stat_raw.get("cache"))
            .copied()
            .unwrap_or(0),
        rss: stat_raw
            .get("total_rss")
            .or(stat_raw.get("rss"))
            .copied()
            .unwrap_or(0),
        oom_events: 0,
        oom_kill: oom_control.get("oom_kill").copied().unwrap_or(0),
        stat_raw,
        events_raw: Default::default(),
    })
}

/// `oom_kill` of `memory.oom_control` (Linux ≥ 4.13).
pub(crate) fn oom_kill_count(dir: &Path) -> Result<u64, CgroupError> {
    let text = fs::read("memory", dir, "memory.oom_control")?;
    Ok(fs::parse_flat_keyed(&text)
        .get("oom_kill")
        .copied()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::fs::tests_support::FakeProbe;
    use oci_spec::runtime::LinuxMemoryBuilder;

    fn files(s: &[Setting]) -> Vec<(&str, &str)> {
        s.iter()
            .map(|s| (s.file.as_str(), s.value.as_str()))
            .collect()
    }

    #[test]
    fn limit_swap_and_knobs_map_to_v1_files() {
        let probe = FakeProbe::new(&[
            (MEMSW, "9223372036854771712"),
            (LIMIT, "9223372036854771712"),
        ]);
        let m = LinuxMemoryBuilder::default()
            .limit(100 << 20)
            .swap(200 << 20)
            .reservation(50 << 20)
            .swappiness(10u64)
            .disable_oom_killer(true)
            .build()
            .unwrap();
        let s = settings(&m, &probe).unwrap();
        assert_eq!(
            files(&s),
            [
                (LIMIT, "104857600"),
                (MEMSW, "209715200"),
                ("memory.soft_limit_in_bytes", "52428800"),
                ("memory.swappiness", "10"),
                ("memory.oom_control", "1"),
            ]
        );
    }

    #[test]
    fn growing_writes_memsw_first() {
        let probe = FakeProbe::new(&[(MEMSW, "2000"), (LIMIT, "1000")]);
        let m = LinuxMemoryBuilder::default()
            .limit(3000)
            .swap(4000)
            .build()
            .unwrap();
        let s = settings(&m, &probe).unwrap();
        assert_eq!(files(&s), [(MEMSW, "4000"), (LIMIT, "3000")]);
    }

    #[test]
    fn unlimited_memory_implies_unlimited_swap_and_no_memsw_drops_swap() {
        let with = FakeProbe::new(&[(MEMSW, "1"), (LIMIT, "1")]);
        let m = LinuxMemoryBuilder::default().limit(-1).build().unwrap();
        assert_eq!(
            files(&settings(&m, &with).unwrap()),
            [(MEMSW, "-1"), (LIMIT, "-1")]
        );

        let without = FakeProbe::new(&[(LIMIT, "1")]);
        let m = LinuxMemoryBuilder::default()
            .limit(10)
            .swap(20)
            .build()
            .unwrap();
        assert_eq!(files(&settings(&m, &without).unwrap()), [(LIMIT, "10")]);
    }

    #[test]
    fn invalid_values_name_the_field() {
        let probe = FakeProbe::new(&[(MEMSW, "1")]);
        let m = LinuxMemoryBuilder::default()
            .swappiness(101u64)
            .build()
            .unwrap();
        let e = settings(&m, &probe).unwrap_err().to_string();
        assert!(e.starts_with("linux.resources.memory.swappiness"), "{e}");

        let m = LinuxMemoryBuilder::default()
            .limit(200)
            .swap(100)
            .build()
            .unwrap();
        let e = settings(&m, &probe).unwrap_err().to_string();
        assert!(e.starts_with("linux.resources.memory.swap"), "{e}");

        let m = LinuxMemoryBuilder::default().limit(-2).build().unwrap();
        assert!(settings(&m, &probe).is_err());
    }

    #[test]
    fn check_before_update_rejects_limits_below_usage() {
        let probe = FakeProbe::new(&[("memory.usage_in_bytes", "5000")]);
        let m = LinuxMemoryBuilder::default()
            .limit(4000)
            .check_before_update(true)
            .build()
            .unwrap();
        assert!(settings(&m, &probe).is_err());
    }
}
