//! list / ps / update / events / spec / features.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::Args;
use oci_spec::runtime::{LinuxResources, Spec};
use palisade_runtime::{Runtime, Status};
use serde_json::{json, Value};

pub fn list(runtime: &Runtime, format: &str, quiet: bool) -> Result<()> {
    let states = runtime.list()?;
    match (format, quiet) {
        (_, true) => states.iter().for_each(|s| println!("{}", s.id)),
        ("json", _) => println!("{}", serde_json::to_string(&states)?),
        _ => {
            println!(
                "{:<20} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for s in states {
                println!(
                    "{:<20} {:<8} {:<10} {:<40} {}",
                    s.id,
                    s.pid,
                    s.status,
                    s.bundle.display(),
                    s.created
                );
            }
        }
    }
    Ok(())
}

pub fn ps(runtime: &Runtime, id: &str, format: &str, ps_args: &[String]) -> Result<()> {
    let container = runtime.load(id)?;
    let pids = container.pids()?;
    if format == "json" {
        println!("{}", serde_json::to_string(&pids)?);
        return Ok(());
    }
    if format != "table" {
        bail!("invalid format {format:?}: use table or json");
    }
    let args: Vec<String> = if ps_args.is_empty() {
        vec!["-ef".into()]
    } else {
        ps_args.to_vec()
    };
    let out = Command::new("ps")
        .args(&args)
        .output()
        .context("running ps")?;
    if !out.status.success() {
        bail!(
            "ps {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let pid_column = header
        .split_whitespace()
        .position(|c| c == "PID")
        .context("ps output has no PID column")?;
    println!("{header}");
    for line in lines {
        let pid: Option<i32> = line
            .split_whitespace()
            .nth(pid_column)
            .and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| pids.contains(&p)) {
            println!("{line}");
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// JSON file with linux.resources, or `-` for stdin.
    #[arg(short, long)]
    resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    memory: Option<i64>,
    /// Memory+swap limit in bytes.
    #[arg(long = "memory-swap")]
    memory_swap: Option<i64>,
    /// Maximum number of pids.
    #[arg(long = "pids-limit")]
    pids_limit: Option<i64>,
    #[arg(long = "cpu-shares")]
    cpu_shares: Option<u64>,
    #[arg(long = "cpu-quota")]
    cpu_quota: Option<i64>,
    #[arg(long = "cpu-period")]
    cpu_period: Option<u64>,
    #[arg(long = "cpuset-cpus")]
    cpuset_cpus: Option<String>,
    #[arg(long = "cpuset-mems")]
    cpuset_mems: Option<String>,
    container_id: String,
}

pub fn update(runtime: &Runtime, args: UpdateArgs) -> Result<()> {
    let container = runtime.load(&args.container_id)?;
    let resources: LinuxResources = match &args.resources {
        Some(path) => {
            let mut text = Vec::new();
            if path == Path::new("-") {
                std::io::stdin().read_to_end(&mut text)?;
            } else {
                text =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            }
            serde_json::from_slice(&text).context("parsing --resources")?
        }
        None => {
            let current = container
                .spec()
                .linux()
                .as_ref()
                .and_then(|l| l.resources().clone())
                .unwrap_or_default();
            let mut v = serde_json::to_value(current)?;
            let mut set = |section: &str, key: &str, value: Value| {
                if !v[section].is_object() {
                    v[section] = json!({});
                }
                v[section][key] = value;
            };
            if let Some(m) = args.memory {
                set("memory", "limit", m.into());
            }
            if let Some(m) = args.memory_swap {
                set("memory", "swap", m.into());
            }
            if let Some(p) = args.pids_limit {
                set("pids", "limit", p.into());
            }
            if let Some(s) = args.cpu_shares {
                set("cpu", "shares", s.into());
            }
            if let Some(q) = args.cpu_quota {
                set("cpu", "quota", q.into());
            }
            if let Some(p) = args.cpu_period {
                set("cpu", "period", p.into());
            }
            if let Some(c) = &args.cpuset_cpus {
                set("cpu", "cpus", c.clone().into());
            }
            if let Some(m) = &args.cpuset_mems {
                set("cpu", "mems", m.clone().into());
            }
            serde_json::from_value(v).context("building resources")?
        }
    };
    container.update(&resources)?;
    Ok(())
}

/// Parses a Go-style duration: `5s`, `500ms`, `1m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid duration {text:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("invalid duration {text:?}"),
    };
    if secs <= 0.0 {
        bail!("duration {text:?} must be positive");
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn events(runtime: &Runtime, id: &str, once: bool, interval: &str) -> Result<()> {
    let interval = parse_duration(interval)?;
    let container = runtime.load(id)?;
    let stats_event = || -> Result<Value> {
        Ok(json!({"type": "stats", "id": id, "data": runc_stats(&container.stats()?)}))
    };
    if once {
        println!("{}", stats_event()?);
        return Ok(());
    }
    let mut ooms = container.oom_kill_count().unwrap_or(0);
    while container.status() != Status::Stopped {
        println!("{}", stats_event()?);
        let now = container.oom_kill_count().unwrap_or(ooms);
        if now > ooms {
            println!("{}", json!({"type": "oom", "id": id}));
            ooms = now;
        }
        std::thread::sleep(interval);
    }
    Ok(())
}

/// cgroup statistics in the JSON shape of runc's `types.Stats`, which containerd's runc
/// shim (go-runc) decodes for task metrics.
fn runc_stats(s: &palisade_runtime::cgroups::Stats) -> Value {
    use palisade_runtime::cgroups::stats::{BlkioEntry, MemoryData};
    let memory_entry = |m: &MemoryData| json!({"limit": m.limit, "usage": m.usage, "max": m.max_usage, "failcnt": m.failcnt});
    let blkio = |entries: &[BlkioEntry]| {
        entries
            .iter()
            .map(|e| json!({"major": e.major, "minor": e.minor, "op": e.op, "value": e.value}))
            .collect::<Vec<_>>()
    };
    let hugetlb: serde_json::Map<String, Value> = s
        .hugetlb
        .iter()
        .map(|(size, h)| {
            (
                size.clone(),
                json!({"usage": h.usage, "max": h.max_usage, "failcnt": h.failcnt}),
            )
        })
        .collect();
    let mut memory = json!({
        "cache": s.memory.cache,
        "usage": memory_entry(&s.memory.usage),
        "raw": s.memory.stat_raw,
    });
    if let Some(swap) = s.memory.swap.as_ref().or(s.memory.mem_swap.as_ref()) {
        memory["swap"] = memory_entry(swap);
    }
    if let Some(kernel) = &s.memory.kernel {
        memory["kernel"] = memory_entry(kernel);
    }
    json!({
        "cpu": {
            "usage": {
                "total": s.cpu.usage.total_ns,
                "percpu": s.cpu.usage.per_cpu_ns,
                "kernel": s.cpu.usage.kernel_ns,
                "user": s.cpu.usage.user_ns,
            },
            "throttling": {
                "periods": s.cpu.throttling.periods,
                "throttledPeriods": s.cpu.throttling.throttled_periods,
                "throttledTime": s.cpu.throttling.throttled_time_ns,
            },
        },
        "memory": memory,
        "pids": {"current": s.pids.current, "limit": s.pids.limit},
        "blkio": {
            "ioServiceBytesRecursive": blkio(&s.blkio.io_service_bytes_recursive),
            "ioServicedRecursive": blkio(&s.blkio.io_serviced_recursive),
        },
        "hugetlb": hugetlb,
    })
}

pub fn spec(bundle: &Path, rootless: bool) -> Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("{} exists: remove it first", path.display());
    }
    let mut spec = if rootless {
        Spec::rootless(
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    } else {
        Spec::default()
    };
    spec.set_hostname(Some("palisade".into()));
    let text = serde_json::to_string_pretty(&spec)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The runtime-spec "features" document.
pub fn features() -> Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": palisade_runtime::state::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": [
            "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec",
            "iversion", "lazytime", "loud", "mand", "noatime", "nodev", "nodiratime", "noexec",
            "noiversion", "nolazytime", "nomand", "norelatime", "nostrictatime", "nosuid",
            "private", "rbind", "relatime", "remount", "ro", "rprivate", "rshared", "rslave",
            "runbindable", "rw", "shared", "silent", "slave", "strictatime", "suid", "sync",
            "tmpcopyup", "unbindable"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"],
            "capabilities": caps::all().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86_64"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("x").is_err());
    }
}
