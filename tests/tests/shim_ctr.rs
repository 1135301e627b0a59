//! palisade's shim (`containerd-shim-palisade-v2`, runtime `io.containerd.palisade.v2`)
//! driven by a real containerd through `ctr` (issue 3, must-show 1).
//!
//! Needs root, containerd + ctr installed, and the shim built
//! (`cargo build -p containerd-shim-palisade-v2`). The private containerd registers
//! nothing: `ctr run --runtime io.containerd.palisade.v2` finds the shim on containerd's
//! PATH, which the harness prefixes with the build directory. The shim runs containers
//! with the `palisade-runtime` library in-process; `$PALISADE_TEST_RUNTIME_BINARY`
//! switches it to the `cli` engine on that binary (runc, or the `palisade` CLI).

mod common;

use std::{path::PathBuf, time::Duration};

use palisade_tests::{
    containerd::{bin_dir, mounts_below, output_within, Containerd, Options, RuntimeUnderTest},
    image::ImageConfig,
    leaks::{describe, LeakChecker, Scope},
};

/// The `[native]` section of the shim config under test: the in-process
/// `palisade-runtime` library by default, or with `$PALISADE_TEST_RUNTIME_BINARY` set
/// (e.g. to runc or the `palisade` CLI) the `cli` engine driving that binary.
fn native_config() -> String {
    match std::env::var_os("PALISADE_TEST_RUNTIME_BINARY") {
        Some(binary) => {
            let binary = PathBuf::from(binary);
            assert!(binary.exists(), "{} does not exist", binary.display());
            format!(
                "[native]\nengine = \"cli\"\nruntime_binary = \"{}\"\nruntime_root = \"/run/palisade-test\"\n",
                binary.display()
            )
        }
        None => "[native]\nengine = \"library\"\nruntime_root = \"/run/palisade-test\"\n".into(),
    }
}

/// A private containerd whose shims use a config naming the runtime under test.
fn containerd() -> (Containerd, tempfile::TempDir) {
    common::require_ctr();
    let shim = bin_dir().join("containerd-shim-palisade-v2");
    assert!(shim.exists(), "{} is not built", shim.display());
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("configuration.toml");
    std::fs::write(
        &config,
        format!(
            "[shim]\ndefault_mode = \"native\"\nallowed_annotations = [\"io.palisade.mode\"]\n\
             [vm]\nvmm = \"{MISSING_VMM}\"\n{}",
            native_config()
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
    (ctrd, config_dir)
}

fn shim() -> RuntimeUnderTest {
    RuntimeUnderTest::palisade_shim()
}

#[test]
fn echo_prints_hi() {
    let (ctrd, _config) = containerd();
    common::echo_prints_hi(&ctrd, &shim());
    assert!(ctrd.shim_pids().is_empty(), "shim outlived its last task");
}

#[test]
fn exit_code_propagates() {
    let (ctrd, _config) = containerd();
    common::exit_code_propagates(&ctrd, &shim());
}

#[test]
fn killed_by_signal_reports_128_plus_n() {
    let (ctrd, _config) = containerd();
    common::killed_by_signal_reports_128_plus_n(&ctrd, &shim());
}

#[test]
fn tty_works() {
    let (ctrd, _config) = containerd();
    common::tty_works(&ctrd, &shim());
}

#[test]
fn stdin_is_forwarded() {
    let (ctrd, _config) = containerd();
    common::stdin_is_forwarded(&ctrd, &shim());
}

#[test]
fn exec_ps_pause_resume_kill() {
    let (ctrd, _config) = containerd();
    common::exec_ps_pause_resume_kill(&ctrd, &shim());
}

#[test]
fn metrics_report_cgroup_usage() {
    let (ctrd, _config) = containerd();
    let id = "metrics";
    common::run_detached(&ctrd, &shim(), id);
    let out = ctrd
        .ctr_ok(["tasks", "metrics", "--format", "json", id])
        .unwrap();
    let metrics: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("ctr task metrics printed no JSON ({e}): {out}"));
    // v1 (this host is hybrid) or v2 metrics: memory usage and pids are reported.
    let memory = metrics["memory"]["usage"]["usage"]
        .as_u64()
        .or_else(|| metrics["memory"]["usage"].as_u64())
        .unwrap_or(0);
    assert!(memory > 0, "no memory usage in {out}");
    let pids = metrics["pids"]["current"].as_u64().unwrap_or(0);
    assert!(pids >= 1, "no pids count in {out}");
    common::kill_and_delete(&ctrd, id);
}

#[test]
fn many_concurrent_execs() {
    let (ctrd, _config) = containerd();
    let id = "execs";
    common::run_detached(&ctrd, &shim(), id);
    let handles: Vec<_> = (0..8)
        .map(|n| {
            let mut cmd = ctrd.ctr_command([
                "tasks".to_string(),
                "exec".into(),
                "--exec-id".into(),
                format!("x{n}"),
                id.into(),
                "/bin/sh".into(),
                "-c".into(),
                format!("echo out-{n}; exit {n}"),
            ]);
            std::thread::spawn(move || output_within(&mut cmd, common::TIMEOUT).unwrap())
        })
        .collect();
    for (n, handle) in handles.into_iter().enumerate() {
        let out = handle.join().unwrap();
        assert_eq!(
            out.status.code(),
            Some(n as i32),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("out-{n}\n"));
    }
    common::kill_and_delete(&ctrd, id);
}

#[test]
fn file_log_uri_receives_output() {
    let (ctrd, _config) = containerd();
    let log = ctrd.dir().join("logs/out.log");
    let uri = format!("file://{}", log.display());
    let out = ctrd
        .run_container(
            &shim(),
            &["--rm", "--log-uri", &uri],
            common::IMAGE,
            "filelog",
            &["/bin/sh", "-c", "echo to-file; echo err-too >&2"],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("to-file") && text.contains("err-too"),
        "{text:?}"
    );
}

/// VM mode with a VMM that does not exist: a pod that reaches the VM sandbox fails with
/// an error naming this path, which tells mode selection apart from everything else.
const MISSING_VMM: &str = "/nonexistent/palisade-vmm";

fn assert_refused_in_vm_mode(ctrd: &Containerd, out: &std::process::Output) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(MISSING_VMM),
        "not refused by VM mode: {stderr}"
    );
    assert!(ctrd.shim_pids().is_empty(), "a refused pod left its shim");
}

#[test]
fn mode_annotation_selects_vm_mode() {
    let (ctrd, _config) = containerd();
    let out = ctrd
        .run_container(
            &shim(),
            &["--rm", "--annotation", "io.palisade.mode=vm"],
            common::IMAGE,
            "vm",
            &["/bin/true"],
        )
        .unwrap();
    assert_refused_in_vm_mode(&ctrd, &out);
    let out = ctrd
        .run_container(
            &shim(),
            &["--rm", "--annotation", "io.palisade.mode=kvm"],
            common::IMAGE,
            "badmode",
            &["/bin/true"],
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid mode \"kvm\""), "{stderr}");
}

#[test]
fn runtime_config_path_option_selects_the_config() {
    let (ctrd, config_dir) = containerd();
    // Reached only through --runtime-config-path: default mode vm, and no annotation
    // allowed (so the mode annotation is refused by name).
    let vm_config = config_dir.path().join("vm.toml");
    std::fs::write(
        &vm_config,
        format!("[shim]\ndefault_mode = \"vm\"\n[vm]\nvmm = \"{MISSING_VMM}\"\n"),
    )
    .unwrap();
    let path = vm_config.display().to_string();
    let out = ctrd
        .run_container(
            &shim(),
            &["--rm", "--runtime-config-path", &path],
            common::IMAGE,
            "cfg",
            &["/bin/true"],
        )
        .unwrap();
    assert_refused_in_vm_mode(&ctrd, &out);
    let out = ctrd
        .run_container(
            &shim(),
            &[
                "--rm",
                "--runtime-config-path",
                &path,
                "--annotation",
                "io.palisade.mode=native",
            ],
            common::IMAGE,
            "cfg2",
            &["/bin/true"],
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("annotation io.palisade.mode is not allowed"),
        "{stderr}"
    );
}

#[test]
fn containerd_restart_keeps_task_managed() {
    let (mut ctrd, _config) = containerd();
    let id = "survivor";
    let mut checker = leak_checker(&ctrd);
    checker.scope_mut().add_shim_socket(&ctrd, id);
    common::run_detached(&ctrd, &shim(), id);
    let pid = ctrd.task_pids(id).unwrap()[0];
    ctrd.restart().unwrap();
    // The new daemon is this test's doing, not a leak.
    checker.scope_mut().expected_pids.extend(ctrd.daemon_pid());
    ctrd.wait_task_status(id, "RUNNING", common::TIMEOUT)
        .unwrap();
    assert_eq!(ctrd.task_pids(id).unwrap()[0], pid, "task was replaced");
    let out = ctrd
        .ctr_ok([
            "tasks",
            "exec",
            "--exec-id",
            "after",
            id,
            "/bin/echo",
            "still-here",
        ])
        .unwrap();
    assert_eq!(out, "still-here\n");
    common::kill_and_delete(&ctrd, id);
    assert!(process_gone(pid), "task process {pid} survived");
    assert_no_leaks("native-fault-containerd-restart", &checker);
}

/// The leak checker (palisade_tests::leaks) over this containerd and the shims' runtime
/// root: the reliability suite runs the fault tests below and collects their lines.
fn leak_checker(ctrd: &Containerd) -> LeakChecker {
    LeakChecker::new(Scope::for_containerd(
        ctrd,
        std::path::Path::new("/run/palisade-test"),
    ))
}

fn assert_no_leaks(part: &str, checker: &LeakChecker) {
    let leaks = checker.settle(Duration::from_secs(15));
    println!("PALISADE-REL {part} faults=1 leaks={}", leaks.len());
    assert!(leaks.is_empty(), "{part} leaked:\n{}", describe(&leaks));
}

#[test]
fn shim_killed_leaves_nothing_behind() {
    let (ctrd, _config) = containerd();
    let id = "orphan";
    let mut checker = leak_checker(&ctrd);
    checker.scope_mut().add_shim_socket(&ctrd, id);
    common::run_detached(&ctrd, &shim(), id);
    let pid = ctrd.task_pids(id).unwrap()[0];
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let shims = ctrd.shim_pids();
    assert_eq!(shims.len(), 1, "expected one shim, found {shims:?}");
    let socket = shim_socket(shims[0]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd notices the dead shim and runs `shim delete`; then the task is gone.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        let status = ctrd.task_status(id).unwrap();
        if status.is_none() || status.as_deref() == Some("STOPPED") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task still {status:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctrd.ctr(["tasks", "delete", id]);
    ctrd.ctr_ok(["containers", "delete", id]).unwrap();

    assert!(
        process_gone(pid),
        "container process {pid} survived its shim: {}",
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
    );
    let bundle = ctrd.bundle_dir(id);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while bundle.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !bundle.exists(),
        "bundle {} left behind: {:?}, mounts {:?}",
        bundle.display(),
        std::fs::read_dir(&bundle).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
        mounts_below(&bundle)
    );
    assert!(
        mounts_below(&ctrd.state_dir()).is_empty(),
        "mounts left: {:?}",
        mounts_below(&ctrd.state_dir())
    );
    assert!(
        !std::path::Path::new("/run/palisade-test")
            .join(ctrd.namespace())
            .join(id)
            .exists(),
        "runtime state left behind"
    );
    assert!(
        !socket.exists(),
        "shim socket {} left behind",
        socket.display()
    );
    // The container's cgroups (v1 hierarchies here) are gone.
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        if let (Some(controllers), Some(path)) = (controllers, path) {
            let controller = controllers.split(',').next().unwrap_or_default();
            if controller == "memory" || controller == "pids" {
                let dir = format!("/sys/fs/cgroup/{controller}{path}");
                assert!(
                    !std::path::Path::new(&dir).exists(),
                    "cgroup {dir} left behind"
                );
            }
        }
    }
    assert_no_leaks("native-fault-shim-kill9", &checker);
}

/// Waits (bounded) for `pid` to be reaped or at least dead (a zombie).
fn process_gone(pid: i32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) if stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) => {
                return true
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

/// The ttrpc socket a shim serves (its `-socket unix://PATH` argument).
fn shim_socket(pid: i32) -> PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let socket = args
        .windows(2)
        .find(|w| w[0] == "-socket")
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("shim {pid} has no -socket: {args:?}"));
    PathBuf::from(socket.trim_start_matches("unix://"))
}

#[test]
fn task_events_are_published() {
    let (ctrd, _config) = containerd();
    let id = "events";
    let out = ctrd
        .events_during(|| {
            common::run_detached(&ctrd, &shim(), id);
            ctrd.ctr_ok(["tasks", "exec", "--exec-id", "ev1", id, "/bin/true"])
                .unwrap();
            ctrd.ctr_ok(["tasks", "pause", id]).unwrap();
            ctrd.ctr_ok(["tasks", "resume", id]).unwrap();
            common::kill_and_delete(&ctrd, id);
        })
        .expect("ctr events");
    let ours: Vec<&str> = out.lines().filter(|l| l.contains(id)).collect();
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            ours.iter().any(|l| l.contains(topic)),
            "no {topic} event for {id} in:\n{out}"
        );
    }
    let position = |topic: &str| ours.iter().position(|l| l.contains(topic)).unwrap();
    assert!(position("/tasks/create") < position("/tasks/start"));
    assert!(position("/tasks/exit") < position("/tasks/delete"));
}

#[test]
fn oom_kill_is_reported() {
    let (ctrd, _config) = containerd();
    let id = "oom";
    let mut status = None;
    let out = ctrd
        .events_during(|| {
            // `tail` buffers a newline-free stream without bound: the 32 MiB limit kills it.
            let out = ctrd
                .run_container(
                    &shim(),
                    &["--rm", "--memory-limit", "33554432"],
                    common::IMAGE,
                    id,
                    &["/bin/sh", "-c", "tail /dev/zero"],
                )
                .unwrap();
            status = out.status.code();
        })
        .expect("ctr events");
    assert!(
        out.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains(id)),
        "no /tasks/oom event in:\n{out}"
    );
    // sh (PID 1) reports its child's SIGKILL as 128 + 9.
    assert_eq!(status, Some(137));
}

#[test]
fn exec_tty_kill_all_and_checkpoint_refusal() {
    let (ctrd, _config) = containerd();
    let id = "more";
    common::run_detached(&ctrd, &shim(), id);

    let mut exec = ctrd.ctr_command([
        "tasks",
        "exec",
        "-t",
        "--exec-id",
        "tty1",
        id,
        "/bin/sh",
        "-c",
        "test -t 0 && echo exec-has-tty",
    ]);
    let (out, status) = palisade_tests::containerd::run_on_pty(&mut exec, common::TIMEOUT).unwrap();
    assert!(status.success(), "ctr task exec -t: {status}: {out}");
    assert!(out.contains("exec-has-tty"), "{out:?}");

    let out = ctrd.ctr(["tasks", "checkpoint", id]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("checkpoint is not supported"), "{stderr}");

    // A second process in the container (an exec that stays), then kill --all.
    let mut background =
        ctrd.ctr_command(["tasks", "exec", "--exec-id", "bg", id, "/bin/sleep", "1000"]);
    let mut background = background
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while ctrd.task_pids(id).unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "exec bg never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = ctrd.task_pids(id).unwrap();
    ctrd.ctr_ok(["tasks", "kill", "--all", "--signal", "SIGKILL", id])
        .unwrap();
    ctrd.wait_task_status(id, "STOPPED", common::TIMEOUT)
        .unwrap();
    let status = background.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(137),
        "the exec saw its SIGKILL as 128+9"
    );
    for pid in pids {
        assert!(process_gone(pid), "pid {pid} survived kill --all");
    }
    ctrd.ctr_ok(["tasks", "delete", id]).unwrap();
    ctrd.ctr_ok(["containers", "delete", id]).unwrap();
}

#[test]
fn missing_executable_fails_clearly_and_leaves_nothing() {
    let (ctrd, _config) = containerd();
    let out = ctrd
        .run_container(
            &shim(),
            &["--rm"],
            common::IMAGE,
            "noexec",
            &["/bin/does-not-exist"],
        )
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/bin/does-not-exist"),
        "error names the path: {stderr}"
    );
    // ctr's --rm cleanup ran; nothing of the container is left anywhere.
    let _ = ctrd.ctr(["containers", "delete", "noexec"]);
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !ctrd.shim_pids().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ctrd.shim_pids().is_empty(), "shim outlived the failed task");
    assert!(mounts_below(&ctrd.state_dir()).is_empty());
    assert!(!std::path::Path::new("/run/palisade-test")
        .join(ctrd.namespace())
        .join("noexec")
        .exists());
}
