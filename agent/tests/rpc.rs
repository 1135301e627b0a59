//! Agent RPC tests over `--listen unix:` on the host: real containers through
//! palisade-runtime on a busybox rootfs.
//!
//! Needs root (namespaces, mounts, cgroups) and Debian's busybox-static at /bin/busybox.
//! The agent runs in its own UTS and IPC namespaces (`unshare`) so CreateSandbox's hostname
//! and IPC sysctl change nothing on the host.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use palisade_agent_protocol::{
    agent::{storage, *},
    agent_ttrpc::AgentClient,
    PROTOCOL_VERSION,
};
use serde_json::json;
use ttrpc::{context, Code};

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "sleep", "true", "hostname", "head", "tr", "ls", "stty",
];

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start() -> Self {
        Self::start_with(&["--uts", "--ipc", "--"])
    }

    /// The agent in a private network namespace too, after `setup` (a shell script, run in
    /// that namespace) prepared it: the stand-in for the guest's NIC.
    fn start_in_netns(setup: &str) -> Self {
        Self::start_with(&[
            "--uts",
            "--ipc",
            "--net",
            "--",
            "sh",
            "-c",
            &format!("set -e; {setup}; exec \"$0\" \"$@\""),
        ])
    }

    fn start_with(unshare_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new("unshare")
            .args(unshare_args)
            .arg(env!("CARGO_BIN_EXE_palisade-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("PALISADE_AGENT_LOG", "debug")
            .spawn()
            .expect("starting palisade-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "agent did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir, socket }
    }

    async fn client(&self) -> AgentClient {
        // The socket file appears at bind(2), a moment before the agent listens: retry a
        // refused connection for a while (seen under load), then fail naming the error.
        let address = format!("unix://{}", self.socket.display());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ttrpc::r#async::Client::connect(&address).await {
                Ok(client) => return AgentClient::new(client),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("connecting to the agent: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connecting to the agent at {address}: {e}"),
            }
        }
    }

    /// A busybox rootfs directory.
    fn rootfs(&self, name: &str) -> PathBuf {
        let root = self.dir.path().join(name);
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        root
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM: the agent removes its containers and exits.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let _ = self.child.wait();
        // The runtime removes each container's cgroup; the shared parent is ours to remove
        // (it fails harmlessly while the other test's agent still has containers in it).
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let _ = std::fs::remove_dir(h.path().join("palisade-agent-test"));
            }
        }
    }
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

fn spec(id: &str, args: &[&str], terminal: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"]
            },
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": format!("/palisade-agent-test/{id}-{}", std::process::id()),
            // No uts/ipc namespace: the container shares the sandbox's (the agent's), which
            // is how CreateSandbox's hostname and sysctls reach it.
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}]
        }
    }))
    .unwrap()
}

fn path_rootfs(path: &Path) -> Storage {
    let mut s = Storage::new();
    s.source = Some(storage::Source::Path(path.display().to_string()));
    s
}

fn create_request(id: &str, rootfs: &Path, args: &[&str], stdin: bool) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        spec_json: spec(id, args, false),
        rootfs: Some(path_rootfs(rootfs)).into(),
        stdin,
        ..Default::default()
    }
}

fn process_req(id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

fn container_req(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

/// Reads a stream to EOF.
async fn read_all(client: &AgentClient, id: &str, exec_id: &str, stderr: bool) -> String {
    let req = ReadStreamRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let chunk = if stderr {
            client.read_stderr(ctx(), &req).await
        } else {
            client.read_stdout(ctx(), &req).await
        }
        .expect("read stream");
        out.extend_from_slice(&chunk.data);
        if chunk.eof {
            return String::from_utf8_lossy(&out).into_owned();
        }
    }
}

async fn wait(client: &AgentClient, id: &str, exec_id: &str) -> i32 {
    client
        .wait_process(ctx(), &process_req(id, exec_id))
        .await
        .expect("wait")
        .exit_status
}

/// Asserts an RPC failed with `code` and a message containing `needle`.
fn assert_status<T: std::fmt::Debug>(result: ttrpc::Result<T>, code: Code, needle: &str) {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => {
            assert_eq!(
                status.code(),
                code,
                "wrong code; message: {}",
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                status.message()
            );
        }
        other => panic!("expected {code:?} ({needle}), got {other:?}"),
    }
}

async fn assert_serving(client: &AgentClient) {
    let check = client
        .check(ctx(), &CheckRequest::new())
        .await
        .expect("Check");
    assert_eq!(check.protocol_version, PROTOCOL_VERSION);
    assert!(check.serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_lifecycle_stdio_exec_signal_stats_remove() {
    let agent = Agent::start();
    let client = agent.client().await;
    assert_serving(&client).await;
    let info = client
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    assert!(!info.kernel_release.is_empty() && info.cpus >= 1 && info.memory_total_bytes > 0);

    // Sandbox settings, observed from inside a container below.
    let mut sysctls = std::collections::HashMap::new();
    sysctls.insert("kernel.shmmni".to_owned(), "1234".to_owned());
    client
        .create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                hostname: "sandbox-host".into(),
                dns_servers: vec!["10.96.0.10".into()],
                dns_searches: vec!["svc.cluster.local".into()],
                sysctls,
                ..Default::default()
            },
        )
        .await
        .expect("CreateSandbox");
    let resolv =
        std::fs::read_to_string(agent.dir.path().join("state/sandbox/resolv.conf")).unwrap();
    assert_eq!(resolv, "nameserver 10.96.0.10\nsearch svc.cluster.local\n");

    // c1: stdin round trip, stdout + stderr, exit code 7.
    let rootfs = agent.rootfs("rootfs1");
    let created = client
        .create_container(
            ctx(),
            &create_request(
                "c1",
                &rootfs,
                &["sh", "-c", "read line; echo \"got:$line\"; echo oops >&2; hostname; cat /proc/sys/kernel/shmmni; exit 7"],
                true,
            ),
        )
        .await
        .expect("CreateContainer c1");
    assert!(created.pid > 0);
    client
        .start_container(ctx(), &container_req("c1"))
        .await
        .expect("StartContainer c1");
    let written = client
        .write_stdin(
            ctx(),
            &WriteStdinRequest {
                container_id: "c1".into(),
                data: b"hello\n".to_vec(),
                ..Default::default()
            },
        )
        .await
        .expect("WriteStdin");
    assert_eq!(written.len, 6);
    client
        .close_stdin(ctx(), &process_req("c1", ""))
        .await
        .expect("CloseStdin");
    let (stdout, stderr) = tokio::join!(
        read_all(&client, "c1", "", false),
        read_all(&client, "c1", "", true)
    );
    assert_eq!(stdout, "got:hello\nsandbox-host\n1234\n");
    assert_eq!(stderr, "oops\n");
    assert_eq!(wait(&client, "c1", "").await, 7);
    // Waiting again returns the same status.
    assert_eq!(wait(&client, "c1", "").await, 7);

    // c2: a long-running init; exec with pipes and with a tty; stats; pause/resume; signal.
    let rootfs2 = agent.rootfs("rootfs2");
    client
        .create_container(
            ctx(),
            &create_request("c2", &rootfs2, &["sleep", "1000"], false),
        )
        .await
        .expect("CreateContainer c2");
    client
        .start_container(ctx(), &container_req("c2"))
        .await
        .expect("StartContainer c2");

    let exec_process = |args: &[&str], terminal: bool| {
        serde_json::to_vec(&json!({
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": ["PATH=/bin"], "cwd": "/"
        }))
        .unwrap()
    };
    client
        .exec_process(
            ctx(),
            &ExecProcessRequest {
                container_id: "c2".into(),
                exec_id: "e1".into(),
                process_json: exec_process(
                    &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"],
                    false,
                ),
                ..Default::default()
            },
        )
        .await
        .expect("ExecProcess e1");
    assert_eq!(read_all(&client, "c2", "e1", false).await, "exec-out\n");
    assert_eq!(read_all(&client, "c2", "e1", true).await, "exec-err\n");
    assert_eq!(wait(&client, "c2", "e1").await, 3);

    client
        .exec_process(
            ctx(),
            &ExecProcessRequest {
                container_id: "c2".into(),
                exec_id: "tty".into(),
                process_json: exec_process(&["sh", "-c", "read x; stty size; echo tty:$x"], true),
                tty: true,
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .expect("ExecProcess tty");
    client
        .tty_win_resize(
            ctx(),
            &TtyWinResizeRequest {
                container_id: "c2".into(),
                exec_id: "tty".into(),
                rows: 33,
                columns: 101,
                ..Default::default()
            },
        )
        .await
        .expect("TtyWinResize");
    client
        .write_stdin(
            ctx(),
            &WriteStdinRequest {
                container_id: "c2".into(),
                exec_id: "tty".into(),
                data: b"typed\n".to_vec(),
                ..Default::default()
            },
        )
        .await
        .expect("WriteStdin tty");
    let tty_out = read_all(&client, "c2", "tty", false).await;
    assert!(tty_out.contains("33 101"), "tty output {tty_out:?}");
    assert!(tty_out.contains("tty:typed"), "tty output {tty_out:?}");
    assert_eq!(wait(&client, "c2", "tty").await, 0);
    // A tty process has no separate stderr.
    assert_eq!(read_all(&client, "c2", "tty", true).await, "");

    let stats = client
        .stats_container(ctx(), &container_req("c2"))
        .await
        .expect("StatsContainer");
    assert!(stats.pids.current >= 1, "pids {:?}", stats.pids);
    assert!(stats.memory.usage_bytes > 0, "memory {:?}", stats.memory);
    let full: serde_json::Value =
        serde_json::from_slice(&stats.stats_json).expect("stats_json is JSON");
    assert!(full.get("memory").is_some());
    let pids = client
        .list_processes(ctx(), &container_req("c2"))
        .await
        .expect("ListProcesses");
    assert!(!pids.pids.is_empty());

    client
        .pause_container(ctx(), &container_req("c2"))
        .await
        .expect("PauseContainer");
    client
        .resume_container(ctx(), &container_req("c2"))
        .await
        .expect("ResumeContainer");
    client
        .update_container(
            ctx(),
            &UpdateContainerRequest {
                container_id: "c2".into(),
                resources_json: br#"{"pids": {"limit": 64}}"#.to_vec(),
                ..Default::default()
            },
        )
        .await
        .expect("UpdateContainer");

    // Removing a running container without force is refused.
    assert_status(
        client
            .remove_container(
                ctx(),
                &RemoveContainerRequest {
                    container_id: "c2".into(),
                    ..Default::default()
                },
            )
            .await,
        Code::FAILED_PRECONDITION,
        "c2",
    );
    client
        .signal_process(
            ctx(),
            &SignalProcessRequest {
                container_id: "c2".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .await
        .expect("SignalProcess");
    assert_eq!(wait(&client, "c2", "").await, 128 + 9);

    for id in ["c1", "c2"] {
        client
            .remove_container(
                ctx(),
                &RemoveContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e:?}"));
        assert_status(
            client.wait_process(ctx(), &process_req(id, "")).await,
            Code::NOT_FOUND,
            id,
        );
        assert!(!agent.dir.path().join("state/containers").join(id).exists());
    }
    // The rootfs bind mount is gone, its source untouched.
    assert!(rootfs.join("bin/busybox").exists());
    client
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .await
        .expect("DestroySandbox");
    assert_serving(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_errors_and_the_agent_keeps_serving() {
    let agent = Agent::start();
    let client = agent.client().await;
    let rootfs = agent.rootfs("rootfs");

    // Bad spec JSON.
    let mut bad = create_request("bad", &rootfs, &["true"], false);
    bad.spec_json = b"{\"ociVersion\": \"1.0.2\", \"process\": ".to_vec();
    assert_status(
        client.create_container(ctx(), &bad).await,
        Code::INVALID_ARGUMENT,
        "spec_json",
    );
    assert_serving(&client).await;

    // A spec the runtime rejects: the field is named.
    let mut bad = create_request("bad", &rootfs, &["true"], false);
    let mut spec: serde_json::Value = serde_json::from_slice(&bad.spec_json).unwrap();
    spec["process"]["args"] = json!([]);
    bad.spec_json = serde_json::to_vec(&spec).unwrap();
    assert_status(
        client.create_container(ctx(), &bad).await,
        Code::INVALID_ARGUMENT,
        "process.args",
    );
    assert_serving(&client).await;

    // Invalid ids, missing and bad rootfs.
    let bad = create_request("../escape", &rootfs, &["true"], false);
    assert_status(
        client.create_container(ctx(), &bad).await,
        Code::INVALID_ARGUMENT,
        "container_id",
    );
    let mut bad = create_request("norootfs", &rootfs, &["true"], false);
    bad.rootfs = protobuf::MessageField::none();
    assert_status(
        client.create_container(ctx(), &bad).await,
        Code::INVALID_ARGUMENT,
        "rootfs",
    );
    let mut bad = create_request("baddev", &rootfs, &["true"], false);
    let mut dev = Storage::new();
    dev.source = Some(storage::Source::BlockDevice("/etc/shadow".into()));
    dev.fstype = "ext4".into();
    bad.rootfs = Some(dev).into();
    assert_status(
        client.create_container(ctx(), &bad).await,
        Code::INVALID_ARGUMENT,
        "rootfs.block_device",
    );
    // Nothing was left behind by the failed creates.
    let containers_dir = agent.dir.path().join("state/containers");
    let leftovers: Vec<_> = std::fs::read_dir(&containers_dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // Unknown container / process.
    assert_status(
        client.start_container(ctx(), &container_req("nope")).await,
        Code::NOT_FOUND,
        "nope",
    );
    assert_status(
        client.wait_process(ctx(), &process_req("nope", "")).await,
        Code::NOT_FOUND,
        "nope",
    );
    assert_status(
        client.stats_container(ctx(), &container_req("nope")).await,
        Code::NOT_FOUND,
        "nope",
    );
    assert_status(
        client
            .remove_container(
                ctx(),
                &RemoveContainerRequest {
                    container_id: "nope".into(),
                    ..Default::default()
                },
            )
            .await,
        Code::NOT_FOUND,
        "nope",
    );

    // Oversized payloads: over the agent's bound (1 MiB spec) and over ttrpc's 4 MiB frame.
    let mut big = create_request("big", &rootfs, &["true"], false);
    big.spec_json = vec![b' '; 2 << 20];
    assert_status(
        client.create_container(ctx(), &big).await,
        Code::INVALID_ARGUMENT,
        "spec_json",
    );
    let huge = WriteStdinRequest {
        container_id: "nope".into(),
        data: vec![0; 5 << 20],
        ..Default::default()
    };
    assert!(client.write_stdin(ctx(), &huge).await.is_err());
    // Still serving, on this connection and on a new one.
    assert_serving(&client).await;
    assert_serving(&agent.client().await).await;

    // A real container for the process-level errors.
    client
        .create_container(
            ctx(),
            &create_request("live", &rootfs, &["sleep", "1000"], false),
        )
        .await
        .expect("CreateContainer live");
    assert_status(
        client
            .create_container(
                ctx(),
                &create_request("live", &rootfs, &["sleep", "1000"], false),
            )
            .await,
        Code::ALREADY_EXISTS,
        "live",
    );
    client
        .start_container(ctx(), &container_req("live"))
        .await
        .expect("start");
    let exec = |process_json: &[u8], exec_id: &str| ExecProcessRequest {
        container_id: "live".into(),
        exec_id: exec_id.into(),
        process_json: process_json.to_vec(),
        ..Default::default()
    };
    assert_status(
        client.exec_process(ctx(), &exec(b"[1,2", "e")).await,
        Code::INVALID_ARGUMENT,
        "process_json",
    );
    assert_status(
        client
            .exec_process(
                ctx(),
                &exec(
                    br#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
                    "e",
                ),
            )
            .await,
        Code::INVALID_ARGUMENT,
        "process_json.args",
    );
    assert_status(
        client
            .exec_process(
                ctx(),
                &exec(
                    br#"{"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
                    "bad/id",
                ),
            )
            .await,
        Code::INVALID_ARGUMENT,
        "exec_id",
    );
    assert_status(
        client
            .signal_process(
                ctx(),
                &SignalProcessRequest {
                    container_id: "live".into(),
                    signal: 999,
                    ..Default::default()
                },
            )
            .await,
        Code::INVALID_ARGUMENT,
        "signal",
    );
    assert_status(
        client
            .wait_process(ctx(), &process_req("live", "no-such-exec"))
            .await,
        Code::NOT_FOUND,
        "no-such-exec",
    );
    assert_status(
        client
            .update_container(
                ctx(),
                &UpdateContainerRequest {
                    container_id: "live".into(),
                    resources_json: b"{\"memory\": 5}".to_vec(),
                    ..Default::default()
                },
            )
            .await,
        Code::INVALID_ARGUMENT,
        "resources_json",
    );
    assert_status(
        client
            .write_stdin(
                ctx(),
                &WriteStdinRequest {
                    container_id: "live".into(),
                    data: b"x".to_vec(),
                    ..Default::default()
                },
            )
            .await,
        Code::FAILED_PRECONDITION,
        "stdin",
    );
    assert_status(
        client
            .tty_win_resize(
                ctx(),
                &TtyWinResizeRequest {
                    container_id: "live".into(),
                    rows: 1,
                    columns: 1,
                    ..Default::default()
                },
            )
            .await,
        Code::FAILED_PRECONDITION,
        "terminal",
    );
    assert_status(
        client
            .create_sandbox(
                ctx(),
                &CreateSandboxRequest {
                    hostname: "bad_name!".into(),
                    ..Default::default()
                },
            )
            .await,
        Code::INVALID_ARGUMENT,
        "hostname",
    );
    assert_serving(&client).await;

    // The container still works after all that, and force-removal kills it.
    let remove = RemoveContainerRequest {
        container_id: "live".into(),
        force: true,
        ..Default::default()
    };
    let (exit, removed) = tokio::join!(wait(&client, "live", ""), async {
        // Let WaitProcess register before the container disappears from the table.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.remove_container(ctx(), &remove).await
    });
    removed.expect("force remove");
    assert_eq!(exit, 128 + 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kill_is_reported_by_get_oom_event() {
    let agent = Agent::start();
    let client = agent.client().await;
    let rootfs = agent.rootfs("rootfs");
    let mut req = create_request(
        "hog",
        &rootfs,
        // Command substitution keeps all 64 MiB in the shell's memory.
        &[
            "sh",
            "-c",
            "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived",
        ],
        false,
    );
    let mut spec: serde_json::Value = serde_json::from_slice(&req.spec_json).unwrap();
    spec["linux"]["resources"] = json!({"memory": {"limit": 16 << 20}});
    req.spec_json = serde_json::to_vec(&spec).unwrap();
    client
        .create_container(ctx(), &req)
        .await
        .expect("CreateContainer hog");
    let oom_request = GetOomEventRequest::new();
    let oom = client.get_oom_event(ctx(), &oom_request);
    client
        .start_container(ctx(), &container_req("hog"))
        .await
        .expect("start");
    let event = tokio::time::timeout(Duration::from_secs(20), oom)
        .await
        .expect("no OOM event within 20 s")
        .expect("GetOomEvent");
    assert_eq!(event.container_id, "hog");
    assert_ne!(wait(&client, "hog", "").await, 0);
    client
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: "hog".into(),
                force: true,
                ..Default::default()
            },
        )
        .await
        .expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_rootfs_keeps_the_shared_image_read_only() {
    let agent = Agent::start();
    let client = agent.client().await;
    let image = agent.rootfs("image");
    // Two containers on one read-only "image", each with its own writable layer.
    for id in ["ov1", "ov2"] {
        let mut req = create_request(
            id,
            &image,
            &["sh", "-c", &format!("echo {id} > /written; cat /written; ls /written-by-* 2>&1; echo {id} > /written-by-{id}")],
            false,
        );
        req.rootfs_overlay = true;
        client
            .create_container(ctx(), &req)
            .await
            .expect("CreateContainer");
        client
            .start_container(ctx(), &container_req(id))
            .await
            .expect("start");
        let out = read_all(&client, id, "", false).await;
        assert!(out.starts_with(&format!("{id}\n")), "{id}: {out:?}");
        assert!(
            !out.contains("written-by-ov1\n"),
            "{id} sees another container's writes: {out:?}"
        );
        assert_eq!(wait(&client, id, "").await, 0);
    }
    assert!(!image.join("written").exists(), "the image was written to");
    for id in ["ov1", "ov2"] {
        client
            .remove_container(
                ctx(),
                &RemoveContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("remove");
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = agent.dir.path().join("state").display().to_string();
    assert!(!mountinfo.contains(&state), "mounts left under {state}");
}

/// A loop device over an image file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(image: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["--detach", &self.0]).status();
    }
}

/// The guest's virtio-blk path on the host: the rootfs is an ext4 image (`mkfs.ext4 -d`, as
/// the shim builds it) on a block device (a loop device standing in for /dev/vdb), mounted
/// by the agent read-only under an overlay. Needs root and loop devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_block_device_rootfs() {
    let agent = Agent::start();
    let client = agent.client().await;
    let tree = agent.rootfs("tree");
    let image = agent.dir.path().join("rootfs.ext4");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(&tree)
        .arg(&image)
        .status()
        .expect("mkfs.ext4");
    assert!(mkfs.success());
    let device = LoopDevice::attach(&image);

    let mut req = create_request(
        "blk",
        &tree,
        &["sh", "-c", "echo from-ext4 > /f; cat /f; ls /bin/busybox"],
        false,
    );
    let mut rootfs = Storage::new();
    rootfs.source = Some(storage::Source::BlockDevice(device.0.clone()));
    rootfs.fstype = "ext4".into();
    rootfs.options = vec!["noatime".into()];
    req.rootfs = Some(rootfs).into();
    req.rootfs_overlay = true;
    client
        .create_container(ctx(), &req)
        .await
        .expect("CreateContainer on ext4");
    client
        .start_container(ctx(), &container_req("blk"))
        .await
        .expect("start");
    assert_eq!(
        read_all(&client, "blk", "", false).await,
        "from-ext4\n/bin/busybox\n"
    );
    assert_eq!(wait(&client, "blk", "").await, 0);
    client
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: "blk".into(),
                ..Default::default()
            },
        )
        .await
        .expect("remove");
    // Unmounted: the device is no longer in use.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&agent.dir.path().display().to_string()),
        "mounts left"
    );

    // A wrong filesystem type is refused with the device named, and nothing is left.
    let mut bad = create_request("badfs", &tree, &["true"], false);
    let mut rootfs = Storage::new();
    rootfs.source = Some(storage::Source::BlockDevice(device.0.clone()));
    rootfs.fstype = "xfs".into();
    bad.rootfs = Some(rootfs).into();
    assert_status(
        client.create_container(ctx(), &bad).await,
        Code::INTERNAL,
        &device.0,
    );
    assert!(!agent.dir.path().join("state/containers/badfs").exists());
    assert_serving(&client).await;
}

/// Runs `ip ARGS` in the agent's network namespace; its stdout.
fn ip_in(agent: &Agent, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", agent.child.id()))
        .arg("ip")
        .args(args)
        .output()
        .expect("nsenter ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn address(address: &str, prefix_len: u32) -> IPAddress {
    IPAddress {
        address: address.into(),
        prefix_len,
        ..Default::default()
    }
}

fn route(destination: &str, gateway: &str, device: &str, scope: &str) -> Route {
    Route {
        destination: destination.into(),
        gateway: gateway.into(),
        device: device.into(),
        scope: scope.into(),
        ..Default::default()
    }
}

/// UpdateInterface / UpdateRoutes on a veth interface in the agent's private network
/// namespace (the guest's virtio NIC in a VM). Needs root and iproute2 (`ip`, `nsenter`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_interface_and_routes_are_applied_and_bad_input_refused() {
    const MAC: &str = "02:42:0a:58:00:05";
    let agent = Agent::start_in_netns(&format!(
        "ip link add nic0 address {MAC} type veth peer name peer0; ip addr add 192.0.2.9/24 dev nic0"
    ));
    let client = agent.client().await;
    assert_serving(&client).await;

    // Matched by MAC, renamed to eth0, MTU and addresses set (the old one replaced), up.
    let request = UpdateInterfaceRequest {
        interface: Some(Interface {
            name: "eth0".into(),
            mac: MAC.to_uppercase(),
            mtu: 1450,
            addresses: vec![address("10.88.0.5", 16), address("fd00:88::5", 64)],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let configured = client
        .update_interface(ctx(), &request)
        .await
        .expect("UpdateInterface");
    assert_eq!(configured.name, "eth0");
    assert_eq!(configured.mac, MAC);
    assert_eq!(configured.mtu, 1450);
    let mut got: Vec<String> = configured
        .addresses
        .iter()
        .map(|a| format!("{}/{}", a.address, a.prefix_len))
        .collect();
    got.sort();
    assert_eq!(got, ["10.88.0.5/16", "fd00:88::5/64"]);
    let link = ip_in(&agent, &["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1450") && link.contains(MAC), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let addrs = ip_in(&agent, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("inet 10.88.0.5/16"), "{addrs}");
    assert!(!addrs.contains("192.0.2.9"), "old address kept: {addrs}");
    // Idempotent: the same request again gives the same interface.
    let again = client
        .update_interface(ctx(), &request)
        .await
        .expect("UpdateInterface again");
    assert_eq!(again.addresses.len(), 2);

    // Routes: a gateway route listed before the link route it depends on still works.
    client
        .update_routes(
            ctx(),
            &UpdateRoutesRequest {
                routes: vec![
                    route("", "10.89.0.1", "eth0", ""),
                    route("10.89.0.0/24", "", "eth0", "link"),
                    route("198.51.100.0/24", "10.89.0.1", "", ""),
                ],
                ..Default::default()
            },
        )
        .await
        .expect("UpdateRoutes");
    let routes = ip_in(&agent, &["route", "show"]);
    assert!(
        routes.contains("default via 10.89.0.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.89.0.0/24 dev eth0 proto static scope link"),
        "{routes}"
    );
    assert!(
        routes.contains("198.51.100.0/24 via 10.89.0.1 dev eth0"),
        "{routes}"
    );

    // Hostile or wrong input: clear errors, nothing changed, the agent keeps serving.
    let bad_interface =
        |mac: &str, name: &str, mtu: u32, addresses: Vec<IPAddress>| UpdateInterfaceRequest {
            interface: Some(Interface {
                name: name.into(),
                mac: mac.into(),
                mtu,
                addresses,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
    for (req, code, needle) in [
        (
            bad_interface("02:42:0a:58:00", "", 0, vec![]),
            Code::INVALID_ARGUMENT,
            "interface.mac",
        ),
        (
            bad_interface("", "eth0", 0, vec![address("10.0.0.1", 33)]),
            Code::INVALID_ARGUMENT,
            "interface.addresses[0]",
        ),
        (
            bad_interface("", "eth0", 0, vec![address("fd00::1", 129)]),
            Code::INVALID_ARGUMENT,
            "prefix length 129",
        ),
        (
            bad_interface("", "eth0", 9, vec![]),
            Code::INVALID_ARGUMENT,
            "interface.mtu",
        ),
        (
            bad_interface("", "eth0", 0, vec![address("10.0.0.1", 8); 17]),
            Code::INVALID_ARGUMENT,
            "interface.addresses",
        ),
        (
            bad_interface("02:00:00:00:00:99", "", 0, vec![]),
            Code::NOT_FOUND,
            "interface with MAC 02:00:00:00:00:99",
        ),
        (
            bad_interface("", "nosuch0", 0, vec![]),
            Code::NOT_FOUND,
            "nosuch0",
        ),
        (
            bad_interface(MAC, "lo", 0, vec![]),
            Code::ALREADY_EXISTS,
            "\"lo\"",
        ),
    ] {
        assert_status(client.update_interface(ctx(), &req).await, code, needle);
    }
    for (routes, code, needle) in [
        (
            vec![route("10.0.0.0/40", "", "eth0", "")],
            Code::INVALID_ARGUMENT,
            "routes[0].destination",
        ),
        (
            vec![route("", "", "", "")],
            Code::INVALID_ARGUMENT,
            "needs a gateway or a device",
        ),
        (
            vec![route("10.0.0.0/8", "", "nosuch0", "link")],
            Code::NOT_FOUND,
            "nosuch0",
        ),
        (
            vec![route("", "10.0.0.1", "", ""); 129],
            Code::INVALID_ARGUMENT,
            "at most 128",
        ),
    ] {
        let req = UpdateRoutesRequest {
            routes,
            ..Default::default()
        };
        assert_status(client.update_routes(ctx(), &req).await, code, needle);
    }
    let link = ip_in(&agent, &["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1450"), "{link}");
    assert_serving(&client).await;
}

fn copy_req(id: &str, name: &str, path: &str, kind: FileKind) -> CopyFileRequest {
    CopyFileRequest {
        container_id: id.into(),
        name: name.into(),
        path: path.into(),
        kind: kind.into(),
        mode: 0o644,
        ..Default::default()
    }
}

/// CopyFile (host bind mounts copied into the guest): a file and a tree with a symlink
/// reach a container through bind mounts pointed at the copies, a read-only one stays
/// read-only, hostile requests are refused without touching anything outside the copy,
/// and the copies go with the container (also with one that was never created).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_bind_mounts_reach_the_container_and_hostile_copies_are_refused() {
    let agent = Agent::start();
    let client = agent.client().await;
    let rootfs = agent.rootfs("rootfs-copy");
    let id = "copy1";

    let mut file = copy_req(id, "m0", "", FileKind::REGULAR);
    file.data = b"127.0.0.1 copied\n".to_vec();
    let hosts = client.copy_file(ctx(), &file).await.unwrap().guest_path;
    let mut dir = copy_req(id, "m1", "", FileKind::DIRECTORY);
    dir.mode = 0o755;
    let tree = client.copy_file(ctx(), &dir).await.unwrap().guest_path;
    let mut sub = copy_req(id, "m1", "..2024", FileKind::DIRECTORY);
    sub.mode = 0o755;
    client.copy_file(ctx(), &sub).await.unwrap();
    // A file in two chunks.
    let mut token = copy_req(id, "m1", "..2024/token", FileKind::REGULAR);
    token.data = b"s3c".to_vec();
    client.copy_file(ctx(), &token).await.unwrap();
    token.offset = 3;
    token.data = b"ret".to_vec();
    client.copy_file(ctx(), &token).await.unwrap();
    let mut link = copy_req(id, "m1", "token", FileKind::SYMLINK);
    link.symlink_target = "..2024/token".into();
    client.copy_file(ctx(), &link).await.unwrap();
    let state = agent.dir.path().join("state");
    assert!(Path::new(&hosts).starts_with(&state), "{hosts}");

    // Hostile requests: each names the field, nothing is written outside the copies.
    let outside = agent.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut escape_link = copy_req(id, "m1", "escape", FileKind::SYMLINK);
    escape_link.symlink_target = outside.display().to_string();
    client.copy_file(ctx(), &escape_link).await.unwrap();
    let hostile = [
        (
            copy_req(id, "m1", "../../outside/x", FileKind::REGULAR),
            "path",
        ),
        (copy_req(id, "m1", "/etc/passwd", FileKind::REGULAR), "path"),
        (copy_req(id, "../m", "", FileKind::REGULAR), "name"),
        (
            copy_req("../x", "m0", "", FileKind::REGULAR),
            "container_id",
        ),
        // Through the symlink the copy holds: never followed.
        (copy_req(id, "m1", "escape/x", FileKind::REGULAR), "escape"),
        (copy_req(id, "m1", "escape", FileKind::REGULAR), "escape"),
        (copy_req(id, "m1", "", FileKind::SYMLINK), "kind"),
    ];
    for (req, needle) in hostile {
        let result = client.copy_file(ctx(), &req).await;
        match &result {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert!(s.message().contains(needle), "{req:?}: {}", s.message())
            }
            other => panic!("{req:?} accepted: {other:?}"),
        }
    }
    let mut big = copy_req(id, "m2", "", FileKind::REGULAR);
    big.data = vec![b'x'; (1 << 20) + 1];
    assert_status(
        client.copy_file(ctx(), &big).await,
        Code::INVALID_ARGUMENT,
        "data",
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert_serving(&client).await;

    let mut spec: serde_json::Value = serde_json::from_slice(&spec(
        id,
        &[
            "sh",
            "-c",
            "cat /etc/hosts; cat /run/secret/token; echo; echo x >/etc/hosts || echo ro-refused",
        ],
        false,
    ))
    .unwrap();
    spec["mounts"].as_array_mut().unwrap().extend([
        json!({"destination": "/etc/hosts", "type": "bind", "source": hosts,
               "options": ["rbind", "ro"]}),
        json!({"destination": "/run/secret", "type": "bind", "source": tree,
               "options": ["rbind", "ro"]}),
    ]);
    let mut create = create_request(id, &rootfs, &[], false);
    create.spec_json = serde_json::to_vec(&spec).unwrap();
    client.create_container(ctx(), &create).await.unwrap();
    // Copies for an existing container are refused.
    assert_status(
        client
            .copy_file(ctx(), &copy_req(id, "m9", "", FileKind::REGULAR))
            .await,
        Code::FAILED_PRECONDITION,
        "already exists",
    );
    client
        .start_container(ctx(), &container_req(id))
        .await
        .unwrap();
    let out = read_all(&client, id, "", false).await;
    assert_eq!(wait(&client, id, "").await, 0);
    assert_eq!(out, "127.0.0.1 copied\ns3cret\nro-refused\n");
    client
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!Path::new(&hosts).exists() && !Path::new(&tree).exists());

    // Copies of a create the shim abandoned go with RemoveContainer (NOT_FOUND).
    let orphan = client
        .copy_file(ctx(), &copy_req("never", "m0", "", FileKind::REGULAR))
        .await
        .unwrap()
        .guest_path;
    assert!(Path::new(&orphan).exists());
    let removed = client
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: "never".into(),
                force: true,
                ..Default::default()
            },
        )
        .await;
    assert_status(removed, Code::NOT_FOUND, "never");
    assert!(!Path::new(&orphan).exists());
    assert_serving(&client).await;
}
