//! `pids` controller: the same `pids.max`/`pids.current` files in v1 and v2.

use std::path::Path;

use oci_spec::runtime::LinuxPids;

use crate::cgroups::{
    fs::{self, Setting},
    stats::PidsStats,
    CgroupError,
};

/// `pids.max`: a positive limit, `max` for a negative one; 0 means "not set" (runc).
pub(crate) fn settings(p: &LinuxPids) -> Vec<Setting> {
    match p.limit() {
        0 => vec![],
        l if l < 0 => vec![Setting::new("pids.max", "max")],
        l => vec![Setting::new("pids.max", l)],
    }
}

pub(crate) fn stats(controller: &'static str, dir: &Path) -> Result<PidsStats, CgroupError> {
    Ok(PidsStats {
        current: fs::read_u64_optional(controller, dir, "pids.current")?.unwrap_or(0),
        limit: fs::read_u64_optional(controller, dir, "pids.max")?.unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxPidsBuilder;

    #[test]
    fn limit_values() {
        let p = |l: i64| settings(&LinuxPidsBuilder::default().limit(l).build().unwrap());
        assert_eq!(p(64), [Setting::new("pids.max", 64)]);
        assert_eq!(p(-1), [Setting::new("pids.max", "max")]);
        assert!(p(0).is_empty());
    }
}
