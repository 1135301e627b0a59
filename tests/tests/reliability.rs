//! The native (host-side) parts of the reliability suite (issue 8): churn, faults,
//! concurrency and hostile requests through a real containerd and palisade's shim, each
//! ending with the leak checker's host-wide diff (palisade_tests::leaks).
//!
//! Needs root, containerd + ctr, and the shim built (`cargo build -p
//! containerd-shim-palisade-v2`). Every test here is `#[ignore]`d: they are long (churn) or
//! repeat what `tests/reliability/run.sh` measures, and that script runs them (CI: `run.sh
//! --quick` from tests/run.sh) with `--ignored --nocapture`, collecting the
//! `PALISADE-REL <part> cycles=.. faults=.. inputs=.. leaks=..` lines they print.
//! `PALISADE_REL_CHURN_CYCLES` sets the churn's cycle count (default 1000).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use palisade_tests::{
    bundle::default_config,
    containerd::{bin_dir, output_within, Containerd, Options, PALISADE_RUNTIME},
    hostile,
    image::ImageConfig,
    leaks::{describe, Leak, LeakChecker, Scope},
};

/// How long teardown (shim exit after the last Delete) may take before leftovers count.
const SETTLE: Duration = Duration::from_secs(15);

/// A private containerd whose palisade shims keep their runtime state in `runtime_root`.
struct Rig {
    ctrd: Containerd,
    runtime_root: PathBuf,
    _config: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        Self::with_runtime_root(None)
    }

    /// `runtime_root`: the native runtime's state root (default: a directory next to the
    /// shim config).
    fn with_runtime_root(runtime_root: Option<&Path>) -> Self {
        common::require_ctr();
        let shim = bin_dir().join("containerd-shim-palisade-v2");
        assert!(shim.exists(), "{} is not built", shim.display());
        let config_dir = tempfile::Builder::new()
            .prefix("palisade-rel-")
            .tempdir()
            .unwrap();
        let runtime_root = runtime_root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| config_dir.path().join("root"));
        let config = config_dir.path().join("configuration.toml");
        std::fs::write(
            &config,
            format!(
                "[shim]\ndefault_mode = \"native\"\n[native]\nengine = \"library\"\n\
                 runtime_root = \"{}\"\n[vm]\nvmm = \"/nonexistent/palisade-vmm\"\n",
                runtime_root.display()
            ),
        )
        .unwrap();
        let ctrd = Containerd::start_with(Options {
            env: vec![("PALISADE_CONFIG".into(), config.display().to_string())],
            ..Default::default()
        })
        .expect("start private containerd");
        ctrd.import_busybox(common::IMAGE, &ImageConfig::default())
            .expect("import busybox image");
        Self {
            ctrd,
            runtime_root,
            _config: config_dir,
        }
    }

    /// FIFOs of `ctr run` go below containerd's directory, inside the leak scope.
    fn fifo_dir(&self) -> PathBuf {
        self.ctrd.dir().join("fifo")
    }

    fn scope(&self) -> Scope {
        Scope::for_containerd(&self.ctrd, &self.runtime_root)
    }

    /// `ctr run -d` of a `sleep 1000` task `id`, once RUNNING; returns its init's host pid.
    fn run_sleeper(&self, id: &str) -> i32 {
        let out = self.run(&["-d"], id, &["/bin/sleep", "1000"]);
        assert!(out.status.success(), "{}", stderr(&out));
        self.ctrd
            .wait_task_status(id, "RUNNING", common::TIMEOUT)
            .unwrap();
        let pids = self.ctrd.task_pids(id).unwrap();
        *pids.first().expect("a running task has a pid")
    }

    /// `ctr run --runtime palisade --fifo-dir ... EXTRA IMAGE ID ARGS`.
    fn run(&self, extra: &[&str], id: &str, args: &[&str]) -> Output {
        let fifo_dir = self.fifo_dir().display().to_string();
        let mut all = vec![
            "run",
            "--runtime",
            PALISADE_RUNTIME,
            "--fifo-dir",
            &fifo_dir,
        ];
        all.extend_from_slice(extra);
        all.push(common::IMAGE);
        all.push(id);
        all.extend_from_slice(args);
        self.ctrd.ctr(&all).unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The line tests/reliability/run.sh collects.
fn report(part: &str, counts: &[(&str, usize)], leaks: &[Leak]) {
    let mut line = format!("PALISADE-REL {part}");
    for (key, value) in counts {
        line.push_str(&format!(" {key}={value}"));
    }
    line.push_str(&format!(" leaks={}", leaks.len()));
    println!("{line}");
    for leak in leaks {
        println!("PALISADE-REL-LEAK {part} {leak}");
    }
}

/// Waits for the teardown, reports the part and fails on any leftover.
fn finish(part: &str, checker: &LeakChecker, counts: &[(&str, usize)]) {
    let leaks = checker.settle(SETTLE);
    report(part, counts, &leaks);
    assert!(leaks.is_empty(), "{part} leaked:\n{}", describe(&leaks));
}

/// create/start/delete through the shim, `PALISADE_REL_CHURN_CYCLES` times: every cycle is a
/// `ctr run --rm` (container + task create, start, wait, task delete, shim exit, container
/// delete) whose output is checked; afterwards nothing may be left.
#[test]
#[ignore = "long; run by tests/reliability/run.sh"]
fn churn() {
    let cycles: usize = std::env::var("PALISADE_REL_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rig = Rig::new();
    let mut checker = LeakChecker::new(rig.scope());
    let started = Instant::now();
    // Failed cycles are collected (with what the shim logged about them), not fatal at
    // once: the count says how often it happens.
    let mut failures = Vec::new();
    for i in 0..cycles {
        let id = format!("churn-{i}");
        checker.scope_mut().add_shim_socket(&rig.ctrd, &id);
        let out = rig.run(&["--rm"], &id, &["/bin/echo", &format!("cycle {i}")]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || stdout != format!("cycle {i}\n") {
            // containerd's log (with the shim's) from this cycle's container creation on,
            // without the cgroup-write chatter; kept in full for a closer look.
            let log = std::fs::read_to_string(rig.ctrd.log_path()).unwrap_or_default();
            let kept = std::env::temp_dir().join(format!(
                "palisade-churn-{}-cycle-{i}.log",
                std::process::id()
            ));
            let _ = std::fs::write(&kept, &log);
            let first = log
                .lines()
                .position(|l| l.contains(&format!("key={id}")) || l.contains(&format!("id={id}")))
                .unwrap_or(0);
            let mut logged: Vec<&str> = log
                .lines()
                .skip(first)
                .filter(|l| !l.contains("cgroup write") && !l.contains("garbage collect"))
                .take(80)
                .collect();
            let note = format!("(full containerd log kept in {})", kept.display());
            logged.push(&note);
            failures.push(format!(
                "cycle {i}: {} stdout {stdout:?} stderr {:?}\n    {}",
                out.status,
                stderr(&out),
                logged.join("\n    ")
            ));
            // The container of a failed run may remain; remove it so the leak diff is about
            // the runtime, not this cycle.
            let _ = rig.ctrd.ctr(["tasks", "delete", "--force", &id]);
            let _ = rig.ctrd.ctr(["containers", "delete", &id]);
        }
        if (i + 1) % 100 == 0 {
            eprintln!(
                "churn: {} cycles in {:.1} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = started.elapsed();
    println!(
        "churn: {cycles} cycles in {:.1} s ({:.0} ms per cycle)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / cycles.max(1) as f64
    );
    let leaks = checker.settle(SETTLE);
    report(
        "native-churn",
        &[("cycles", cycles), ("failed", failures.len())],
        &leaks,
    );
    for failure in &failures {
        println!("PALISADE-REL-FAIL native-churn {failure}");
    }
    assert!(
        failures.is_empty(),
        "{} of {cycles} cycles failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        leaks.is_empty(),
        "native-churn leaked:\n{}",
        describe(&leaks)
    );
}

/// 20 pods at once, each its own shim; all succeed with their own output.
#[test]
#[ignore = "run by tests/reliability/run.sh"]
fn concurrent_pods() {
    const PODS: usize = 20;
    let rig = Rig::new();
    let mut checker = LeakChecker::new(rig.scope());
    let fifo_dir = rig.fifo_dir().display().to_string();
    let handles: Vec<_> = (0..PODS)
        .map(|n| {
            let id = format!("pod-{n}");
            checker.scope_mut().add_shim_socket(&rig.ctrd, &id);
            let mut cmd = rig.ctrd.ctr_command([
                "run",
                "--rm",
                "--runtime",
                PALISADE_RUNTIME,
                "--fifo-dir",
                &fifo_dir,
                common::IMAGE,
                &id,
                "/bin/sh",
                "-c",
                // Long enough that all pods are up at the same time.
                &format!("sleep 2; echo {id}"),
            ]);
            std::thread::spawn(move || output_within(&mut cmd, Duration::from_secs(180)))
        })
        .collect();
    for (n, handle) in handles.into_iter().enumerate() {
        let out = handle.join().unwrap().unwrap();
        assert!(out.status.success(), "pod-{n}: {}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("pod-{n}\n"));
    }
    finish("native-concurrency", &checker, &[("cycles", PODS)]);
}

/// kill -9 of a container's init from the host: the task stops with 137, a /tasks/exit
/// event says so, and deleting it leaves nothing.
#[test]
#[ignore = "run by tests/reliability/run.sh"]
fn init_killed() {
    let rig = Rig::new();
    let id = "victim";
    let mut checker = LeakChecker::new(rig.scope());
    checker.scope_mut().add_shim_socket(&rig.ctrd, id);
    let events = rig
        .ctrd
        .events_during(|| {
            let pid = rig.run_sleeper(id);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            rig.ctrd
                .wait_task_status(id, "STOPPED", common::TIMEOUT)
                .unwrap();
        })
        .expect("ctr events");
    let exit = events
        .lines()
        .find(|l| l.contains("/tasks/exit") && l.contains(id))
        .unwrap_or_else(|| panic!("no /tasks/exit event for {id} in:\n{events}"));
    assert!(exit.contains("\"exit_status\":137"), "{exit}");
    rig.ctrd.ctr_ok(["tasks", "delete", id]).unwrap();
    rig.ctrd.ctr_ok(["containers", "delete", id]).unwrap();
    finish("native-fault-init-kill9", &checker, &[("faults", 1)]);
}

/// A tmpfs mounted for the test, filled to the last byte; unmounted on drop.
struct FullTmpfs {
    dir: tempfile::TempDir,
}

impl FullTmpfs {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("palisade-full-")
            .tempdir()
            .unwrap();
        nix::mount::mount(
            Some("palisade-full"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .unwrap();
        // Fill it: write until the kernel says ENOSPC.
        use std::io::Write;
        let mut filler = std::fs::File::create(dir.path().join("filler")).unwrap();
        let chunk = [0u8; 4096];
        loop {
            match filler.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Everything in the file system except the filler.
    fn contents(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path != self.path().join("filler") {
                    found.push(path.clone());
                }
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(path);
                }
            }
        }
        found
    }
}

impl Drop for FullTmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The runtime's state directory on a full file system: create fails with an error naming
/// ENOSPC, and nothing is left (no state, shim, mount, cgroup, process).
#[test]
#[ignore = "run by tests/reliability/run.sh"]
fn state_dir_on_full_filesystem() {
    let full = FullTmpfs::new();
    let rig = Rig::with_runtime_root(Some(full.path()));
    let id = "nospace";
    let mut checker = LeakChecker::new(rig.scope());
    checker.scope_mut().add_shim_socket(&rig.ctrd, id);
    let out = rig.run(&["--rm"], id, &["/bin/true"]);
    assert!(!out.status.success(), "create on a full disk succeeded");
    let err = stderr(&out);
    assert!(err.contains("No space left on device"), "{err}");
    let _ = rig.ctrd.ctr(["containers", "delete", id]);
    // Only the (empty) per-namespace directory may remain; the container's state is gone.
    let ns_dir = full.path().join(rig.ctrd.namespace());
    let left: Vec<PathBuf> = full
        .contents()
        .into_iter()
        .filter(|p| p != &ns_dir)
        .collect();
    assert!(left.is_empty(), "left on the full runtime root: {left:?}");
    finish("native-fault-enospc", &checker, &[("faults", 1)]);
}

/// The hostile-input table through the shim: each malformed spec goes to containerd with
/// `ctr run --config` and must fail with the table's exact error, leaving nothing.
#[test]
#[ignore = "run by tests/reliability/run.sh"]
fn hostile_specs_through_the_shim() {
    let rig = Rig::new();
    let mut checker = LeakChecker::new(rig.scope());
    let specs = tempfile::tempdir().unwrap();
    // `ctr run --config` takes no image: the spec names its rootfs by absolute path.
    let rootfs = specs.path().join("rootfs");
    palisade_tests::image::write_busybox_rootfs(&rootfs).unwrap();
    let mut inputs = 0;
    for case in hostile::spec_cases().into_iter().filter(|c| c.via_shim) {
        let id = format!("hostile-{}", case.name);
        checker.scope_mut().add_shim_socket(&rig.ctrd, &id);
        let mut config = default_config(&["/bin/true"]);
        config["root"]["path"] = rootfs.display().to_string().into();
        assert!(case.apply(&mut config).is_none(), "{}: raw edit", case.name);
        let file = specs.path().join(format!("{}.json", case.name));
        std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
        let file = file.display().to_string();
        let fifo_dir = rig.fifo_dir().display().to_string();
        let out = rig
            .ctrd
            .ctr([
                "run",
                "--rm",
                "--runtime",
                PALISADE_RUNTIME,
                "--fifo-dir",
                &fifo_dir,
                "--config",
                &file,
                &id,
            ])
            .unwrap();
        assert!(!out.status.success(), "{}: accepted", case.name);
        let err = stderr(&out);
        assert!(
            err.contains(&case.expected),
            "{}: expected {:?} in {err:?}",
            case.name,
            case.expected
        );
        // ctr run --rm removes the task but not the container of a failed create.
        let _ = rig.ctrd.ctr(["containers", "delete", &id]);
        inputs += 1;
    }
    finish("hostile-shim-specs", &checker, &[("inputs", inputs)]);
}

/// Malformed Task API requests against a running task (through ctr): each fails with its
/// exact error, and the task keeps running, unaffected.
#[test]
#[ignore = "run by tests/reliability/run.sh"]
fn hostile_requests_through_the_shim() {
    let rig = Rig::new();
    let id = "target";
    let mut checker = LeakChecker::new(rig.scope());
    checker.scope_mut().add_shim_socket(&rig.ctrd, id);
    let pid = rig.run_sleeper(id);
    // A long-running exec, so that its id is taken.
    let mut holder = rig
        .ctrd
        .ctr_command([
            "tasks",
            "exec",
            "--exec-id",
            "held",
            id,
            "/bin/sleep",
            "1000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + common::TIMEOUT;
    while rig.ctrd.task_pids(id).unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "exec held never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let table: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "exec-missing-binary",
            vec!["tasks", "exec", "--exec-id", "e1", id, "/bin/nope"],
            "exec \"/bin/nope\": No such file or directory",
        ),
        (
            "exec-relative-cwd",
            vec![
                "tasks",
                "exec",
                "--cwd",
                "rel",
                "--exec-id",
                "e2",
                id,
                "/bin/true",
            ],
            "process.cwd: rel is not an absolute path",
        ),
        (
            "exec-duplicate-id",
            vec!["tasks", "exec", "--exec-id", "held", id, "/bin/true"],
            "already exists",
        ),
        (
            "kill-unknown-exec",
            vec!["tasks", "kill", "--exec-id", "nope", id],
            "exec nope of target not found",
        ),
        (
            "kill-bad-signal",
            vec!["tasks", "kill", "--signal", "99", id],
            "invalid signal 99",
        ),
        (
            "resume-not-paused",
            vec!["tasks", "resume", id],
            "is not paused",
        ),
        (
            "checkpoint",
            vec!["tasks", "checkpoint", id],
            "checkpoint is not supported by palisade",
        ),
    ];
    let mut inputs = 0;
    for (name, args, expected) in &table {
        let out = rig.ctrd.ctr(args).unwrap();
        assert!(!out.status.success(), "{name}: accepted");
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{name}: expected {expected:?} in {err:?}"
        );
        // The task is unaffected.
        assert_eq!(
            rig.ctrd.task_status(id).unwrap().as_deref(),
            Some("RUNNING")
        );
        assert_eq!(rig.ctrd.task_pids(id).unwrap()[0], pid, "{name}");
        inputs += 1;
    }
    rig.ctrd
        .ctr_ok(["tasks", "kill", "--all", "--signal", "SIGKILL", id])
        .unwrap();
    let _ = holder.wait();
    rig.ctrd
        .wait_task_status(id, "STOPPED", common::TIMEOUT)
        .unwrap();
    rig.ctrd.ctr_ok(["tasks", "delete", id]).unwrap();
    rig.ctrd.ctr_ok(["containers", "delete", id]).unwrap();
    finish("hostile-shim-requests", &checker, &[("inputs", inputs)]);
}
