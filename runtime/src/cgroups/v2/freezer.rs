//! v2 freezer: `cgroup.freeze` (Linux ≥ 5.2), completion reported by `frozen 1` in
//! `cgroup.events`.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::cgroups::{fs, CgroupError};

const TIMEOUT: Duration = Duration::from_secs(10);

fn frozen(dir: &Path) -> Result<bool, CgroupError> {
    let events = fs::read("freezer", dir, "cgroup.events")?;
    Ok(fs::parse_flat_keyed(&events).get("frozen") == Some(&1))
}

pub(crate) fn freeze(dir: &Path) -> Result<(), CgroupError> {
    fs::write("freezer", dir, "cgroup.freeze", "1")?;
    let start = Instant::now();
    let mut delay = Duration::from_millis(1);
    while !frozen(dir)? {
        if start.elapsed() > TIMEOUT {
            let _ = fs::write("freezer", dir, "cgroup.freeze", "0");
            return Err(CgroupError::Timeout {
                controller: "freezer",
                what: "frozen 1",
                path: dir.join("cgroup.events"),
            });
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

pub(crate) fn thaw(dir: &Path) -> Result<(), CgroupError> {
    fs::write("freezer", dir, "cgroup.freeze", "0")
}

pub(crate) fn is_frozen(dir: &Path) -> Result<bool, CgroupError> {
    frozen(dir)
}
