//! What a container sees from the inside: credentials, capabilities, no_new_privs,
//! seccomp, cgroup limits, hostname, mounts, masked and read-only paths, devices, user
//! namespaces, rlimits, sysctls. Needs root: real namespaces, mounts and cgroups.

mod common;

use common::*;

/// Runs `script` in a container made from the default config changed by `edit`;
/// asserts exit 0 and returns stdout.
fn inside(p: &Palisade, name: &str, script: &str, edit: impl FnOnce(&mut Value)) -> String {
    let b = Bundle::busybox(&["sh", "-c", script]).unwrap();
    b.edit(edit).unwrap();
    let id = id(name);
    let (code, out, err) = p.run_bundle(&id, &b);
    assert_eq!(
        code, 0,
        "{name}: exit {code}, stdout {out:?}, stderr {err:?}"
    );
    p.assert_no_leftovers(&id, &b);
    out
}

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} not in {status}"))
        .trim()
        .to_string()
}

#[test]
fn capabilities_no_new_privs_and_credentials() {
    let p = Palisade::new();
    let status = inside(&p, "caps", "cat /proc/self/status", |_| {});
    // CAP_AUDIT_WRITE (29), CAP_KILL (5), CAP_NET_BIND_SERVICE (10).
    let mask = format!("{:016x}", (1u64 << 29) | (1 << 5) | (1 << 10));
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(&status, set), mask, "{set}");
    }
    assert_eq!(status_field(&status, "CapInh"), "0000000000000000");
    assert_eq!(status_field(&status, "CapAmb"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "Seccomp"), "0");

    let status = inside(&p, "caps2", "cat /proc/self/status; id", |c| {
        c["process"]["noNewPrivileges"] = false.into();
        c["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [5, 7]});
        c["process"]["capabilities"] = json!({
            "bounding": ["CAP_CHOWN", "CAP_NET_RAW", "CAP_SETUID"],
            "effective": ["CAP_NET_RAW"],
            "permitted": ["CAP_NET_RAW", "CAP_CHOWN"],
            "inheritable": ["CAP_CHOWN"],
            "ambient": ["CAP_CHOWN"]
        });
    });
    let bit = |n: u32| 1u64 << n;
    let hex = |m: u64| format!("{m:016x}");
    // For a non-root user, execve keeps only the ambient capabilities (which also become
    // permitted and effective); the bounding and inheritable sets stay as set.
    assert_eq!(
        status_field(&status, "CapBnd"),
        hex(bit(0) | bit(13) | bit(7))
    );
    assert_eq!(status_field(&status, "CapInh"), hex(bit(0)));
    assert_eq!(status_field(&status, "CapAmb"), hex(bit(0)));
    assert_eq!(status_field(&status, "CapPrm"), hex(bit(0)));
    assert_eq!(status_field(&status, "CapEff"), hex(bit(0)));
    assert_eq!(status_field(&status, "NoNewPrivs"), "0");
    assert_eq!(status_field(&status, "Uid"), "1000\t1000\t1000\t1000");
    assert_eq!(status_field(&status, "Gid"), "1001\t1001\t1001\t1001");
    assert_eq!(status_field(&status, "Groups"), "5 7");
}

#[test]
fn seccomp_denies_with_the_profiles_errno() {
    let p = Palisade::new();
    let script = "grep Seccomp: /proc/self/status; mkdir /dev/shm/x 2>&1; echo rc=$?";
    let out = inside(&p, "seccomp", script, |c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{
                "names": ["mkdir", "mkdirat"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 95
            }]
        });
    });
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // 95 is EOPNOTSUPP.
    assert!(
        out.contains("Operation not supported") && out.contains("rc=1"),
        "{out}"
    );
    // Without the profile the same mkdir works.
    let out = inside(&p, "noseccomp", script, |_| {});
    assert!(out.contains("Seccomp:\t0") && out.contains("rc=0"), "{out}");
}

#[test]
fn cgroup_limits_are_visible_inside() {
    let p = Palisade::new();
    let out = inside(
        &p,
        "cgroups",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/cpu/cpu.shares",
        |c| {
            c["linux"]["resources"]["memory"] = json!({"limit": 67108864});
            c["linux"]["resources"]["pids"] = json!({"limit": 42});
            c["linux"]["resources"]["cpu"] = json!({"shares": 512});
        },
    );
    assert_eq!(out, "67108864\n42\n512\n");
}

#[test]
fn update_changes_limits_of_a_running_container() {
    let p = Palisade::new();
    let b = Bundle::busybox(&["sleep", "1000"]).unwrap();
    b.edit(|c| c["linux"]["resources"]["pids"] = json!({"limit": 42}))
        .unwrap();
    let id = id("update");
    p.ok(&[
        "run",
        "--detach",
        "--bundle",
        b.path().to_str().unwrap(),
        &id,
    ]);
    let read = || p.ok(&["exec", &id, "cat", "/sys/fs/cgroup/pids/pids.max"]);
    assert_eq!(read(), "42\n");
    let resources = b.path().join("resources.json");
    std::fs::write(&resources, json!({"pids": {"limit": 17}}).to_string()).unwrap();
    p.ok(&["update", "--resources", resources.to_str().unwrap(), &id]);
    assert_eq!(read(), "17\n");
    p.ok(&["update", "--pids-limit", "23", &id]);
    assert_eq!(read(), "23\n");
    // --resources - reads stdin.
    let mut child = p
        .cmd()
        .args(["update", "--resources", "-", &id])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        json!({"pids": {"limit": 29}}).to_string().as_bytes(),
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(read(), "29\n");
    p.ok(&["update", "--pids-limit", "23", &id]);
    let list: Value = serde_json::from_str(&p.ok(&["list", "--format", "json"])).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "running");
    let stats: Value = serde_json::from_str(&p.ok(&["events", "--stats", &id])).unwrap();
    assert_eq!(stats["type"], "stats");
    assert_eq!(stats["id"], id.as_str());
    // runc's stats shape, as containerd's runc shim decodes it.
    assert_eq!(stats["data"]["pids"]["current"], 1);
    assert_eq!(stats["data"]["pids"]["limit"], 23);
    assert!(stats["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0);
    assert!(stats["data"]["cpu"]["usage"]["total"].as_u64().unwrap() > 0);
    // Without --stats, events streams until the container stops.
    let mut events = p
        .cmd()
        .args(["events", "--interval", "100ms", &id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(events.stdout.take().unwrap()));
    for _ in 0..2 {
        let event: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(event["type"], "stats");
    }
    p.ok(&["kill", &id, "KILL"]);
    assert!(events.wait().unwrap().success());
    p.ok(&["delete", "--force", &id]);
    p.assert_no_leftovers(&id, &b);
}

#[test]
fn hostname_domainname_uid_gid_cwd_env_umask_rlimits_oom_score() {
    let p = Palisade::new();
    let out = inside(
        &p,
        "names",
        "hostname; cat /proc/sys/kernel/domainname; id -u; id -g; pwd; echo $GREETING; umask; ulimit -n; ulimit -Hn; cat /proc/self/oom_score_adj",
        |c| {
            c["hostname"] = "box-1".into();
            c["domainname"] = "example.test".into();
            c["process"]["user"] = json!({"uid": 4242, "gid": 4343, "umask": 23});
            c["process"]["cwd"] = "/tmp".into();
            c["process"]["env"].as_array_mut().unwrap().push("GREETING=hi".into());
            c["process"]["oomScoreAdj"] = 500.into();
            c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]);
        },
    );
    assert_eq!(
        out,
        "box-1\nexample.test\n4242\n4343\n/tmp\nhi\n0027\n256\n512\n500\n"
    );
}

#[test]
fn mounts_masked_and_readonly_paths() {
    let p = Palisade::new();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("file"), "from-host").unwrap();
    let src = shared.path().to_str().unwrap().to_string();
    let script = "\
        cat /data/file; echo; \
        touch /data/new 2>&1 | grep -q 'Read-only' && echo data-ro; \
        grep ' /scratch ' /proc/self/mountinfo | grep -q 'nosuid,nodev' && echo scratch-flags; \
        touch /scratch/ok && echo scratch-rw; \
        touch /rootfile 2>&1 | grep -q 'Read-only' && echo root-ro; \
        wc -c < /proc/timer_list; ls -A /proc/acpi | wc -l; \
        sh -c 'echo 1 > /proc/sys/kernel/domainname' 2>&1 | grep -q 'Read-only' && echo sys-ro; \
        test -c /dev/null && test -c /dev/zero && test -c /dev/urandom && test -c /dev/tty && echo devices; \
        test -c /dev/fuse && stat -c '%t:%T %a' /dev/fuse; \
        readlink /dev/ptmx; readlink /dev/fd; \
        cat /proc/sys/net/ipv4/ip_forward";
    let out = inside(&p, "mounts", script, |c| {
        let mounts = c["mounts"].as_array_mut().unwrap();
        mounts.push(json!({"destination": "/data", "type": "bind", "source": src, "options": ["rbind", "ro"]}));
        mounts.push(json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=1m"]}));
        c["linux"]["devices"] = json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o640}]);
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    });
    assert_eq!(
        out,
        "from-host\ndata-ro\nscratch-flags\nscratch-rw\nroot-ro\n0\n0\nsys-ro\ndevices\na:e5 640\npts/ptmx\n/proc/self/fd\n1\n"
    );
    assert!(!shared.path().join("new").exists());
}

#[test]
fn no_pivot_and_rootfs_propagation() {
    let p = Palisade::new();
    let b = Bundle::busybox(&[
        "sh",
        "-c",
        "cat /etc/hostname; grep -c . /proc/self/mountinfo",
    ])
    .unwrap();
    b.edit(|c| c["linux"]["rootfsPropagation"] = "rprivate".into())
        .unwrap();
    let id = id("nopivot");
    let out = p.ok(&[
        "run",
        "--no-pivot",
        "--bundle",
        b.path().to_str().unwrap(),
        &id,
    ]);
    assert!(out.starts_with("palisade\n"), "{out}");
    p.assert_no_leftovers(&id, &b);
}

#[test]
fn user_namespace_maps_ids() {
    let p = Palisade::new();
    let out = inside(
        &p,
        "userns",
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c %u /bin/busybox; test -c /dev/null && echo null",
        |c| {
            c["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "user"}));
            c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        },
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"]
    );
    assert_eq!(lines[2], "0");
    // Host root's files are unmapped in the namespace: the overflow uid.
    assert_eq!(lines[3], "65534");
    assert_eq!(lines[4], "null");
}

#[test]
fn time_namespace_offsets() {
    let p = Palisade::new();
    let out = inside(&p, "timens", "cut -d. -f1 /proc/uptime", |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "time"}));
        c["linux"]["timeOffsets"] = json!({"boottime": {"secs": 1000000, "nanosecs": 0}});
    });
    let host_uptime: u64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let inside: u64 = out.trim().parse().unwrap();
    assert!(
        inside >= host_uptime + 1_000_000 - 5 && inside <= host_uptime + 1_000_000 + 5,
        "uptime inside {inside}, host {host_uptime}"
    );
}
