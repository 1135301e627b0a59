//! cgroup management for containers: cgroup v1, v2 and hybrid hosts.
//!
//! A [`Cgroup`] is resolved once, without side effects, from `linux.cgroupsPath` and the
//! caller's mounts ([`Cgroup::new`]); it is plain data (serializable into the container's
//! `state.json`) naming the container's directory in every hierarchy, so later CLI calls
//! (`update`, `pause`, `delete`, ...) operate on exactly the same directories.
//!
//! Lifecycle, as the runtime uses it:
//! 1. [`Cgroup::create`]: make the directories (v1: one per hierarchy, including named ones
//!    like `name=systemd`; hybrid: also the cgroup2 one; v2: enable the controllers on the
//!    way down), populate v1 `cpuset`, and install the default device policy (deny all but
//!    the runtime-spec default devices).
//! 2. [`Cgroup::apply`] with `linux.resources` (also what `update` calls; absent fields are
//!    left alone, `devices` replaces the whole device policy).
//! 3. [`Cgroup::add_process`] with the container's init pid (before it execs).
//! 4. [`Cgroup::freeze`]/[`Cgroup::thaw`], [`Cgroup::pids`], [`Cgroup::stats`],
//!    [`Cgroup::oom_kill_count`], [`Cgroup::oom_watcher`] while it runs.
//! 5. [`Cgroup::destroy`]: kill whatever is left, remove the container's directories (and
//!    cgroups nested inside them) on every hierarchy. Idempotent; never touches parents.
//!
//! Which hierarchy serves a controller: on v1 and hybrid hosts the v1 hierarchy when the
//! controller is bound there, otherwise (hybrid only) the cgroup2 hierarchy if it offers the
//! controller (e.g. `hugetlb` on the build hosts); on v2 hosts always cgroup2.
//!
//! For the container's `/sys/fs/cgroup` mount, [`Cgroup::v1_hierarchies`] lists each v1
//! hierarchy (host mount point, controllers = mount options, the container's directory) and
//! [`Cgroup::unified`] the cgroup2 one.
//!
//! Errors name the controller, file and value: `cgroup memory: write 100 to
//! /sys/fs/cgroup/memory/palisade/x/memory.limit_in_bytes: Device or resource busy`.

mod devices;
mod error;
mod fs;
mod mountinfo;
mod oom;
mod path;
mod pids;
mod rdma;
pub mod stats;
mod v1;
mod v2;

use std::{
    io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

pub use error::CgroupError;
pub use mountinfo::{detect_mode, CgroupMode};
pub use oom::{OomEvent, OomWatcher};
pub use path::DEFAULT_PARENT;
pub use stats::Stats;

use mountinfo::{Mounts, ProcessCgroups};
use path::CgroupsPath;

/// One v1 hierarchy and the container's directory in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V1Hierarchy {
    /// Controllers bound to the hierarchy (e.g. `["cpu", "cpuacct"]`), or `["name=systemd"]`
    /// for a named one. Joined with `,` they are the `-o` options to mount it again.
    pub subsystems: Vec<String>,
    /// Where the hierarchy is mounted on the host, e.g. `/sys/fs/cgroup/memory`.
    pub mount_point: PathBuf,
    /// The container's cgroup directory, e.g. `/sys/fs/cgroup/memory/palisade/web`.
    pub dir: PathBuf,
}

impl V1Hierarchy {
    /// The `cgroup` filesystem mount options selecting this hierarchy (`cpu,cpuacct`).
    pub fn mount_options(&self) -> String {
        self.subsystems.join(",")
    }

    fn has(&self, subsystem: &str) -> bool {
        self.subsystems.iter().any(|s| s == subsystem)
    }
}

/// The cgroup2 hierarchy and the container's directory in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnifiedHierarchy {
    /// e.g. `/sys/fs/cgroup` (v2) or `/sys/fs/cgroup/unified` (hybrid).
    pub mount_point: PathBuf,
    /// e.g. `/sys/fs/cgroup/palisade/web`.
    pub dir: PathBuf,
}

/// A container's cgroup on every hierarchy of the host. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    mode: CgroupMode,
    /// The cleaned `cgroupsPath` (`/palisade/<id>` by default).
    path: String,
    v1: Vec<V1Hierarchy>,
    unified: Option<UnifiedHierarchy>,
}

/// How long `destroy` waits for killed processes to leave the cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

impl Cgroup {
    /// Resolves the container's cgroup directories from `linux.cgroupsPath` with runc's
    /// semantics: absolute (from each hierarchy's root), relative (below the caller's own
    /// cgroup), or `None` for `/palisade/<container_id>`; `..` cannot escape, the root
    /// itself and the systemd `slice:prefix:name` form are refused. Reads
    /// `/proc/self/{mountinfo,cgroup}`; creates nothing.
    pub fn new(cgroups_path: Option<&str>, container_id: &str) -> Result<Cgroup, CgroupError> {
        let path = CgroupsPath::parse(cgroups_path, container_id)?;
        Self::resolve(&path, &Mounts::read()?, &ProcessCgroups::read_self()?)
    }

    fn resolve(
        path: &CgroupsPath,
        mounts: &Mounts,
        own: &ProcessCgroups,
    ) -> Result<Cgroup, CgroupError> {
        let mode = mounts.mode()?;
        let v1 = mounts
            .v1
            .iter()
            .map(|m| {
                let own_path = m.subsystems.first().and_then(|s| own.v1.get(s));
                V1Hierarchy {
                    subsystems: m.subsystems.clone(),
                    mount_point: m.mount_point.clone(),
                    dir: path.dir_in(&m.mount_point, &m.root, own_path.map(String::as_str)),
                }
            })
            .collect();
        let unified = mounts.v2.as_ref().map(|m| UnifiedHierarchy {
            mount_point: m.mount_point.clone(),
            dir: path.dir_in(&m.mount_point, &m.root, own.v2.as_deref()),
        });
        Ok(Cgroup {
            mode,
            path: path.display(),
            v1,
            unified,
        })
    }

    /// How the host mounts cgroups.
    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// The cleaned `cgroupsPath`, e.g. `/palisade/web`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The v1 hierarchies (empty on a v2 host).
    pub fn v1_hierarchies(&self) -> &[V1Hierarchy] {
        &self.v1
    }

    /// The cgroup2 hierarchy (`None` on a pure v1 host).
    pub fn unified(&self) -> Option<&UnifiedHierarchy> {
        self.unified.as_ref()
    }

    /// The container's directory serving `subsystem` on v1 (`None` on v2 or if unmounted).
    pub fn v1_dir(&self, subsystem: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|h| h.has(subsystem))
            .map(|h| h.dir.as_path())
    }

    /// Every directory of the container (one per hierarchy, cgroup2 last).
    pub fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = self.v1.iter().map(|h| h.dir.as_path()).collect();
        if let Some(u) = &self.unified {
            dirs.push(&u.dir);
        }
        dirs
    }

    /// The directory whose `cgroup.procs` lists the container's processes.
    fn procs_dir(&self) -> Option<&Path> {
        if self.mode == CgroupMode::V2 {
            return self.unified.as_ref().map(|u| u.dir.as_path());
        }
        ["pids", "freezer", "memory", "cpu", "devices"]
            .iter()
            .find_map(|s| self.v1_dir(s))
            .or_else(|| self.v1.first().map(|h| h.dir.as_path()))
    }

    /// Creates the directories and installs the default device policy. If a step fails,
    /// the container directories this call created are removed again (ones that already
    /// existed, e.g. a cgroup shared on purpose, are left as they were).
    pub fn create(&self) -> Result<(), CgroupError> {
        let new_dirs: Vec<&Path> = self.dirs().into_iter().filter(|d| !d.exists()).collect();
        let result = self.create_inner();
        if result.is_err() {
            for dir in new_dirs {
                if let Err(e) = remove_tree(dir) {
                    tracing::warn!("cleaning up a half-created cgroup: {e}");
                }
            }
        }
        result
    }

    fn create_inner(&self) -> Result<(), CgroupError> {
        for h in &self.v1 {
            fs::create_dir_all(&h.dir)?;
            if h.has("cpuset") {
                v1::cpuset::populate(&h.mount_point, &h.dir)?;
            }
        }
        if let Some(u) = &self.unified {
            fs::create_dir_all(&u.dir)?;
            if self.mode == CgroupMode::V2 {
                v2::enable_controllers(&u.mount_point, &u.dir, None)?;
            }
        }
        self.apply_device_rules(&devices::effective_rules(&[])?)
    }

    fn apply_device_rules(&self, rules: &[devices::DeviceRule]) -> Result<(), CgroupError> {
        match self.mode {
            CgroupMode::V2 => match &self.unified {
                Some(u) => v2::devices::attach(&u.dir, rules),
                None => Err(CgroupError::NotMounted),
            },
            CgroupMode::V1 | CgroupMode::Hybrid => match self.v1_dir("devices") {
                Some(dir) => fs::write_all("devices", dir, &v1::devices::settings(rules)),
                None => Err(CgroupError::ControllerMissing {
                    field: "linux.resources.devices",
                    controller: "devices",
                }),
            },
        }
    }

    /// Applies `linux.resources`. Only the fields present are changed, so this is also the
    /// implementation of `update`.
    pub fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        match self.mode {
            CgroupMode::V2 => {
                let u = self.unified.as_ref().ok_or(CgroupError::NotMounted)?;
                v2::apply(&u.dir, r)?;
            }
            CgroupMode::V1 | CgroupMode::Hybrid => v1::apply(self, r)?,
        }
        if let Some(list) = r.devices() {
            self.apply_device_rules(&devices::effective_rules(list)?)?;
        }
        Ok(())
    }

    /// Moves process `pid` (and its threads) into the container's cgroup on every hierarchy.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            fs::write("cgroup", dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Freezes every process of the container; returns once they are all stopped.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.v1_dir("freezer") {
            return v1::freezer::freeze(dir);
        }
        match &self.unified {
            Some(u) => v2::freezer::freeze(&u.dir),
            None => Err(CgroupError::ControllerMissing {
                field: "pause",
                controller: "freezer",
            }),
        }
    }

    /// Resumes a frozen container.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.v1_dir("freezer") {
            return v1::freezer::thaw(dir);
        }
        match &self.unified {
            Some(u) => v2::freezer::thaw(&u.dir),
            None => Err(CgroupError::ControllerMissing {
                field: "resume",
                controller: "freezer",
            }),
        }
    }

    /// Whether the container's cgroup is frozen.
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        if let Some(dir) = self.v1_dir("freezer") {
            return v1::freezer::is_frozen(dir);
        }
        match &self.unified {
            Some(u) => v2::freezer::is_frozen(&u.dir),
            None => Ok(false),
        }
    }

    /// Pids of every process in the container's cgroup and the cgroups below it, sorted.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dir = self.procs_dir().ok_or(CgroupError::NotMounted)?;
        fs::procs_recursive(dir)
    }

    /// Resource usage (see [`stats`]).
    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let mut stats = match self.mode {
            CgroupMode::V2 => {
                let u = self.unified.as_ref().ok_or(CgroupError::NotMounted)?;
                v2::stats(&u.dir)?
            }
            CgroupMode::V1 | CgroupMode::Hybrid => v1::stats(self)?,
        };
        stats.mode = Some(self.mode);
        Ok(stats)
    }

    /// How many processes of the container the OOM killer has killed.
    pub fn oom_kill_count(&self) -> Result<u64, CgroupError> {
        match (self.mode, self.v1_dir("memory"), &self.unified) {
            (CgroupMode::V2, _, Some(u)) => v2::memory::oom_kill_count(&u.dir),
            (_, Some(dir), _) => v1::memory::oom_kill_count(dir),
            _ => Err(CgroupError::ControllerMissing {
                field: "oom_kill_count",
                controller: "memory",
            }),
        }
    }

    /// An OOM event source for the container (see [`OomWatcher`]).
    pub fn oom_watcher(&self) -> Result<OomWatcher, CgroupError> {
        match (self.mode, self.v1_dir("memory"), &self.unified) {
            (CgroupMode::V2, _, Some(u)) => OomWatcher::v2(&u.dir),
            (_, Some(dir), _) => OomWatcher::v1(dir),
            _ => Err(CgroupError::ControllerMissing {
                field: "oom_watcher",
                controller: "memory",
            }),
        }
    }

    /// Kills every process left in the container's cgroups and removes the container's
    /// directories (and any cgroup nested inside them) on every hierarchy. Parents are never
    /// removed. Succeeds if there is nothing to remove.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        let existing: Vec<&Path> = self.dirs().into_iter().filter(|d| d.exists()).collect();
        if existing.is_empty() {
            return Ok(());
        }
        self.kill_all()?;
        for dir in existing {
            remove_tree(dir)?;
        }
        Ok(())
    }

    /// SIGKILLs every process, freezing first (v1) so nothing can fork while we look, and
    /// waits until the cgroups are empty.
    fn kill_all(&self) -> Result<(), CgroupError> {
        let v2_dir = self
            .unified
            .as_ref()
            .map(|u| u.dir.as_path())
            .filter(|d| d.exists());
        // cgroup.kill (Linux ≥ 5.14) kills the whole subtree atomically.
        let killed_by_kernel = match v2_dir {
            Some(dir) if self.mode == CgroupMode::V2 && dir.join("cgroup.kill").exists() => {
                fs::write("cgroup", dir, "cgroup.kill", "1")?;
                true
            }
            _ => false,
        };
        let self_pid = std::process::id() as i32;
        let start = Instant::now();
        loop {
            let mut pids = Vec::new();
            for dir in self.dirs().into_iter().filter(|d| d.exists()) {
                pids.extend(fs::procs_recursive(dir)?);
            }
            pids.sort_unstable();
            pids.dedup();
            // Never kill ourselves, should the caller have joined the container's cgroup.
            pids.retain(|p| *p != self_pid);
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() > KILL_TIMEOUT {
                return Err(CgroupError::Busy {
                    path: self.procs_dir().unwrap_or(Path::new("/")).to_path_buf(),
                    pids,
                });
            }
            if !killed_by_kernel {
                let frozen = self.v1_dir("freezer").is_some() && self.freeze().is_ok();
                for pid in &pids {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
                if frozen {
                    // Killed tasks only die once they run again.
                    self.thaw()?;
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Removes `dir` and the cgroups below it, children first. A cgroup whose last task is
/// still exiting reports EBUSY for a moment, so rmdir is retried briefly.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let mut dirs = fs::subtree(dir)?;
    dirs.reverse();
    for d in dirs {
        let mut delay = Duration::from_millis(1);
        loop {
            match std::fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY) && delay < Duration::from_secs(1) =>
                {
                    thread::sleep(delay);
                    delay *= 2;
                }
                Err(source) => {
                    return Err(CgroupError::Io {
                        context: format!("remove {}", d.display()),
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mountinfo::{parse_mountinfo, parse_proc_cgroup};

    const HYBRID: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn resolves_every_hierarchy_on_a_hybrid_host() {
        let own = parse_proc_cgroup("4:memory:/process_api/a6\n1:cpu:/\n0::/\n");
        let path = CgroupsPath::parse(None, "web").unwrap();
        let cg = Cgroup::resolve(&path, &parse_mountinfo(HYBRID), &own).unwrap();
        assert_eq!(cg.mode(), CgroupMode::Hybrid);
        assert_eq!(
            cg.v1_dir("memory"),
            Some(Path::new("/sys/fs/cgroup/memory/palisade/web"))
        );
        assert_eq!(
            cg.v1_dir("name=systemd"),
            Some(Path::new("/sys/fs/cgroup/systemd/palisade/web"))
        );
        assert_eq!(
            cg.unified().unwrap().dir,
            PathBuf::from("/sys/fs/cgroup/unified/palisade/web")
        );
        assert_eq!(cg.dirs().len(), 5);
        assert_eq!(
            cg.procs_dir(),
            Some(Path::new("/sys/fs/cgroup/memory/palisade/web"))
        );

        // Relative paths follow the caller's own cgroup per hierarchy.
        let rel = CgroupsPath::parse(Some("ctr"), "web").unwrap();
        let cg = Cgroup::resolve(&rel, &parse_mountinfo(HYBRID), &own).unwrap();
        assert_eq!(
            cg.v1_dir("memory"),
            Some(Path::new("/sys/fs/cgroup/memory/process_api/a6/ctr"))
        );
        assert_eq!(cg.v1_dir("cpu"), Some(Path::new("/sys/fs/cgroup/cpu/ctr")));
    }

    #[test]
    fn state_round_trips_through_json() {
        let own = parse_proc_cgroup("0::/\n");
        let path = CgroupsPath::parse(Some("/k8s/pod/c"), "c").unwrap();
        let v2 = "25 22 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let cg = Cgroup::resolve(&path, &parse_mountinfo(v2), &own).unwrap();
        assert_eq!(cg.mode(), CgroupMode::V2);
        assert!(cg.v1_hierarchies().is_empty());
        let json = serde_json::to_string(&cg).unwrap();
        let back: Cgroup = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cg);
        assert_eq!(
            back.procs_dir(),
            Some(Path::new("/sys/fs/cgroup/k8s/pod/c"))
        );
    }

    /// Forks a child that spins until killed; returns its pid.
    fn spinning_child() -> i32 {
        // SAFETY: the child only spins (no allocation after fork in a threaded harness).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            loop {
                std::hint::spin_loop();
            }
        }
        pid
    }

    /// The v2 code paths (create with controller enabling, add, cgroup.freeze, stats,
    /// cgroup.kill + rmdir) on the real cgroup2 hierarchy, treating it as a pure v2 host.
    /// Needs root and a cgroup2 mount (on the hybrid build hosts: /sys/fs/cgroup/unified).
    #[test]
    fn v2_lifecycle_on_the_real_cgroup2_hierarchy() {
        let mounts = Mounts::read().unwrap();
        let v2_only = Mounts {
            v1: Vec::new(),
            v2: Some(mounts.v2.clone().expect("a cgroup2 mount")),
        };
        let own = ProcessCgroups::read_self().unwrap();
        let path = CgroupsPath::parse(
            Some(&format!("/palisade-v2-test-{}/ctr", std::process::id())),
            "ctr",
        )
        .unwrap();
        let cg = Cgroup::resolve(&path, &v2_only, &own).unwrap();
        assert_eq!(cg.mode(), CgroupMode::V2);
        let dir = cg.unified().unwrap().dir.clone();
        let parent = dir.parent().unwrap().to_path_buf();
        let root = cg.unified().unwrap().mount_point.clone();
        let root_enabled_before =
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();

        cg.create().unwrap();
        // Everything the root offers was enabled on the way down.
        let offered = v2::controllers(&cg.unified().unwrap().mount_point).unwrap();
        assert_eq!(v2::controllers(&dir).unwrap(), offered);

        let pid = spinning_child();
        let result = std::panic::catch_unwind(|| {
            cg.add_process(pid).unwrap();
            assert_eq!(cg.pids().unwrap(), [pid]);
            cg.freeze().unwrap();
            assert!(cg.is_frozen().unwrap());
            cg.thaw().unwrap();
            assert!(!cg.is_frozen().unwrap());
            std::thread::sleep(Duration::from_millis(100));
            let stats = cg.stats().unwrap();
            assert_eq!(stats.mode, Some(CgroupMode::V2));
            assert!(stats.cpu.usage.total_ns > 0, "{stats:?}");
        });
        let destroyed = cg.destroy();
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        let _ = std::fs::remove_dir(&parent);
        // Leave the host's root cgroup as we found it.
        let before: Vec<&str> = root_enabled_before.split_whitespace().collect();
        for c in v2::controllers(&root).unwrap_or_default() {
            if !before.contains(&c.as_str()) {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), format!("-{c}"));
            }
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        destroyed.unwrap();
        assert!(!dir.exists());
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    }
}
