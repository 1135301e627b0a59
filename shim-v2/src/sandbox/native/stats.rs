//! Task metrics from the container's cgroups, in containerd's metric types.

use containerd_shim::{
    cgroup::{collect_metrics, collect_metrics_v2, get_cgroup},
    util::convert_to_any,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;

/// Metrics of the cgroup(s) `pid` is in: `io.containerd.cgroups.v2.Metrics` on a unified
/// hierarchy, `io.containerd.cgroups.v1.Metrics` on v1 and hybrid hosts. Blocking.
pub fn collect(pid: u32) -> Result<Any, String> {
    let cgroup = get_cgroup(pid).map_err(|e| format!("cgroup of pid {pid}: {e}"))?;
    if cgroup.v2() {
        let metrics = collect_metrics_v2(&cgroup).map_err(|e| e.to_string())?;
        return convert_to_any(Box::new(metrics)).map_err(|e| e.to_string());
    }
    let mut metrics = collect_metrics(&cgroup).map_err(|e| e.to_string())?;
    // containerd-shim reads CPU usage only from v2's cpu.stat; on v1 it is cpuacct's.
    if let Some(usage) = cpuacct_usage(pid) {
        metrics.mut_cpu().mut_usage().set_total(usage);
    }
    convert_to_any(Box::new(metrics)).map_err(|e| e.to_string())
}

/// Total CPU time (ns) from the v1 cpuacct controller of `pid`'s cgroup.
fn cpuacct_usage(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "cpuacct")
            .then(|| (controllers.to_string(), path.to_string()))
    })?;
    let (controllers, path) = path;
    let mount = ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct"]
        .into_iter()
        .map(String::from)
        .chain(std::iter::once(format!("/sys/fs/cgroup/{controllers}")))
        .find(|m| std::path::Path::new(m).join("cpuacct.usage").exists())?;
    std::fs::read_to_string(format!("{mount}{path}/cpuacct.usage"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
