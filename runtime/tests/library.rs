//! The library API as the shim and the agent use it: from a multi-threaded process, the
//! container processes are the caller's own children (it reaps them with waitpid), stdio
//! and pty masters are handed over as fds. Needs root.

mod common;

use std::{io::Read, os::fd::OwnedFd, path::Path};

use common::*;
use nix::{
    sys::wait::{waitpid, WaitStatus},
    unistd::{pipe, Pid},
};
use oci_spec::runtime::ProcessBuilder;
use palisade_runtime::{
    CreateOptions, Error, ExecOptions, Runtime, Signal, Status, Stdio, Terminal,
};

fn wait_exit(pid: i32) -> i32 {
    match waitpid(Pid::from_raw(pid), None).unwrap() {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        other => panic!("unexpected {other:?}"),
    }
}

fn read_all(fd: OwnedFd) -> String {
    let mut s = String::new();
    std::fs::File::from(fd).read_to_string(&mut s).unwrap();
    s
}

fn stdout_pipe() -> (Stdio, OwnedFd) {
    let (r, w) = pipe().unwrap();
    (
        Stdio {
            stdin: None,
            stdout: Some(w),
            stderr: None,
        },
        r,
    )
}

#[test]
fn containers_are_children_of_a_multithreaded_caller() {
    let root = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(root.path()).unwrap();
    // Several threads create, start and reap containers at the same time.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let runtime = runtime.clone();
            std::thread::spawn(move || {
                let b = Bundle::busybox(&["sh", "-c", &format!("echo out-{i}; exit {i}")]).unwrap();
                let id = id(&format!("lib{i}"));
                let (stdio, out) = stdout_pipe();
                let opts = CreateOptions {
                    stdio,
                    ..Default::default()
                };
                let mut c = runtime.create(&id, b.path(), opts).unwrap();
                let pid = c.pid().unwrap();
                assert_eq!(c.status(), Status::Created);
                // The init is our child: its parent pid is us.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                let ppid: u32 = stat
                    .rsplit(')')
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(ppid, std::process::id());
                c.start().unwrap();
                assert_eq!(wait_exit(pid), i);
                assert_eq!(read_all(out), format!("out-{i}\n"));
                assert_eq!(c.status(), Status::Stopped);
                c.delete(false).unwrap();
                assert!(!root_has(&runtime, &id));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn root_has(runtime: &Runtime, id: &str) -> bool {
    runtime.root().join(id).exists()
}

#[test]
fn exec_pty_master_and_kill() {
    let root = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(root.path()).unwrap();
    let b = Bundle::busybox(&["sh", "-c", "read line; echo got-$line"]).unwrap();
    b.edit(|c| c["process"]["terminal"] = true.into()).unwrap();
    let tty_id = id("libtty");
    let mut c = runtime
        .create(
            &tty_id,
            b.path(),
            CreateOptions {
                terminal: Terminal::ReturnMaster,
                ..Default::default()
            },
        )
        .unwrap();
    let master = c.take_pty_master().expect("pty master");
    c.start().unwrap();
    let mut tty = std::fs::File::from(master);
    std::io::Write::write_all(&mut tty, b"ping\n").unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("got-ping") {
        let n = tty.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(wait_exit(c.pid().unwrap()), 0);
    c.delete(false).unwrap();

    // exec into a running container; exec'd processes are our children too.
    let b = Bundle::busybox(&["sleep", "1000"]).unwrap();
    let id = id("libexec");
    let mut c = runtime
        .create(&id, b.path(), CreateOptions::default())
        .unwrap();
    c.start().unwrap();
    let (stdio, out) = stdout_pipe();
    let process = ProcessBuilder::default()
        .args(vec![
            "sh".to_string(),
            "-c".into(),
            "cat /proc/1/comm; exit 5".into(),
        ])
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .build()
        .unwrap();
    let mut opts = ExecOptions::new(process);
    opts.stdio = stdio;
    let handle = c.exec(opts).unwrap();
    assert_eq!(wait_exit(handle.pid), 5);
    assert_eq!(read_all(out), "sleep\n");

    let missing = ProcessBuilder::default()
        .args(vec!["/bin/nope".to_string()])
        .cwd("/")
        .build()
        .unwrap();
    match c.exec(ExecOptions::new(missing)) {
        Err(Error::Child(msg)) => assert_eq!(msg, "exec \"/bin/nope\": No such file or directory"),
        other => panic!("unexpected {other:?}"),
    }

    c.kill(Signal::SIGKILL, false).unwrap();
    assert_eq!(wait_exit(c.pid().unwrap()), 137);
    assert!(matches!(
        c.kill(Signal::SIGTERM, false),
        Err(Error::NotRunning)
    ));
    let loaded = runtime.load(&id).unwrap();
    assert_eq!(loaded.status(), Status::Stopped);
    assert_eq!(runtime.list().unwrap().len(), 1);
    c.delete(false).unwrap();
    assert!(runtime.list().unwrap().is_empty());
    let _ = loaded;
    assert!(!Path::new(&root.path().join(&id)).exists());
}
