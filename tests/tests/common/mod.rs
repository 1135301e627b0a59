//! Task scenarios shared by the `ctr` end-to-end tests: the same checks run against
//! containerd's runc shim driving the `palisade` CLI and against palisade's own shim.
#![allow(dead_code)] // each test binary uses the subset it needs

use std::{process::Command, time::Duration};

use palisade_tests::{
    containerd::{run_on_pty, Containerd, RuntimeUnderTest},
    image::ImageConfig,
};

pub const IMAGE: &str = "docker.io/palisade/busybox:latest";
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A private containerd with the busybox image imported.
pub fn containerd() -> Containerd {
    let ctrd = Containerd::start().expect("start private containerd");
    ctrd.import_busybox(IMAGE, &ImageConfig::default())
        .expect("import busybox image");
    ctrd
}

pub fn echo_prints_hi(ctrd: &Containerd, rt: &RuntimeUnderTest) {
    let out = ctrd
        .run_container(rt, &["--rm"], IMAGE, "echo", &["/bin/echo", "hi"])
        .unwrap();
    assert!(
        out.status.success(),
        "ctr run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(ctrd.ctr_ok(["containers", "ls", "-q"]).unwrap().trim(), "");
}

pub fn exit_code_propagates(ctrd: &Containerd, rt: &RuntimeUnderTest) {
    let out = ctrd
        .run_container(rt, &["--rm"], IMAGE, "exit3", &["/bin/sh", "-c", "exit 3"])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn killed_by_signal_reports_128_plus_n(ctrd: &Containerd, rt: &RuntimeUnderTest) {
    // PID 1 of a pid namespace ignores signals sent from inside it, so the kill comes
    // from outside while `ctr run` waits in the foreground.
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(rt.run_flags());
    args.extend(["--rm", IMAGE, "killed", "/bin/sleep", "1000"].map(String::from));
    let run = ctrd
        .ctr_command(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ctrd.wait_task_status("killed", "RUNNING", TIMEOUT).unwrap();
    ctrd.ctr_ok(["tasks", "kill", "--signal", "SIGKILL", "killed"])
        .unwrap();
    let out = run.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn tty_works(ctrd: &Containerd, rt: &RuntimeUnderTest) {
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(rt.run_flags());
    args.extend(
        [
            "-t",
            "--rm",
            IMAGE,
            "tty",
            "/bin/sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; tty; sleep 0.3; set -- $(stty size); echo rows=$1 cols=$2",
        ]
        .map(String::from),
    );
    let mut cmd = ctrd.ctr_command(&args);
    let (out, status) = run_on_pty(&mut cmd, TIMEOUT).unwrap();
    assert!(status.success(), "ctr run -t: {status}: {out}");
    assert!(out.contains("is-a-tty"), "terminal output: {out:?}");
    // ctr copies its terminal's size (set by run_on_pty) to the task: ResizePty.
    assert!(out.contains("rows=37 cols=101"), "terminal output: {out:?}");
    assert!(
        out.contains("/dev/pts/") || out.contains("/dev/console"),
        "terminal output: {out:?}"
    );
}

/// Input written to `ctr run`'s stdin reaches the task. (ctr never sends CloseIO, so
/// the task reads what it needs instead of waiting for EOF.)
pub fn stdin_is_forwarded(ctrd: &Containerd, rt: &RuntimeUnderTest) {
    use std::io::Write;
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(rt.run_flags());
    args.extend(
        [
            "--rm",
            IMAGE,
            "stdin",
            "/bin/sh",
            "-c",
            "read a; read b; echo got $a $b",
        ]
        .map(String::from),
    );
    let mut child = ctrd
        .ctr_command(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"line-one\nline-two\n").unwrap();
    drop(stdin);
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !waiter.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "task never got its input"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got line-one line-two\n"
    );
}

/// Starts a long-running detached task `id`.
pub fn run_detached(ctrd: &Containerd, rt: &RuntimeUnderTest, id: &str) {
    let out = ctrd
        .run_container(rt, &["-d"], IMAGE, id, &["/bin/sleep", "1000"])
        .unwrap();
    assert!(
        out.status.success(),
        "ctr run -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctrd.wait_task_status(id, "RUNNING", TIMEOUT).unwrap();
}

/// Kills `id` with SIGKILL, waits for it to stop and deletes task and container.
pub fn kill_and_delete(ctrd: &Containerd, id: &str) {
    ctrd.ctr_ok(["tasks", "kill", "--signal", "SIGKILL", id])
        .unwrap();
    ctrd.wait_task_status(id, "STOPPED", TIMEOUT).unwrap();
    ctrd.ctr_ok(["tasks", "delete", id]).unwrap();
    ctrd.ctr_ok(["containers", "delete", id]).unwrap();
    assert_eq!(ctrd.task_status(id).unwrap(), None);
}

pub fn exec_ps_pause_resume_kill(ctrd: &Containerd, rt: &RuntimeUnderTest) {
    let id = "lifecycle";
    run_detached(ctrd, rt, id);

    let out = ctrd
        .ctr_ok([
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            id,
            "/bin/echo",
            "from-exec",
        ])
        .unwrap();
    assert_eq!(out, "from-exec\n");
    let out = ctrd
        .ctr([
            "tasks",
            "exec",
            "--exec-id",
            "e2",
            id,
            "/bin/sh",
            "-c",
            "exit 7",
        ])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pids = ctrd.task_pids(id).unwrap();
    assert!(!pids.is_empty(), "ctr task ps listed no pids");
    for pid in &pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(
            comm.trim(),
            "sleep",
            "pid {pid} from ctr task ps is not the task"
        );
    }

    ctrd.ctr_ok(["tasks", "pause", id]).unwrap();
    ctrd.wait_task_status(id, "PAUSED", TIMEOUT).unwrap();
    let state = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let frozen = state
        .lines()
        .find(|l| l.starts_with("State:"))
        .unwrap_or_default()
        .to_string();
    assert!(frozen.contains("D") || frozen.contains("S"), "{frozen}");
    ctrd.ctr_ok(["tasks", "resume", id]).unwrap();
    ctrd.wait_task_status(id, "RUNNING", TIMEOUT).unwrap();

    // An exec still works after resume.
    let out = ctrd
        .ctr_ok([
            "tasks",
            "exec",
            "--exec-id",
            "e3",
            id,
            "/bin/cat",
            "/etc/hostname",
        ])
        .unwrap();
    assert!(!out.is_empty());

    kill_and_delete(ctrd, id);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .unwrap_or_default()
                    .trim()
                    != "sleep",
            "task process {pid} survived kill+delete"
        );
    }
}

/// `ctr` must be on PATH; checked once so a missing install fails loudly, not obscurely.
pub fn require_ctr() {
    let ok = Command::new("ctr")
        .arg("--version")
        .output()
        .map(|o| o.status.success());
    assert!(matches!(ok, Ok(true)), "ctr (containerd) is not installed");
}
