//! Leak checker for the reliability suite: snapshot the host's resources before a run,
//! snapshot again after, and name every leftover.
//!
//! What is compared:
//! - mounts (`/proc/self/mountinfo`: mount point, type, source),
//! - cgroup directories in every hierarchy under `/sys/fs/cgroup` (the v1 controllers and
//!   the unified mount of this hybrid host, or a pure cgroup2 tree),
//! - processes (pid + start time, so a reused pid is a new process),
//! - the entries directly inside the watched state directories (per-container state lives
//!   one level down: a runtime root's `<id>/`, containerd's bundle `<id>/`),
//! - unix sockets and FIFOs anywhere below the scope's trees, and named files (e.g. shim
//!   sockets, whose names are hashes outside any tree),
//! - tun/tap network devices.
//!
//! The machine is shared (other tests and people create containers at the same time), so
//! a new mount, cgroup or process is attributed to the run under test only if its path,
//! command line or cgroup contains one of the scope's *markers* (e.g. a private
//! containerd's directory and namespace). Tun/tap devices and everything below the
//! scope's directories are compared strictly. Teardown is asynchronous (a shim exits
//! after containerd's last Delete), so [`LeakChecker::settle`] re-checks until clean or a
//! deadline passes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::containerd::Containerd;

/// What belongs to the run under test.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Substrings that attribute a mount (point or source), cgroup path or process
    /// (command line or cgroup membership) to the run.
    pub markers: Vec<String>,
    /// Directories whose direct entries are per-container state.
    pub state_dirs: Vec<PathBuf>,
    /// Directory trees searched (recursively) for unix sockets and FIFOs.
    pub trees: Vec<PathBuf>,
    /// Individual paths that must not exist after the run unless they did before.
    pub files: BTreeSet<PathBuf>,
    /// Processes the test itself started on purpose (e.g. a restarted containerd).
    pub expected_pids: BTreeSet<i32>,
}

impl Scope {
    /// A scope with `markers` only.
    pub fn with_markers<I, S>(markers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            markers: markers.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Everything a private containerd and palisade's shim create for its tasks:
    /// containerd's directory (bundles, FIFOs given with `--fifo-dir` below it), the
    /// runtime root, the containers' cgroups `/<namespace>/<id>` and the entries of the
    /// per-namespace bundle and runtime-state directories. The per-namespace parents
    /// themselves (cgroup `/<namespace>`, `runtime_root/<namespace>`) are shared by every
    /// container of the namespace and stay, as with runc; what is below them is checked.
    /// `runtime_root` is the shim's `[native] runtime_root`; the runtime keeps the
    /// namespace's containers in `runtime_root/<namespace>`, which is all that is watched
    /// (other tests may share the root with other namespaces).
    pub fn for_containerd(ctrd: &Containerd, runtime_root: &Path) -> Self {
        let runtime_dir = runtime_root.join(ctrd.namespace());
        let mut scope = Self::with_markers([
            ctrd.dir().display().to_string(),
            format!("/{}/", ctrd.namespace()),
            format!("{}/", runtime_dir.display()),
        ]);
        scope.state_dirs = vec![
            ctrd.state_dir()
                .join("io.containerd.runtime.v2.task")
                .join(ctrd.namespace()),
            runtime_dir.clone(),
        ];
        scope.trees = vec![ctrd.dir().to_path_buf(), runtime_dir];
        scope
    }

    /// Also require the shim socket of pod (grouping) `id` to be gone afterwards.
    pub fn add_shim_socket(&mut self, ctrd: &Containerd, id: &str) {
        self.files.insert(ctrd.shim_socket_path(id));
    }

    fn attributed(&self, text: &str) -> bool {
        self.markers
            .iter()
            .any(|m| !m.is_empty() && text.contains(m.as_str()))
    }
}

/// One leftover resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leak {
    Mount { point: String, detail: String },
    Cgroup(PathBuf),
    Process { pid: i32, cmdline: String },
    State(PathBuf),
    Socket(PathBuf),
    Fifo(PathBuf),
    File(PathBuf),
    Tap(String),
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leak::Mount { point, detail } => write!(f, "mount {point} ({detail})"),
            Leak::Cgroup(p) => write!(f, "cgroup {}", p.display()),
            Leak::Process { pid, cmdline } => write!(f, "process {pid} ({cmdline})"),
            Leak::State(p) => write!(f, "state entry {}", p.display()),
            Leak::Socket(p) => write!(f, "unix socket {}", p.display()),
            Leak::Fifo(p) => write!(f, "fifo {}", p.display()),
            Leak::File(p) => write!(f, "file {}", p.display()),
            Leak::Tap(n) => write!(f, "tap device {n}"),
        }
    }
}

/// A process as seen in /proc.
#[derive(Debug, Clone)]
struct ProcInfo {
    cmdline: String,
    cgroup: String,
    zombie: bool,
}

/// Host resources at one moment.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    /// mount point -> "type source" (one line per mount on that point).
    mounts: BTreeSet<(String, String)>,
    cgroups: BTreeSet<PathBuf>,
    /// (pid, start time in clock ticks) -> info.
    processes: BTreeMap<(i32, u64), ProcInfo>,
    state: BTreeSet<PathBuf>,
    sockets: BTreeSet<PathBuf>,
    fifos: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    taps: BTreeSet<String>,
}

/// A "before" snapshot of a scope; [`LeakChecker::leaks`] diffs the present against it.
#[derive(Debug)]
pub struct LeakChecker {
    scope: Scope,
    before: Snapshot,
}

impl LeakChecker {
    /// Snapshots the host now.
    pub fn new(scope: Scope) -> Self {
        let before = snapshot(&scope);
        Self { scope, before }
    }

    /// The scope, for adding paths learnt during the run (e.g. shim sockets).
    pub fn scope_mut(&mut self) -> &mut Scope {
        &mut self.scope
    }

    /// Everything attributed to the scope that exists now and did not before.
    pub fn leaks(&self) -> Vec<Leak> {
        let now = snapshot(&self.scope);
        let before = &self.before;
        let mut leaks = Vec::new();
        for (point, detail) in now.mounts.difference(&before.mounts) {
            if self.scope.attributed(point) || self.scope.attributed(detail) {
                leaks.push(Leak::Mount {
                    point: point.clone(),
                    detail: detail.clone(),
                });
            }
        }
        for cgroup in now.cgroups.difference(&before.cgroups) {
            // Matched without a trailing slash: a marker `/<ns>/` attributes the
            // containers' cgroups below the per-namespace parent, not the parent itself.
            if self.scope.attributed(&cgroup.display().to_string()) {
                leaks.push(Leak::Cgroup(cgroup.clone()));
            }
        }
        for ((pid, start), info) in &now.processes {
            if before.processes.contains_key(&(*pid, *start))
                || self.scope.expected_pids.contains(pid)
            {
                continue;
            }
            if self.scope.attributed(&info.cmdline) || self.scope.attributed(&info.cgroup) {
                let state = if info.zombie { " <zombie>" } else { "" };
                leaks.push(Leak::Process {
                    pid: *pid,
                    cmdline: format!("{}{state}", info.cmdline),
                });
            }
        }
        leaks.extend(
            now.state
                .difference(&before.state)
                .cloned()
                .map(Leak::State),
        );
        leaks.extend(
            now.sockets
                .difference(&before.sockets)
                .cloned()
                .map(Leak::Socket),
        );
        leaks.extend(now.fifos.difference(&before.fifos).cloned().map(Leak::Fifo));
        leaks.extend(now.files.difference(&before.files).cloned().map(Leak::File));
        leaks.extend(now.taps.difference(&before.taps).cloned().map(Leak::Tap));
        leaks.sort();
        leaks.dedup();
        leaks
    }

    /// Re-checks until nothing is left or `timeout` passes; returns what is left then.
    pub fn settle(&self, timeout: Duration) -> Vec<Leak> {
        let deadline = Instant::now() + timeout;
        loop {
            let leaks = self.leaks();
            if leaks.is_empty() || Instant::now() >= deadline {
                return leaks;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A readable multi-line list of leaks (for assertion messages).
pub fn describe(leaks: &[Leak]) -> String {
    leaks
        .iter()
        .map(|l| format!("  - {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn snapshot(scope: &Scope) -> Snapshot {
    let mut snap = Snapshot {
        mounts: mounts(),
        ..Default::default()
    };
    walk_cgroups(Path::new("/sys/fs/cgroup"), 0, &mut snap.cgroups);
    snap.processes = processes();
    for dir in &scope.state_dirs {
        if let Ok(entries) = fs::read_dir(dir) {
            snap.state.extend(entries.flatten().map(|e| e.path()));
        }
    }
    for tree in &scope.trees {
        walk_special_files(tree, 0, &mut snap);
    }
    snap.files = scope
        .files
        .iter()
        .filter(|p| fs::symlink_metadata(p).is_ok())
        .cloned()
        .collect();
    snap.taps = tap_devices();
    snap
}

fn mounts() -> BTreeSet<(String, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
            let fields: Vec<&str> = line.split(' ').collect();
            let point = crate::containerd::unescape_mountinfo(fields.get(4)?);
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(dash + 1)?;
            let source = crate::containerd::unescape_mountinfo(fields.get(dash + 2)?);
            Some((point, format!("{fstype} {source}")))
        })
        .collect()
}

/// Cgroup directories (bounded depth: containers nest at most a few levels).
fn walk_cgroups(dir: &Path, depth: usize, out: &mut BTreeSet<PathBuf>) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // A cgroup hierarchy holds only directories and control files; symlinks such as
        // /sys/fs/cgroup/cpu -> cpu,cpuacct are not followed (file_type does not).
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            let path = entry.path();
            if depth > 0 {
                out.insert(path.clone());
            }
            walk_cgroups(&path, depth + 1, out);
        }
    }
}

fn processes() -> BTreeMap<(i32, u64), ProcInfo> {
    let mut out = BTreeMap::new();
    for (pid, dir) in crate::procfs::pids() {
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state is the 1st, starttime the 20th.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        let zombie = fields.first() == Some(&"Z");
        let start = fields.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
        let comm = stat
            .split_once(" (")
            .and_then(|(_, r)| r.rsplit_once(") "))
            .map(|(c, _)| c.to_string())
            .unwrap_or_default();
        let cmdline = fs::read(dir.join("cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\0')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let cgroup = fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        out.insert(
            (pid, start),
            ProcInfo {
                cmdline: if cmdline.is_empty() {
                    format!("[{comm}]")
                } else {
                    cmdline
                },
                cgroup,
                zombie,
            },
        );
    }
    out
}

/// Unix sockets and FIFOs below `dir` (not following symlinks, not into other mounts'
/// container rootfs beyond a bounded depth).
fn walk_special_files(dir: &Path, depth: usize, snap: &mut Snapshot) {
    if depth > 12 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        let path = entry.path();
        if ft.is_socket() {
            snap.sockets.insert(path);
        } else if ft.is_fifo() {
            snap.fifos.insert(path);
        } else if ft.is_dir() {
            // A container's rootfs (busybox) holds no sockets of ours; skip the content
            // store and snapshots, which are large and hold none either.
            let name = entry.file_name();
            if name == "rootfs" || name == "io.containerd.content.v1.content" {
                continue;
            }
            if name == "io.containerd.snapshotter.v1.overlayfs" {
                continue;
            }
            walk_special_files(&path, depth + 1, snap);
        }
    }
}

/// tun/tap devices (they have a `tun_flags` attribute).
fn tap_devices() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for entry in entries.flatten() {
            if entry.path().join("tun_flags").exists() {
                out.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_state_entries_sockets_and_fifos_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::create_dir(state.join("old")).unwrap();
        let mut scope = Scope::with_markers([dir.path().display().to_string()]);
        scope.state_dirs.push(state.clone());
        scope.trees.push(dir.path().to_path_buf());
        scope.files.insert(dir.path().join("named"));
        let checker = LeakChecker::new(scope);
        assert_eq!(checker.leaks(), vec![]);

        fs::create_dir(state.join("c1")).unwrap();
        let sock = dir.path().join("deep/s.sock");
        fs::create_dir(dir.path().join("deep")).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let fifo = dir.path().join("deep/f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        fs::write(dir.path().join("named"), b"").unwrap();
        let leaks = checker.leaks();
        assert_eq!(
            leaks,
            vec![
                Leak::State(state.join("c1")),
                Leak::Socket(sock.clone()),
                Leak::Fifo(fifo.clone()),
                Leak::File(dir.path().join("named")),
            ],
            "{}",
            describe(&leaks)
        );

        fs::remove_dir(state.join("c1")).unwrap();
        fs::remove_file(&sock).unwrap();
        fs::remove_file(&fifo).unwrap();
        fs::remove_file(dir.path().join("named")).unwrap();
        assert_eq!(checker.settle(Duration::from_secs(1)), vec![]);
    }

    #[test]
    fn new_processes_are_attributed_by_marker() {
        let marker = format!("leak-marker-{}", std::process::id());
        let checker = LeakChecker::new(Scope::with_markers([marker.clone()]));
        // `sh -c 'read x' <marker>` waits on its stdin with the marker in its command line.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read x", &marker])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // An unrelated new process is not attributed.
        let mut other = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        thread::sleep(Duration::from_millis(200));
        let leaks = checker.leaks();
        child.kill().unwrap();
        other.kill().unwrap();
        child.wait().unwrap();
        other.wait().unwrap();
        assert!(
            matches!(leaks.as_slice(), [Leak::Process { pid, .. }] if *pid == child.id() as i32),
            "{leaks:?}"
        );
        assert_eq!(checker.leaks(), vec![]);
    }

    // Needs root (mounts a tmpfs).
    #[test]
    fn mounts_below_a_marker_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m");
        fs::create_dir(&target).unwrap();
        let checker = LeakChecker::new(Scope::with_markers([dir.path().display().to_string()]));
        nix::mount::mount(
            Some("leaktest"),
            &target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let leaks = checker.leaks();
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(
            leaks,
            vec![Leak::Mount {
                point: target.display().to_string(),
                detail: "tmpfs leaktest".into()
            }]
        );
        assert_eq!(checker.leaks(), vec![]);
    }
}
