//! cgroup manager against the host's real cgroups. Needs root (CI runs as root) and works on
//! v1, v2 and hybrid hosts; the build hosts are hybrid, which is what these tests exercise
//! most. Each test uses its own cgroup under `/palisade-cg-test/` and removes it.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use oci_spec::runtime::{
    LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxHugepageLimitBuilder, LinuxMemoryBuilder,
    LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder, LinuxThrottleDeviceBuilder,
};
use palisade_runtime::cgroups::{detect_mode, Cgroup, CgroupMode, OomEvent};

const PARENT: &str = "/palisade-cg-test";

/// A cgroup for one test (`/palisade-cg-test/<name>-<pid>/ctr`), destroyed on drop; the
/// drop checks that `destroy` removed the container's directories but not their parent,
/// then removes the parents itself.
struct TestCgroup(Cgroup);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        Self::under(PARENT, name)
    }

    fn under(parent: &str, name: &str) -> TestCgroup {
        let path = format!("{parent}/{name}-{}/ctr", std::process::id());
        let cg = Cgroup::new(Some(&path), name).expect("resolve cgroup");
        cg.create().expect("create cgroup");
        TestCgroup(cg)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let result = self.0.destroy();
        if !thread::panicking() {
            result.expect("destroy");
        }
        for d in self.0.dirs() {
            let parent = d.parent().unwrap();
            if !thread::panicking() {
                assert!(!d.exists(), "{} left behind", d.display());
                assert!(parent.exists(), "destroy removed {}", parent.display());
            }
            let _ = fs::remove_dir(parent);
            // Fails while other tests still use it; the last one removes it.
            let _ = fs::remove_dir(parent.parent().unwrap());
        }
    }
}

/// A forked child that waits (blocked on a pipe) until `release`, then runs `body` and
/// `_exit`s with its return value. `body` must only make raw system calls: the test harness
/// is multi-threaded, so the child may not allocate.
struct Child {
    pid: i32,
    go: i32,
}

impl Child {
    fn spawn(body: fn() -> i32) -> Child {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a writable array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child only calls async-signal-safe functions (read, close, body's raw
        // syscalls, _exit) before exiting.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut b = 0u8;
            // SAFETY: reading one byte into a local.
            unsafe {
                libc::close(fds[1]);
                libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                libc::_exit(body());
            }
        }
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(fds[0]) };
        Child { pid, go: fds[1] }
    }

    fn release(&self) {
        // SAFETY: writing one byte from a local to our pipe.
        assert_eq!(unsafe { libc::write(self.go, b"x".as_ptr().cast(), 1) }, 1);
    }

    /// Waits for the child; returns the raw wait status.
    fn wait(&self) -> i32 {
        let mut status = 0;
        // SAFETY: `status` is a writable int.
        assert_eq!(unsafe { libc::waitpid(self.pid, &mut status, 0) }, self.pid);
        status
    }

    /// utime + stime of the child, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5); `after` starts at field 3.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: plain syscalls on our own child and fd; harmless if it already exited.
        unsafe {
            libc::close(self.go);
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG);
        }
    }
}

/// Touches 4 MiB of fresh memory (so the cgroup is charged for it: v1 does not move
/// charges with a migrating task) and then burns CPU forever.
fn spin() -> i32 {
    touch_anonymous(4 << 20);
    loop {
        std::hint::spin_loop();
    }
}

fn read(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.join(file).display()))
        .trim()
        .to_string()
}

fn resources() -> LinuxResources {
    LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64 << 20)
                .reservation(32 << 20)
                .build()
                .unwrap(),
        )
        .pids(LinuxPidsBuilder::default().limit(32).build().unwrap())
        .cpu(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(50_000)
                .period(100_000u64)
                .cpus("0")
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

#[test]
fn mode_is_detected() {
    let mode = detect_mode().unwrap();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let has_v1 = mountinfo.contains(" - cgroup ");
    let has_v2 = mountinfo.contains(" - cgroup2 ");
    let expected = match (has_v1, has_v2) {
        (true, true) => CgroupMode::Hybrid,
        (true, false) => CgroupMode::V1,
        (false, true) => CgroupMode::V2,
        (false, false) => unreachable!("no cgroups mounted"),
    };
    assert_eq!(mode, expected);
}

#[test]
fn limits_are_written_to_the_cgroup_files() {
    let cg = TestCgroup::new("limits");
    cg.0.apply(&resources()).unwrap();
    match cg.0.mode() {
        CgroupMode::V1 | CgroupMode::Hybrid => {
            let mem = cg.0.v1_dir("memory").unwrap();
            assert_eq!(
                read(mem, "memory.limit_in_bytes"),
                (64u64 << 20).to_string()
            );
            assert_eq!(
                read(mem, "memory.soft_limit_in_bytes"),
                (32u64 << 20).to_string()
            );
            assert_eq!(read(cg.0.v1_dir("pids").unwrap(), "pids.max"), "32");
            let cpu = cg.0.v1_dir("cpu").unwrap();
            assert_eq!(read(cpu, "cpu.shares"), "512");
            assert_eq!(read(cpu, "cpu.cfs_quota_us"), "50000");
            assert_eq!(read(cpu, "cpu.cfs_period_us"), "100000");
            assert_eq!(read(cg.0.v1_dir("cpuset").unwrap(), "cpuset.cpus"), "0");
            // The default device policy: deny all, then the default devices.
            let devices = read(cg.0.v1_dir("devices").unwrap(), "devices.list");
            assert!(devices.contains("c 1:3 rwm"), "{devices}");
            assert!(!devices.contains("a *:* rwm"), "{devices}");
        }
        CgroupMode::V2 => {
            let dir = &cg.0.unified().unwrap().dir;
            assert_eq!(read(dir, "memory.max"), (64u64 << 20).to_string());
            assert_eq!(read(dir, "memory.low"), (32u64 << 20).to_string());
            assert_eq!(read(dir, "pids.max"), "32");
            assert_eq!(read(dir, "cpu.weight"), "20");
            assert_eq!(read(dir, "cpu.max"), "50000 100000");
            assert_eq!(read(dir, "cpuset.cpus"), "0");
        }
    }

    // update: only what is given changes.
    let update = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(-1).build().unwrap())
        .build()
        .unwrap();
    cg.0.apply(&update).unwrap();
    let pids_dir =
        cg.0.v1_dir("pids")
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cg.0.unified().unwrap().dir.clone());
    assert_eq!(read(&pids_dir, "pids.max"), "max");
    if let Some(mem) = cg.0.v1_dir("memory") {
        assert_eq!(
            read(mem, "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
    }
}

#[test]
fn bad_values_fail_with_the_field_or_file_named() {
    let cg = TestCgroup::new("bad");
    let too_small = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(-7).build().unwrap())
        .build()
        .unwrap();
    let e = cg.0.apply(&too_small).unwrap_err().to_string();
    assert!(e.starts_with("linux.resources.memory.limit"), "{e}");

    // The kernel rejects a cpuset outside the parent's: the error names file and value.
    let bad_cpus = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().cpus("999").build().unwrap())
        .build()
        .unwrap();
    let e = cg.0.apply(&bad_cpus).unwrap_err().to_string();
    assert!(e.starts_with("cgroup cpuset: write 999 to "), "{e}");
    assert!(e.contains("cpuset.cpus: "), "{e}");
}

#[test]
fn process_is_added_frozen_thawed_counted_and_killed_on_destroy() {
    let cg = TestCgroup::new("freeze");
    cg.0.apply(&resources()).unwrap();
    let child = Child::spawn(spin);
    cg.0.add_process(child.pid).unwrap();
    child.release();
    assert_eq!(cg.0.pids().unwrap(), [child.pid]);
    for dir in cg.0.dirs() {
        let procs = read(dir, "cgroup.procs");
        assert_eq!(procs, child.pid.to_string(), "{}", dir.display());
    }

    // Let it burn some CPU, then freeze: its CPU time must stop moving.
    thread::sleep(Duration::from_millis(300));
    cg.0.freeze().unwrap();
    assert!(cg.0.is_frozen().unwrap());
    let frozen_at = child.cpu_ticks();
    thread::sleep(Duration::from_millis(400));
    assert_eq!(child.cpu_ticks(), frozen_at, "a frozen process ran");

    cg.0.thaw().unwrap();
    assert!(!cg.0.is_frozen().unwrap());
    let mut resumed = false;
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        if child.cpu_ticks() > frozen_at {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "the process did not run after thaw");

    let stats = cg.0.stats().unwrap();
    assert_eq!(stats.mode, Some(cg.0.mode()));
    assert!(stats.cpu.usage.total_ns > 0, "{stats:?}");
    assert!(stats.memory.usage.usage > 0, "{stats:?}");
    assert_eq!(stats.memory.usage.limit, 64 << 20);
    assert_eq!(stats.pids.current, 1);
    assert_eq!(stats.pids.limit, 32);
    if cg.0.mode() != CgroupMode::V2 {
        assert!(!stats.cpu.usage.per_cpu_ns.is_empty());
    }
    let json = serde_json::to_string(&stats).unwrap();
    assert!(json.contains("\"total_ns\""));

    // destroy kills what is left and removes every directory; a second destroy is a no-op.
    cg.0.destroy().unwrap();
    let status = child.wait();
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    for d in cg.0.dirs() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    cg.0.destroy().unwrap();
}

/// Opens a device node that is not in the default list; the exit code is the errno.
fn open_kmsg_node() -> i32 {
    // SAFETY: a NUL-terminated literal path; the fd (if any) dies with the process.
    let fd = unsafe { libc::open(c"/dev/kmsg".as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
    if fd >= 0 {
        return 0;
    }
    // SAFETY: reading errno of this thread.
    let errno = unsafe { *libc::__errno_location() };
    // Control: a default device must still open.
    // SAFETY: as above.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    if null < 0 {
        return 100;
    }
    errno
}

#[test]
fn device_policy_denies_non_default_devices() {
    if !Path::new("/dev/kmsg").exists() {
        panic!("/dev/kmsg is needed as a non-default device node");
    }
    let cg = TestCgroup::new("devices");
    let child = Child::spawn(open_kmsg_node);
    cg.0.add_process(child.pid).unwrap();
    child.release();
    let status = child.wait();
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), libc::EPERM, "open /dev/kmsg");
}

/// Maps and writes `len` bytes of anonymous memory (no allocator: raw mmap, safe after fork).
fn touch_anonymous(len: usize) -> i32 {
    // SAFETY: a fresh private anonymous mapping, written only inside its bounds.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return 2;
        }
        let bytes = p.cast::<u8>();
        let mut off = 0;
        while off < len {
            *bytes.add(off) = 1;
            off += 4096;
        }
    }
    0
}

fn eat_memory() -> i32 {
    touch_anonymous(256 << 20)
}

#[test]
fn oom_kill_is_counted_and_reported() {
    let cg = TestCgroup::new("oom");
    let limit = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(32 << 20)
                .swap(32 << 20)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    cg.0.apply(&limit).unwrap();
    let mut watcher = cg.0.oom_watcher().unwrap();
    assert_eq!(watcher.check().unwrap(), None, "no event before any OOM");
    assert_eq!(cg.0.oom_kill_count().unwrap(), 0);

    let child = Child::spawn(eat_memory);
    cg.0.add_process(child.pid).unwrap();
    child.release();
    let status = child.wait();
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "status {status:#x}"
    );
    assert_eq!(cg.0.oom_kill_count().unwrap(), 1);
    let event = watcher.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(event, Some(OomEvent::Oom { kills: 1 }));
    assert_eq!(cg.0.stats().unwrap().memory.oom_kill, 1);

    // Removing the cgroup ends the event stream.
    cg.0.destroy().unwrap();
    let end = watcher.wait(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(end, Some(OomEvent::Removed) | None), "{end:?}");
}

#[test]
fn hugetlb_limits_land_in_whichever_hierarchy_has_the_controller() {
    // A parent of its own: enabling hugetlb on cgroup2 (hybrid) marks every ancestor, and
    // the root can only be restored once no other test's cgroup is below it with it.
    let parent = format!("/palisade-cg-hugetlb-{}", std::process::id());
    let cg = TestCgroup::under(&parent, "hugetlb");
    let r = LinuxResourcesBuilder::default()
        .hugepage_limits(vec![LinuxHugepageLimitBuilder::default()
            .page_size("2MB")
            .limit(4 << 20)
            .build()
            .unwrap()])
        .build()
        .unwrap();
    let root_before =
        cg.0.unified()
            .and_then(|u| fs::read_to_string(u.mount_point.join("cgroup.subtree_control")).ok())
            .unwrap_or_default();
    cg.0.apply(&r).unwrap();
    // v1 hugetlb when mounted; otherwise (the hybrid build hosts) cgroup2, enabled on demand.
    let (dir, file) = match cg.0.v1_dir("hugetlb") {
        Some(d) => (d.to_path_buf(), "hugetlb.2MB.limit_in_bytes"),
        None => (cg.0.unified().unwrap().dir.clone(), "hugetlb.2MB.max"),
    };
    assert_eq!(read(&dir, file), (4u64 << 20).to_string());
    let stats = cg.0.stats().unwrap();
    assert_eq!(stats.hugetlb["2MB"].limit, 4 << 20, "{:?}", stats.hugetlb);

    let bad = LinuxResourcesBuilder::default()
        .hugepage_limits(vec![LinuxHugepageLimitBuilder::default()
            .page_size("3MB")
            .limit(1)
            .build()
            .unwrap()])
        .build()
        .unwrap();
    let e = cg.0.apply(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with("linux.resources.hugepageLimits[0].pageSize"),
        "{e}"
    );
    drop(cg);
    if let Some(u) = Cgroup::new(None, "x").unwrap().unified() {
        // Leave the host's root cgroup as we found it.
        if !root_before.contains("hugetlb") && cgroup_mode_is_hybrid() {
            let _ = fs::write(u.mount_point.join("cgroup.subtree_control"), "-hugetlb");
        }
    }
}

fn cgroup_mode_is_hybrid() -> bool {
    detect_mode().unwrap() == CgroupMode::Hybrid
}

/// `major:minor` of the first real (non-loop, non-ram) block device.
fn a_block_device() -> (i64, i64) {
    let mut names: Vec<_> = fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"))
        .collect();
    names.sort();
    let dev = fs::read_to_string(format!("/sys/block/{}/dev", names[0])).unwrap();
    let (major, minor) = dev.trim().split_once(':').unwrap();
    (major.parse().unwrap(), minor.parse().unwrap())
}

#[test]
fn block_io_weight_and_throttle() {
    let cg = TestCgroup::new("blkio");
    let (major, minor) = a_block_device();
    let r = LinuxResourcesBuilder::default()
        .block_io(
            LinuxBlockIoBuilder::default()
                .weight(300u16)
                .throttle_read_bps_device(vec![LinuxThrottleDeviceBuilder::default()
                    .major(major)
                    .minor(minor)
                    .rate(1_048_576u64)
                    .build()
                    .unwrap()])
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    cg.0.apply(&r).unwrap();
    let dev = format!("{major}:{minor}");
    if let Some(dir) = cg.0.v1_dir("blkio") {
        let throttle = read(dir, "blkio.throttle.read_bps_device");
        assert_eq!(throttle, format!("{dev} 1048576"));
        let weight_file = ["blkio.weight", "blkio.bfq.weight"]
            .into_iter()
            .find(|f| dir.join(f).exists())
            .unwrap();
        // BFQ prints "default 300".
        assert!(read(dir, weight_file).ends_with("300"), "{weight_file}");
    } else if let Some(u) = cg.0.unified() {
        let max = read(&u.dir, "io.max");
        assert!(max.starts_with(&format!("{dev} rbps=1048576")), "{max}");
    }
}

#[test]
fn unified_keys_that_escape_are_rejected_on_the_host() {
    let cg = TestCgroup::new("unified");
    let mut map = std::collections::HashMap::new();
    map.insert("../../cgroup.procs".to_string(), "1".to_string());
    let r = LinuxResourcesBuilder::default()
        .unified(map)
        .build()
        .unwrap();
    let e = cg.0.apply(&r).unwrap_err().to_string();
    assert!(e.starts_with("linux.resources.unified"), "{e}");
}

#[test]
fn paths_resolve_per_hierarchy() {
    let cg = Cgroup::new(None, "abc").unwrap();
    assert_eq!(cg.path(), "/palisade/abc");
    for h in cg.v1_hierarchies() {
        assert_eq!(h.dir, h.mount_point.join("palisade/abc"));
        assert!(!h.mount_options().is_empty());
    }
    let rel = Cgroup::new(Some("sub/x"), "abc").unwrap();
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    if let Some(mem) = rel.v1_dir("memory") {
        let line = own
            .lines()
            .find(|l| l.split(':').nth(1) == Some("memory"))
            .unwrap();
        let own_path = line.splitn(3, ':').nth(2).unwrap();
        let expected: PathBuf = Path::new("/sys/fs/cgroup/memory")
            .join(own_path.trim_start_matches('/'))
            .join("sub/x");
        assert_eq!(mem, expected);
    }
    let e = Cgroup::new(Some("/"), "abc").unwrap_err().to_string();
    assert!(e.contains("root cgroup"), "{e}");
    let e = Cgroup::new(Some("system.slice:palisade:abc"), "abc")
        .unwrap_err()
        .to_string();
    assert!(e.contains("systemd"), "{e}");
}
