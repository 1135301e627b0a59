//! Lifecycle through the `palisade` CLI: run/create/start/state/kill/delete, exit codes,
//! signals, exec, ps, pause/resume, hooks, a console socket, and bad input.
//! Needs root: real namespaces, mounts and cgroups.

mod common;

use std::{
    io::{IoSliceMut, Read},
    os::{fd::FromRawFd, unix::net::UnixListener},
    process::Stdio,
    time::{Duration, Instant},
};

use common::*;

fn wait_for_status(p: &Palisade, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = p.status(id);
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} stayed {status}, wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_returns_the_exit_code() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sh", "-c", "echo hello; exit 3"]).unwrap();
    let (code, out, err) = p.run_bundle(&id("exit3"), &b);
    assert_eq!(code, 3, "stderr: {err}");
    assert_eq!(out, "hello\n");
    p.assert_no_leftovers(&id("exit3"), &b);
}

#[test]
fn create_start_state_kill_delete() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sleep", "1000"]).unwrap();
    let id = id("lifecycle");
    let pid_file = b.path().join("pid");
    p.ok(&[
        "create",
        "--bundle",
        b.path().to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
    ]);
    let state = p.state(&id);
    assert_eq!(state["status"], "created");
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["bundle"], b.path().to_str().unwrap());
    let pid: i64 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(state["pid"], pid);
    // Created: the init is blocked before exec, still the runtime's binary.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.to_string_lossy().contains("palisade"), "{exe:?}");

    p.ok(&["start", &id]);
    assert_eq!(p.status(&id), "running");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "sleep");

    // A running container is not deleted without --force.
    let err = p.fails(&["delete", &id]);
    assert!(err.contains("is running"), "{err}");

    p.ok(&["kill", &id, "KILL"]);
    wait_for_status(&p, &id, "stopped");
    assert_eq!(p.state(&id)["pid"], 0);
    p.ok(&["delete", &id]);
    p.assert_no_leftovers(&id, &b);
    let err = p.fails(&["state", &id]);
    assert!(
        err.contains(&format!("container \"{id}\" does not exist")),
        "{err}"
    );
}

/// Runs `palisade run` in the background, waits for running, kills with `signal`,
/// returns the exit code of `palisade run`.
fn run_and_kill(p: &Palisade, b: &Bundle, id: &str, signal: &str) -> i32 {
    let mut child = p
        .cmd()
        .args(["run", "--bundle", b.path().to_str().unwrap(), id])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(p.root().join(id).join("state.json").exists() && p.status(id) == "running") {
        assert!(Instant::now() < deadline, "{id} never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    p.ok(&["kill", id, signal]);
    child.wait().unwrap().code().unwrap()
}

#[test]
fn signals_give_128_plus_n() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sleep", "1000"]).unwrap();
    assert_eq!(run_and_kill(&p, &b, &id("sigkill"), "KILL"), 137);
    p.assert_no_leftovers(&id("sigkill"), &b);
    // PID 1 of a pid namespace ignores SIGTERM without a handler, so run sleep outside
    // one to see the default action.
    b.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
    })
    .unwrap();
    assert_eq!(run_and_kill(&p, &b, &id("sigterm"), "15"), 143);
    p.assert_no_leftovers(&id("sigterm"), &b);
}

#[test]
fn exec_ps_pause_resume() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sleep", "1000"]).unwrap();
    b.edit(|c| c["hostname"] = "exec-box".into()).unwrap();
    let id = id("exec");
    p.ok(&[
        "run",
        "--detach",
        "--bundle",
        b.path().to_str().unwrap(),
        &id,
    ]);
    assert_eq!(p.status(&id), "running");

    // exec joins the namespaces: same hostname, sees the init as pid 1.
    let out = p.ok(&[
        "exec",
        &id,
        "sh",
        "-c",
        "hostname; cat /proc/1/comm; echo $FOO",
    ]);
    assert_eq!(out, "exec-box\nsleep\n\n");
    let out = p.ok(&[
        "exec",
        "--env",
        "FOO=bar",
        "--user",
        "1000:1001",
        &id,
        "sh",
        "-c",
        "echo $FOO; id -u; id -g",
    ]);
    assert_eq!(out, "bar\n1000\n1001\n");
    let out = p.run(&["exec", &id, "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let err = p.fails(&["exec", &id, "/bin/nope"]);
    assert!(
        err.contains("exec \"/bin/nope\": No such file or directory"),
        "{err}"
    );

    // exec --process with a JSON process, detached, with a pid file.
    let process = json!({
        "args": ["sleep", "1000"], "cwd": "/", "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/bin"]
    });
    let process_file = b.path().join("process.json");
    std::fs::write(&process_file, process.to_string()).unwrap();
    let pid_file = b.path().join("exec.pid");
    p.ok(&[
        "exec",
        "--detach",
        "--process",
        process_file.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
    ]);
    let exec_pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    let init_pid = p.state(&id)["pid"].as_i64().unwrap() as i32;

    let pids: Vec<i32> = serde_json::from_str(&p.ok(&["ps", "--format", "json", &id])).unwrap();
    assert!(
        pids.contains(&init_pid) && pids.contains(&exec_pid),
        "{pids:?}"
    );
    let table = p.ok(&["ps", &id]);
    assert!(
        table.starts_with("UID") && table.contains("sleep 1000"),
        "{table}"
    );

    p.ok(&["pause", &id]);
    assert_eq!(p.status(&id), "paused");
    let state = std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap();
    assert!(
        state.contains("State:\tD") || state.contains("State:\tS"),
        "{state}"
    );
    let err = p.fails(&["exec", &id, "true"]);
    assert!(err.contains("is paused"), "{err}");
    p.ok(&["resume", &id]);
    assert_eq!(p.status(&id), "running");

    // kill --all reaches the exec'd process too.
    p.ok(&["kill", "--all", &id, "KILL"]);
    wait_for_status(&p, &id, "stopped");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{exec_pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{exec_pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < deadline,
            "exec'd process survived kill --all"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    p.ok(&["delete", &id]);
    p.assert_no_leftovers(&id, &b);
}

#[test]
fn hooks_run_at_their_points_with_state_on_stdin() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sh", "-c", "echo main > /hooks/main"]).unwrap();
    let out = b.path().join("hooks");
    std::fs::create_dir(&out).unwrap();
    let dir = out.to_str().unwrap().to_string();
    let hook = |script: String| json!({"path": "/bin/sh", "args": ["sh", "-c", script]});
    b.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/hooks", "type": "bind", "source": dir, "options": ["rbind", "rw"]
        }));
        c["hooks"] = json!({
            // Runtime namespace: host paths.
            "createRuntime": [hook(format!("cat > {dir}/createRuntime"))],
            // Container namespaces, before pivot_root: host paths still resolve.
            "createContainer": [hook(format!("cat > {dir}/createContainer; readlink /proc/self/ns/pid > {dir}/createContainer.pidns"))],
            // In the container after pivot_root: container paths.
            "startContainer": [hook("cat > /hooks/startContainer; test ! -e /hooks/main".into())],
            "poststart": [hook(format!("cat > {dir}/poststart"))],
            "poststop": [hook(format!("cat > {dir}/poststop"))]
        });
    })
    .unwrap();
    let id = id("hooks");
    let (code, _, err) = p.run_bundle(&id, &b);
    assert_eq!(code, 0, "{err}");
    for name in [
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
        "main",
    ] {
        assert!(out.join(name).exists(), "{name} did not run");
    }
    let state: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("createRuntime"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    assert_eq!(state["id"], id.as_str());
    assert!(state["pid"].as_i64().unwrap() > 0);
    assert_eq!(state["bundle"], b.path().to_str().unwrap());
    let hook_ns = std::fs::read_to_string(out.join("createContainer.pidns")).unwrap();
    let our_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_ne!(
        hook_ns.trim(),
        our_ns.to_str().unwrap(),
        "createContainer ran outside the container's pid ns"
    );
    p.assert_no_leftovers(&id, &b);
}

#[test]
fn failing_hook_fails_create_and_leaves_nothing() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["true"]).unwrap();
    b.edit(|c| {
        c["hooks"] = json!({"createRuntime": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 4"]}
        ]})
    })
    .unwrap();
    let id = id("badhook");
    let err = p.fails(&["create", "--bundle", b.path().to_str().unwrap(), &id]);
    assert!(
        err.contains("createRuntime hook \"/bin/sh\": exit status: 4: nope"),
        "{err}"
    );
    p.assert_no_leftovers(&id, &b);
}

#[test]
fn console_socket_receives_the_pty_master() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sh", "-c", "tty; stty size; echo tty-ok"]).unwrap();
    b.edit(|c| {
        c["process"]["terminal"] = true.into();
        c["process"]["consoleSize"] = json!({"height": 31, "width": 97});
    })
    .unwrap();
    let sock_path = b.path().join("console.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let id = id("tty");
    let receiver = std::thread::spawn(move || {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let (conn, _) = listener.accept().unwrap();
        let mut name = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut name)];
        let msg = recvmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&conn),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .unwrap();
        let fd = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .expect("no fd received");
        let n = msg.bytes;
        // SAFETY: the fd was just received with SCM_RIGHTS and is owned here only.
        let master = unsafe { std::fs::File::from_raw_fd(fd) };
        (String::from_utf8_lossy(&name[..n]).into_owned(), master)
    });
    p.ok(&[
        "create",
        "--bundle",
        b.path().to_str().unwrap(),
        "--console-socket",
        sock_path.to_str().unwrap(),
        &id,
    ]);
    let (name, mut master) = receiver.join().unwrap();
    assert!(name.starts_with("/dev/pts/"), "{name}");
    p.ok(&["start", &id]);
    let mut output = Vec::new();
    let mut buf = [0u8; 1024];
    // Read until the slave side closes (EIO) or the expected text is there.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        output.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&output).contains("tty-ok") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&output);
    assert!(
        text.contains("/dev/pts/0") && text.contains("31 97") && text.contains("tty-ok"),
        "{text:?}"
    );
    wait_for_status(&p, &id, "stopped");
    p.ok(&["delete", &id]);
    p.assert_no_leftovers(&id, &b);
}

/// The reliability suite's hostile-input table (palisade_tests::hostile): every malformed
/// spec and bad id is refused with its exact error and leaves nothing behind (the
/// container's own checks plus the leak checker's host-wide diff). Prints the suite's
/// `PALISADE-REL` line (tests/reliability/run.sh collects it).
#[test]
fn bad_input_is_rejected_by_name_and_leaves_nothing() {
    use palisade_tests::{
        hostile,
        leaks::{describe, LeakChecker, Scope},
    };
    let p = Palisade::new();
    let mut inputs = 0;
    let mut leaks = 0;
    for case in hostile::spec_cases() {
        let b = Bundle::busybox(&["true"]).unwrap();
        let mut config = b.config().unwrap();
        match case.apply(&mut config) {
            Some(raw) => std::fs::write(b.config_path(), raw).unwrap(),
            None => b.write_config(&config).unwrap(),
        }
        let id = id(&format!("hostile-{}", case.name));
        let checker = LeakChecker::new(Scope::with_markers([
            p.root().display().to_string(),
            b.path().display().to_string(),
            id.clone(),
        ]));
        let err = p.fails(&["create", "--bundle", b.path().to_str().unwrap(), &id]);
        assert!(
            err.contains(&case.expected),
            "{}: expected {:?} in {err:?}",
            case.name,
            case.expected
        );
        p.assert_no_leftovers(&id, &b);
        let left = checker.settle(std::time::Duration::from_secs(2));
        assert!(
            left.is_empty(),
            "{}: leaked\n{}",
            case.name,
            describe(&left)
        );
        leaks += left.len();
        inputs += 1;
    }

    let b = Bundle::busybox(&["sleep", "100"]).unwrap();
    let bundle = b.path().to_str().unwrap();
    for (bad_id, expected) in hostile::bad_ids() {
        let err = p.fails(&["create", "--bundle", bundle, &bad_id]);
        assert!(err.contains(&expected), "{bad_id}: {err}");
        inputs += 1;
    }
    assert_eq!(std::fs::read_dir(p.root()).unwrap().count(), 0);

    // A duplicate id fails and leaves the first container untouched.
    let id = id("dup");
    p.ok(&["create", "--bundle", bundle, &id]);
    let err = p.fails(&["create", "--bundle", bundle, &id]);
    assert!(
        err.contains(&format!("container \"{id}\" already exists")),
        "{err}"
    );
    assert_eq!(p.status(&id), "created");
    p.ok(&["delete", &id]);
    p.assert_no_leftovers(&id, &b);

    let err = p.fails(&["--systemd-cgroup", "state", "x"]);
    assert!(err.contains("--systemd-cgroup is not supported"), "{err}");
    inputs += 2;
    println!("PALISADE-REL hostile-cli inputs={inputs} leaks={leaks}");
}

#[test]
fn json_log_has_logrus_error_lines() {
    let p = Palisade::new();
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = p
        .cmd()
        .args([
            "--log",
            log.path().to_str().unwrap(),
            "--log-format",
            "json",
            "state",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = std::fs::read_to_string(log.path()).unwrap();
    let entry: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(entry["level"], "error");
    assert_eq!(entry["msg"], "container \"nope\" does not exist");
    assert!(entry["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn spec_and_features() {
    let p = Palisade::new();
    let dir = tempfile::tempdir().unwrap();
    p.ok(&["spec", "--bundle", dir.path().to_str().unwrap()]);
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(spec["root"]["path"], "rootfs");
    assert_eq!(spec["process"]["args"][0], "sh");
    let err = p.fails(&["spec", "--bundle", dir.path().to_str().unwrap()]);
    assert!(err.contains("exists"), "{err}");
    let features: Value = serde_json::from_str(&p.ok(&["features"])).unwrap();
    assert_eq!(features["linux"]["cgroup"]["v1"], true);
    assert!(features["linux"]["namespaces"].as_array().unwrap().len() == 8);
}

#[test]
fn preserve_fds_passes_extra_fds() {
    use std::os::unix::process::CommandExt;
    let p = Palisade::new();
    let b = Bundle::busybox(&["sh", "-c", "echo via-fd3 >&3; echo via-fd4 >&4"]).unwrap();
    let out3 = tempfile::NamedTempFile::new().unwrap();
    let out4 = tempfile::NamedTempFile::new().unwrap();
    let f3 = out3.reopen().unwrap();
    let f4 = out4.reopen().unwrap();
    let id = id("preserve");
    let mut cmd = p.cmd();
    cmd.args([
        "run",
        "--preserve-fds",
        "2",
        "--bundle",
        b.path().to_str().unwrap(),
        &id,
    ]);
    let (fd3, fd4) = (
        std::os::fd::AsRawFd::as_raw_fd(&f3),
        std::os::fd::AsRawFd::as_raw_fd(&f4),
    );
    // SAFETY: dup2 in the forked child before exec, on fds that are open in it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd3, 3) < 0 || libc::dup2(fd4, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = cmd.status().unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(out3.path()).unwrap(), "via-fd3\n");
    assert_eq!(std::fs::read_to_string(out4.path()).unwrap(), "via-fd4\n");
    p.assert_no_leftovers(&id, &b);
}

/// The creating process is killed (-9) half-way: the init notices and exits, and the
/// interrupted container can be deleted without leaving anything.
#[test]
fn killed_create_leaves_a_deletable_container() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sleep", "100"]).unwrap();
    b.edit(|c| {
        c["hooks"] = json!({"createRuntime": [
            {"path": "/bin/sh", "args": ["sh", "-c", "kill -9 $PPID; sleep 1"]}
        ]})
    })
    .unwrap();
    let id = id("killed");
    let out = p.run(&["create", "--bundle", b.path().to_str().unwrap(), &id]);
    assert_eq!(out.status.code(), None, "create was not killed");
    assert_eq!(p.status(&id), "creating");
    // No process of the container survives its creator.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cgroup_dirs_named(&id).iter().all(|d| {
        std::fs::read_to_string(d.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty())
    }) {
        assert!(
            Instant::now() < deadline,
            "container processes outlived their creator"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p.ok(&["delete", &id]);
    p.assert_no_leftovers(&id, &b);
}

/// A container can join another's namespaces by path (what a pod's containers do with
/// the sandbox's network, ipc and uts namespaces).
#[test]
fn join_namespaces_by_path() {
    let p = Palisade::new();
    let sandbox = Bundle::busybox(&["sleep", "1000"]).unwrap();
    sandbox.edit(|c| c["hostname"] = "pod-host".into()).unwrap();
    let sandbox_id = id("sandbox");
    p.ok(&[
        "run",
        "--detach",
        "--bundle",
        sandbox.path().to_str().unwrap(),
        &sandbox_id,
    ]);
    let pid = p.state(&sandbox_id)["pid"].as_i64().unwrap();

    let member = Bundle::busybox(&["sh", "-c", "hostname; readlink /proc/self/ns/net"]).unwrap();
    member
        .edit(|c| {
            c.as_object_mut().unwrap().remove("hostname");
            for ns in c["linux"]["namespaces"].as_array_mut().unwrap() {
                let typ = ns["type"].as_str().unwrap().to_string();
                let proc_name = match typ.as_str() {
                    "network" => "net",
                    "uts" => "uts",
                    "ipc" => "ipc",
                    _ => continue,
                };
                ns["path"] = format!("/proc/{pid}/ns/{proc_name}").into();
            }
        })
        .unwrap();
    let member_id = id("member");
    let (code, out, err) = p.run_bundle(&member_id, &member);
    assert_eq!(code, 0, "{err}");
    let sandbox_net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(out, format!("pod-host\n{}\n", sandbox_net.display()));
    p.assert_no_leftovers(&member_id, &member);
    p.ok(&["delete", "--force", &sandbox_id]);
    p.assert_no_leftovers(&sandbox_id, &sandbox);
}
