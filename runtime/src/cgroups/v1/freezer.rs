//! v1 `freezer` controller. Writing `FROZEN` starts freezing; the state reads `FREEZING`
//! until every task stopped, and a task that was in the middle of a fork can make the kernel
//! give up, so the write is repeated until the state reads `FROZEN` (runc does the same).

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::cgroups::{fs, CgroupError};

const STATE: &str = "freezer.state";
const TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn freeze(dir: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(1);
    loop {
        fs::write("freezer", dir, STATE, "FROZEN")?;
        if fs::read("freezer", dir, STATE)?.trim() == "FROZEN" {
            return Ok(());
        }
        if start.elapsed() > TIMEOUT {
            // Leave the cgroup usable rather than half frozen.
            let _ = fs::write("freezer", dir, STATE, "THAWED");
            return Err(CgroupError::Timeout {
                controller: "freezer",
                what: "FROZEN",
                path: dir.join(STATE),
            });
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

pub(crate) fn thaw(dir: &Path) -> Result<(), CgroupError> {
    fs::write("freezer", dir, STATE, "THAWED")
}

pub(crate) fn is_frozen(dir: &Path) -> Result<bool, CgroupError> {
    Ok(fs::read("freezer", dir, STATE)?.trim() == "FROZEN")
}
