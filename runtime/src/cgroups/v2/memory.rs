//! v2 `memory` controller. The OCI `swap` value is memory+swap (a v1 notion); v2 limits swap
//! alone, so `memory.swap.max = swap - limit` (runc's conversion).

use std::path::Path;

use oci_spec::runtime::LinuxMemory;

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::{MemoryData, MemoryStats},
    CgroupError,
};

fn field(name: &str) -> String {
    format!("linux.resources.memory.{name}")
}

fn limit_value(name: &str, v: i64) -> Result<Option<String>, CgroupError> {
    match v {
        0 => Ok(None),
        -1 => Ok(Some("max".into())),
        v if v > 0 => Ok(Some(v.to_string())),
        v => Err(CgroupError::Resource {
            field: field(name),
            msg: format!("{v} is invalid (use -1 for unlimited)"),
        }),
    }
}

/// `memory.swap.max` for OCI memory+swap `swap` and memory `limit` (both as given, 0 = unset).
pub(crate) fn swap_max(swap: i64, limit: i64) -> Result<Option<String>, CgroupError> {
    match swap {
        0 => Ok(None),
        -1 => Ok(Some("max".into())),
        s if s < -1 => Err(CgroupError::Resource {
            field: field("swap"),
            msg: format!("{s} is invalid (use -1 for unlimited)"),
        }),
        s => {
            if limit <= 0 {
                return Err(CgroupError::Resource {
                    field: field("swap"),
                    msg: "a memory+swap limit needs a memory limit on cgroup v2".into(),
                });
            }
            if s < limit {
                return Err(CgroupError::Resource {
                    field: field("swap"),
                    msg: format!(
                        "memory+swap limit {s} must not be below the memory limit {limit}"
                    ),
                });
            }
            Ok(Some((s - limit).to_string()))
        }
    }
}

pub(crate) fn settings(m: &LinuxMemory, probe: &dyn Probe) -> Result<Vec<Setting>, CgroupError> {
    let mut out = Vec::new();
    let limit = m.limit().unwrap_or(0);
    if m.check_before_update() == Some(true) && limit > 0 {
        if let Some(usage) = probe.read_i64("memory.current") {
            if limit < usage {
                return Err(CgroupError::Resource {
                    field: field("limit"),
                    msg: format!("{limit} is below the current usage {usage} (checkBeforeUpdate)"),
                });
            }
        }
    }
    let limit_str = limit_value("limit", limit)?;
    if let Some(swap) = swap_max(m.swap().unwrap_or(0), limit)? {
        if probe.exists("memory.swap.max") {
            out.push(Setting::new("memory.swap.max", swap));
        } else {
            tracing::warn!("memory.swap.max is not available (no swap accounting); swap ignored");
        }
    }
    if let Some(l) = limit_str {
        out.push(Setting::new("memory.max", l));
    }
    if let Some(r) = limit_value("reservation", m.reservation().unwrap_or(0))? {
        out.push(Setting::new("memory.low", r));
    }
    #[allow(deprecated)]
    let v1_only = [
        ("kernel", m.kernel().is_some()),
        ("kernelTCP", m.kernel_tcp().is_some()),
        ("swappiness", m.swappiness().is_some()),
        ("disableOOMKiller", m.disable_oom_killer() == Some(true)),
    ];
    for (name, set) in v1_only {
        if set {
            tracing::warn!("linux.resources.memory.{name} has no cgroup v2 equivalent; ignored");
        }
    }
    Ok(out)
}

pub(crate) fn stats(dir: &Path) -> Result<MemoryStats, CgroupError> {
    let stat_raw = fs::read_flat_keyed("memory", dir, "memory.stat")?;
    let events_raw = fs::read_flat_keyed("memory", dir, "memory.events")?;
    let get = |file: &str| fs::read_u64_optional("memory", dir, file);
    let swap = match get("memory.swap.current")? {
        Some(usage) => Some(MemoryData {
            usage,
            max_usage: get("memory.swap.peak")?.unwrap_or(0),
            limit: get("memory.swap.max")?.unwrap_or(u64::MAX),
            failcnt: 0,
        }),
        None => None,
    };
    Ok(MemoryStats {
        usage: MemoryData {
            usage: get("memory.current")?.unwrap_or(0),
            max_usage: get("memory.peak")?.unwrap_or(0),
            limit: get("memory.max")?.unwrap_or(u64::MAX),
            failcnt: events_raw.get("max").copied().unwrap_or(0),
        },
        mem_swap: None,
        swap,
        kernel: None,
        cache: stat_raw.get("file").copied().unwrap_or(0),
        rss: stat_raw.get("anon").copied().unwrap_or(0),
        oom_events: events_raw.get("oom").copied().unwrap_or(0),
        oom_kill: events_raw.get("oom_kill").copied().unwrap_or(0),
        stat_raw,
        events_raw,
    })
}

/// `oom_kill` of `memory.events`.
pub(crate) fn oom_kill_count(dir: &Path) -> Result<u64, CgroupError> {
    let text = fs::read("memory", dir, "memory.events")?;
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

    #[test]
    fn swap_is_converted_to_swap_only() {
        assert_eq!(swap_max(300, 100).unwrap().as_deref(), Some("200"));
        assert_eq!(swap_max(100, 100).unwrap().as_deref(), Some("0"));
        assert_eq!(swap_max(-1, 100).unwrap().as_deref(), Some("max"));
        assert_eq!(swap_max(0, 100).unwrap(), None);
        assert!(swap_max(50, 100).is_err());
        assert!(swap_max(300, 0).is_err(), "swap without a memory limit");
        assert!(swap_max(300, -1).is_err());
    }

    #[test]
    fn limits_map_to_v2_files() {
        let probe = FakeProbe::new(&[("memory.swap.max", "max")]);
        let m = LinuxMemoryBuilder::default()
            .limit(100)
            .swap(300)
            .reservation(50)
            .build()
            .unwrap();
        assert_eq!(
            settings(&m, &probe).unwrap(),
            [
                Setting::new("memory.swap.max", 200),
                Setting::new("memory.max", 100),
                Setting::new("memory.low", 50),
            ]
        );
        let unlimited = LinuxMemoryBuilder::default().limit(-1).build().unwrap();
        assert_eq!(
            settings(&unlimited, &probe).unwrap(),
            [Setting::new("memory.max", "max")]
        );
    }
}
