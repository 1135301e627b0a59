//! The CRI client of the nested test host's `cri-vm` scenario (tests/test-host/scenarios/
//! cri-vm.sh), built static and run inside L1 against containerd's CRI plugin: a pod with
//! runtime handler `palisade` (VM mode) goes through the kubelet's calls, and the checks
//! look at what is left on the (L1) host.
//!
//!   cri-vm-check --socket S --handler H --image I --containerd-state DIR --log-dir DIR
//!                [--guest-release R] [--step-timeout SECS]
//!
//! Prints one `PASS|FAIL <check> <detail>` line per check (the scenario turns them into
//! PALISADE-TEST lines) and exits 0 only if every check passed:
//!   pod        RunPodSandbox starts exactly one palisade-vmm (and one shim)
//!   containers two containers start in the pod; still that one VMM
//!   boot-id    both containers see the same guest boot id, not the host's (and the guest
//!              kernel release when --guest-release is given)
//!   exec       ExecSync returns stdout, stderr and the exit code
//!   log        the container's stdout and stderr lines are in its CRI log file
//!   stop       StopContainer delivers SIGTERM in the guest (the trap exits 0)
//!   cleanup    after StopPodSandbox + RemovePodSandbox: no VMM, no shim, no new socket or
//!              mount, no VM state dir, no bundle
//! A CRI call that fails or hangs ends the run with a FAIL naming the step; the pod is then
//! still stopped and removed so nothing outlives the scenario.

use std::{
    collections::BTreeSet,
    future::Future,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{ContainerState, VersionRequest};
use palisade_tests::{
    containerd::mounts_below,
    cri::{wait_for_log_line, CriClient, PodNetwork, PodSpec},
};

struct Args {
    socket: PathBuf,
    handler: String,
    image: String,
    containerd_state: PathBuf,
    log_dir: PathBuf,
    guest_release: Option<String>,
    step_timeout: Duration,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut socket, mut handler, mut image, mut state, mut log_dir) =
        (None, None, None, None, None);
    let mut guest_release = None;
    let mut step_timeout = Duration::from_secs(120);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--handler" => handler = Some(value()?),
            "--image" => image = Some(value()?),
            "--containerd-state" => state = Some(PathBuf::from(value()?)),
            "--log-dir" => log_dir = Some(PathBuf::from(value()?)),
            "--guest-release" => guest_release = Some(value()?),
            "--step-timeout" => {
                let v = value()?;
                let secs: u64 = v
                    .parse()
                    .with_context(|| format!("--step-timeout {v:?}: not a number of seconds"))?;
                step_timeout = Duration::from_secs(secs);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Args {
        socket: socket.context("--socket is required")?,
        handler: handler.context("--handler is required")?,
        image: image.context("--image is required")?,
        containerd_state: state.context("--containerd-state is required")?,
        log_dir: log_dir.context("--log-dir is required")?,
        guest_release,
        step_timeout,
    })
}

/// Pids of processes whose command name (`/proc/PID/comm`) is `comm`.
fn pids_named(comm: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim_end() == comm) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// The VMMs and the palisade shims (comm is cut to 15 bytes: "containerd-shim").
fn vmm_pids() -> Vec<u32> {
    pids_named("palisade-vmm")
}

fn palisade_shim_pids() -> Vec<u32> {
    pids_named("containerd-shim")
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("containerd-shim-palisade-v2"))
        })
        .collect()
}

/// Every socket file below `dir` (recursively).
fn sockets_below(dir: &Path) -> BTreeSet<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_socket() {
                found.insert(entry.path());
            }
        }
    }
    found
}

fn entries_of(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the L1 host looks like before the pod; the cleanup check compares against it.
struct HostSnapshot {
    sockets: BTreeSet<PathBuf>,
    mounts: BTreeSet<PathBuf>,
}

impl HostSnapshot {
    fn take() -> Self {
        Self {
            sockets: sockets_below(Path::new("/run")),
            mounts: mounts_below(Path::new("/")).into_iter().collect(),
        }
    }
}

/// The VM state dir of palisade's VM mode (shim config `vm.state_dir` in cri-vm.sh).
const VM_STATE_DIR: &str = "/run/palisade/vm";

struct Checks {
    failed: bool,
}

impl Checks {
    fn pass(&self, check: &str, detail: impl AsRef<str>) {
        println!("PASS {check} {}", detail.as_ref());
    }
    fn fail(&mut self, check: &str, detail: impl AsRef<str>) {
        println!("FAIL {check} {}", detail.as_ref().replace('\n', " | "));
        self.failed = true;
    }
    fn expect(&mut self, check: &str, ok: bool, detail: impl AsRef<str>) {
        if ok {
            self.pass(check, detail);
        } else {
            self.fail(check, detail);
        }
    }
}

/// Bounds one step (a CRI call can hang when the guest does).
async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => bail!("{what}: no answer within {limit:?}"),
    }
}

const APP1_SCRIPT: &str =
    "echo hello-cri-vm; echo err-cri-vm >&2; trap 'exit 0' TERM; while :; do sleep 1; done";
const APP2_SCRIPT: &str = "trap 'exit 0' TERM; while :; do sleep 1; done";

/// What the run created through CRI, so it can be removed whatever happened.
#[derive(Default)]
struct Created {
    pod: Option<String>,
    containers: Vec<String>,
    removed: BTreeSet<String>,
}

/// The pod's life through CRI with every check but `cleanup`.
async fn pod_checks(
    args: &Args,
    cri: &mut CriClient,
    checks: &mut Checks,
    created: &mut Created,
) -> Result<()> {
    let t = args.step_timeout;
    let version = within("Version", t, async {
        Ok(cri
            .runtime
            .version(VersionRequest::default())
            .await?
            .into_inner())
    })
    .await?;
    if !within("ImageStatus", t, cri.has_image(&args.image)).await? {
        bail!(
            "image {} is not visible to CRI (imported into k8s.io?)",
            args.image
        );
    }

    let pod = PodSpec {
        name: "cri-vm-pod",
        uid: "6d0c5e1a-cri-vm-pod",
        log_directory: &args.log_dir,
        network: PodNetwork::Host,
    };
    let started = Instant::now();
    let pod_id = within("RunPodSandbox", t, cri.run_pod(&pod, &args.handler)).await?;
    created.pod = Some(pod_id.clone());
    let vmms = vmm_pids();
    let shims = palisade_shim_pids();
    checks.expect(
        "pod",
        vmms.len() == 1 && shims.len() == 1,
        format!(
            "RunPodSandbox (handler {}, {} {}) in {} ms: palisade-vmm pids {vmms:?}, palisade shim pids {shims:?} (want one each)",
            args.handler,
            version.runtime_name,
            version.runtime_version,
            started.elapsed().as_millis()
        ),
    );

    let started = Instant::now();
    let app1 = within(
        "CreateContainer+StartContainer app1",
        t,
        cri.start_container(
            &pod_id,
            &pod,
            pod.container(
                "app1",
                &args.image,
                &["/bin/sh", "-c", APP1_SCRIPT],
                "app1.log",
            ),
        ),
    )
    .await?;
    created.containers.push(app1.clone());
    let app2 = within(
        "CreateContainer+StartContainer app2",
        t,
        cri.start_container(
            &pod_id,
            &pod,
            pod.container(
                "app2",
                &args.image,
                &["/bin/sh", "-c", APP2_SCRIPT],
                "app2.log",
            ),
        ),
    )
    .await?;
    created.containers.push(app2.clone());
    let s1 = within("ContainerStatus app1", t, cri.container_state(&app1)).await?;
    let s2 = within("ContainerStatus app2", t, cri.container_state(&app2)).await?;
    let vmms_now = vmm_pids();
    checks.expect(
        "containers",
        s1.0 == ContainerState::ContainerRunning
            && s2.0 == ContainerState::ContainerRunning
            && vmms_now == vmms,
        format!(
            "two containers started in {} ms: states {:?}/{:?}; palisade-vmm pids {vmms_now:?} (the pod's: {vmms:?})",
            started.elapsed().as_millis(),
            s1.0,
            s2.0
        ),
    );

    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("reading the host's boot id")?;
    let probe = [
        "/bin/sh",
        "-c",
        "cat /proc/sys/kernel/random/boot_id; uname -r",
    ];
    let e1 = within("ExecSync app1", t, cri.exec_sync(&app1, &probe, t)).await?;
    let e2 = within("ExecSync app2", t, cri.exec_sync(&app2, &probe, t)).await?;
    let parse = |out: &str| {
        let mut lines = out.lines();
        (
            lines.next().unwrap_or("").to_string(),
            lines.next().unwrap_or("").to_string(),
        )
    };
    let ((id1, rel1), (id2, rel2)) = (parse(&e1.stdout), parse(&e2.stdout));
    let release_ok = args
        .guest_release
        .as_ref()
        .is_none_or(|r| rel1 == *r && rel2 == *r);
    checks.expect(
        "boot-id",
        e1.exit_code == 0
            && e2.exit_code == 0
            && id1.len() == 36
            && id1 == id2
            && id1 != host_boot_id.trim()
            && release_ok,
        format!(
            "guest boot id app1 {id1} app2 {id2} (host {}); uname -r {rel1}/{rel2} (guest kernel {}); exits {}/{}",
            host_boot_id.trim(),
            args.guest_release.as_deref().unwrap_or("not given"),
            e1.exit_code,
            e2.exit_code
        ),
    );

    let exec = within(
        "ExecSync exit 3",
        t,
        cri.exec_sync(
            &app2,
            &["/bin/sh", "-c", "echo exec-ok; echo exec-err >&2; exit 3"],
            t,
        ),
    )
    .await?;
    checks.expect(
        "exec",
        exec.exit_code == 3 && exec.stdout == "exec-ok\n" && exec.stderr == "exec-err\n",
        format!(
            "ExecSync: exit {} stdout {:?} stderr {:?} (want 3, \"exec-ok\\n\", \"exec-err\\n\")",
            exec.exit_code, exec.stdout, exec.stderr
        ),
    );

    let log = args.log_dir.join("app1.log");
    let logged = async {
        wait_for_log_line(&log, "stdout", "hello-cri-vm", t).await?;
        wait_for_log_line(&log, "stderr", "err-cri-vm", t).await
    };
    match logged.await {
        Ok(_) => checks.pass(
            "log",
            format!(
                "{} has `stdout F hello-cri-vm` and `stderr F err-cri-vm`",
                log.display()
            ),
        ),
        Err(e) => checks.fail("log", format!("{e:#}")),
    }

    let started = Instant::now();
    within(
        "StopContainer app1",
        t,
        cri.stop_container(&app1, Duration::from_secs(10)),
    )
    .await?;
    let (state, code) = within("ContainerStatus app1", t, cri.container_state(&app1)).await?;
    checks.expect(
        "stop",
        state == ContainerState::ContainerExited && code == 0,
        format!(
            "StopContainer in {} ms: {state:?}, exit code {code} (the TERM trap exits 0)",
            started.elapsed().as_millis()
        ),
    );
    within(
        "StopContainer app2",
        t,
        cri.stop_container(&app2, Duration::from_secs(10)),
    )
    .await?;
    for id in [&app1, &app2] {
        within("RemoveContainer", t, cri.remove_container(id)).await?;
        created.removed.insert(id.clone());
    }
    Ok(())
}

/// Waits (bounded) for the pod's VMM and shim to go, then compares the host with `before`.
async fn cleanup_check(args: &Args, checks: &mut Checks, before: &HostSnapshot, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while (!vmm_pids().is_empty() || !palisade_shim_pids().is_empty()) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = HostSnapshot::take();
    let mut problems = Vec::new();
    let vmms = vmm_pids();
    if !vmms.is_empty() {
        problems.push(format!("palisade-vmm still running: {vmms:?}"));
    }
    let shims = palisade_shim_pids();
    if !shims.is_empty() {
        problems.push(format!("palisade shim still running: {shims:?}"));
    }
    let sockets: Vec<_> = after.sockets.difference(&before.sockets).collect();
    if !sockets.is_empty() {
        problems.push(format!("new sockets left: {sockets:?}"));
    }
    let mounts: Vec<_> = after.mounts.difference(&before.mounts).collect();
    if !mounts.is_empty() {
        problems.push(format!("new mounts left: {mounts:?}"));
    }
    let vm_dirs = entries_of(Path::new(VM_STATE_DIR));
    if !vm_dirs.is_empty() {
        problems.push(format!("VM state dirs left in {VM_STATE_DIR}: {vm_dirs:?}"));
    }
    let bundles = args
        .containerd_state
        .join("io.containerd.runtime.v2.task/k8s.io");
    let left: Vec<_> = ids.iter().filter(|id| bundles.join(id).exists()).collect();
    if !left.is_empty() {
        problems.push(format!("bundles left in {}: {left:?}", bundles.display()));
    }
    if problems.is_empty() {
        checks.pass(
            "cleanup",
            "StopPodSandbox + RemovePodSandbox: no palisade-vmm, no shim, no new socket or mount, no VM state dir, no bundle",
        );
    } else {
        checks.fail("cleanup", problems.join("; "));
    }
}

async fn run(args: Args) -> Result<bool> {
    let mut checks = Checks { failed: false };
    let already = vmm_pids();
    if !already.is_empty() {
        bail!("palisade-vmm already running before the pod: {already:?}");
    }
    let before = HostSnapshot::take();
    let mut cri = within(
        "connect",
        args.step_timeout,
        CriClient::connect(&args.socket),
    )
    .await?;
    let mut created = Created::default();
    let outcome = pod_checks(&args, &mut cri, &mut checks, &mut created).await;
    if let Err(e) = &outcome {
        checks.fail("cri", format!("{e:#}"));
    }
    // Remove whatever still exists (containers, then the pod), also after a failure, so
    // the cleanup check and the next scenario see a clean host.
    let t = args.step_timeout;
    for id in &created.containers {
        if created.removed.contains(id) {
            continue;
        }
        let removed = within("StopContainer+RemoveContainer", t, async {
            cri.stop_container(id, Duration::from_secs(1)).await?;
            cri.remove_container(id).await
        })
        .await;
        if let Err(e) = removed {
            checks.fail("remove", format!("{e:#}"));
        }
    }
    if let Some(pod) = &created.pod {
        let removed = within(
            "StopPodSandbox+RemovePodSandbox",
            t,
            cri.stop_and_remove_pod(pod),
        )
        .await;
        if let Err(e) = removed {
            checks.fail("remove", format!("{e:#}"));
        }
    }
    let ids: Vec<String> = created
        .pod
        .iter()
        .chain(&created.containers)
        .cloned()
        .collect();
    cleanup_check(&args, &mut checks, &before, &ids).await;
    Ok(!checks.failed)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("cri-vm-check: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("FAIL cri {e:#}");
            ExitCode::FAILURE
        }
    }
}
