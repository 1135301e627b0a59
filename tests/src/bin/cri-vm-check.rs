//! The CRI client of the nested test host's `cri-vm` scenario (tests/test-host/scenarios/
//! cri-vm.sh), built static and run inside L1 against containerd's CRI plugin: a pod with
//! runtime handler `palisade` (VM mode) goes through the kubelet's calls, and the checks
//! look at what is left on the (L1) host.
//!
//!   cri-vm-check --socket S --handler H --image I --containerd-state DIR --log-dir DIR
//!                [--guest-release R] [--step-timeout SECS]
//!                [--network host|cni --cni-gateway IP --cni-mtu N [--cni-gateway6 IP6]]
//!
//! Prints one `PASS|FAIL <check> <detail>` line per check (the scenario turns them into
//! PALISADE-TEST lines) and exits 0 only if every check passed. `--network host` (the
//! default), a host-network pod:
//!   pod        RunPodSandbox starts exactly one palisade-vmm (and one shim)
//!   containers two containers start in the pod; still that one VMM
//!   boot-id    both containers see the same guest boot id, not the host's (and the guest
//!              kernel release when --guest-release is given)
//!   exec       ExecSync returns stdout, stderr and the exit code
//!   log        the container's stdout and stderr lines are in its CRI log file
//!   stop       StopContainer delivers SIGTERM in the guest (the trap exits 0)
//!   cleanup    after StopPodSandbox + RemovePodSandbox: no VMM, no shim, no new socket or
//!              mount, no VM state dir, no bundle
//! `--network cni`, a pod in its own network namespace set up by the CRI plugin's CNI
//! config (a bridge whose address is `--cni-gateway`, MTU `--cni-mtu`):
//!   cni-pod      RunPodSandbox starts one palisade-vmm and one shim; PodSandboxStatus gives
//!                the pod an IP; its netns holds the CNI veth `eth0` and the shim's tap
//!   cni-identity in the guest (ExecSync), eth0 has the veth's MAC, MTU and the pod's IP, and
//!                a default route via the gateway
//!   cni-dns      in the guest: the pod's name as hostname, the pod's DNS config (servers,
//!                search, options) in /etc/resolv.conf, the node's /etc/hosts
//!   cni-ping     the container pings the gateway (the bridge in L1)
//!   cni-fetch    the container fetches a token over HTTP from a server this program runs
//!                in L1, which sees the pod's IP as the peer (no NAT)
//!   cni-serve    this program (L1) fetches a token from busybox httpd in the container, at
//!                the pod's IP
//!   cni-ipv6     (with --cni-gateway6: dual-stack) the guest's eth0 has the veth's global
//!                IPv6 address, which is CRI's second pod IP, and a default route via the
//!                IPv6 gateway; the container pings it; L1 fetches the token over IPv6
//!   cni-localhost a second container of the pod fetches that token from 127.0.0.1 and sees
//!                the same eth0 (the pod's containers share its network)
//!   cni-pod-to-pod a second CNI pod (its own VM) fetches that token at the first pod's IP
//!   cni-vmm-crash kill -9 of the second pod's VMM: the shim removes its tap from the netns
//!                (which lives on until StopPodSandbox), CRI reports the pod NOTREADY and its
//!                container EXITED 137, the first pod still serves L1
//!   cni-cleanup  as `cleanup`
//!   cni-netns    after the pod: its netns file is gone; the namespace itself (held open by
//!                this program) has nothing but `lo` (no tap, no veth, so no tc filter) and
//!                no process; no bridge port is left in L1; host-local released the IP
//! A CRI call that fails or hangs ends the run with a FAIL naming the step; the pod is then
//! still stopped and removed so nothing outlives the scenario.

use std::{
    collections::BTreeSet,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{ContainerState, DnsConfig, PodSandboxState, VersionRequest};
use palisade_tests::{
    containerd::mounts_below,
    cri::{wait_for_log_line, CriClient, PodNetwork, PodSpec},
    netns::{format_mac, processes_in, Netns},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    socket: PathBuf,
    handler: String,
    image: String,
    containerd_state: PathBuf,
    log_dir: PathBuf,
    guest_release: Option<String>,
    step_timeout: Duration,
    network: PodNetwork,
    /// `--network cni`: the bridge's address (the pod's gateway) and the MTU CNI gives.
    cni: Option<CniExpect>,
}

#[derive(Debug, Clone, Copy)]
struct CniExpect {
    gateway: Ipv4Addr,
    mtu: u32,
    /// Dual-stack: the bridge's IPv6 address.
    gateway6: Option<Ipv6Addr>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut socket, mut handler, mut image, mut state, mut log_dir) =
        (None, None, None, None, None);
    let mut guest_release = None;
    let mut step_timeout = Duration::from_secs(120);
    let mut network = PodNetwork::Host;
    let (mut gateway, mut mtu, mut gateway6) = (None, None, None);
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
            "--network" => {
                network = match value()?.as_str() {
                    "host" => PodNetwork::Host,
                    "cni" => PodNetwork::Cni,
                    v => bail!("--network {v:?}: host or cni"),
                }
            }
            "--cni-gateway" => {
                let v = value()?;
                gateway = Some(
                    v.parse::<Ipv4Addr>()
                        .with_context(|| format!("--cni-gateway {v:?}: not an IPv4 address"))?,
                );
            }
            "--cni-gateway6" => {
                let v = value()?;
                gateway6 = Some(
                    v.parse::<Ipv6Addr>()
                        .with_context(|| format!("--cni-gateway6 {v:?}: not an IPv6 address"))?,
                );
            }
            "--cni-mtu" => {
                let v = value()?;
                mtu = Some(
                    v.parse::<u32>()
                        .with_context(|| format!("--cni-mtu {v:?}: not a number"))?,
                );
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let cni = match (network, gateway, mtu) {
        (PodNetwork::Cni, Some(gateway), Some(mtu)) => Some(CniExpect {
            gateway,
            mtu,
            gateway6,
        }),
        (PodNetwork::Cni, _, _) => bail!("--network cni needs --cni-gateway and --cni-mtu"),
        (PodNetwork::Host, None, None) if gateway6.is_none() => None,
        (PodNetwork::Host, _, _) => {
            bail!("--cni-gateway/--cni-gateway6/--cni-mtu need --network cni")
        }
    };
    Ok(Args {
        socket: socket.context("--socket is required")?,
        handler: handler.context("--handler is required")?,
        image: image.context("--image is required")?,
        containerd_state: state.context("--containerd-state is required")?,
        log_dir: log_dir.context("--log-dir is required")?,
        guest_release,
        step_timeout,
        network,
        cni,
    })
}

/// Pids of processes whose command name (`/proc/PID/comm`) is `comm`.
fn pids_named(comm: &str) -> Vec<u32> {
    palisade_tests::procfs::pids()
        .into_iter()
        .filter(|(_, dir)| {
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .filter_map(|(pid, _)| u32::try_from(pid).ok())
        .collect()
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
/// Each step is logged to stderr (the scenario keeps it): where a run that hit the
/// scenario's time limit was.
async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    eprintln!("cri-vm-check: {what} ...");
    let result = match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("{what}: no answer within {limit:?}")),
    };
    eprintln!(
        "cri-vm-check: {what}: {} after {} ms",
        if result.is_ok() { "ok" } else { "failed" },
        started.elapsed().as_millis()
    );
    result
}

/// CreateContainer + StartContainer of a busybox `sh -c SCRIPT` container `name` in the pod
/// (logging to `<name>.log`), recorded for cleanup; returns its id.
async fn start_shell(
    cri: &mut CriClient,
    created: &mut Created,
    limit: Duration,
    (pod_id, pod): (&str, &PodSpec<'_>),
    (name, image, script): (&str, &str, &str),
) -> Result<String> {
    let config = pod.container(
        name,
        image,
        &["/bin/sh", "-c", script],
        &format!("{name}.log"),
    );
    let id = within(
        &format!("CreateContainer+StartContainer {name}"),
        limit,
        cri.start_container(pod_id, pod, config),
    )
    .await?;
    created.containers.push(id.clone());
    Ok(id)
}

const APP1_SCRIPT: &str =
    "echo hello-cri-vm; echo err-cri-vm >&2; trap 'exit 0' TERM; while :; do sleep 1; done";
const APP2_SCRIPT: &str = "trap 'exit 0' TERM; while :; do sleep 1; done";

/// What the run created through CRI, so it can be removed whatever happened.
#[derive(Default)]
struct Created {
    pods: Vec<String>,
    containers: Vec<String>,
    /// Containers and pods already removed.
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
        dns: None,
    };
    let started = Instant::now();
    let pod_id = within("RunPodSandbox", t, cri.run_pod(&pod, &args.handler)).await?;
    created.pods.push(pod_id.clone());
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
    let app1 = start_shell(
        cri,
        created,
        t,
        (&pod_id, &pod),
        ("app1", &args.image, APP1_SCRIPT),
    )
    .await?;
    let app2 = start_shell(
        cri,
        created,
        t,
        (&pod_id, &pod),
        ("app2", &args.image, APP2_SCRIPT),
    )
    .await?;
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

/// Waits (bounded) for the pod's VMM and shim to go, then compares the host with `before`;
/// reports as check `name`.
async fn cleanup_check(
    args: &Args,
    checks: &mut Checks,
    name: &str,
    before: &HostSnapshot,
    ids: &[String],
) {
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
            name,
            "StopPodSandbox + RemovePodSandbox: no palisade-vmm, no shim, no new socket or mount, no VM state dir, no bundle",
        );
    } else {
        checks.fail(name, problems.join("; "));
    }
}

/// Where CNI's host-local IPAM keeps its leases (its default `dataDir`): one file per
/// allocated IP under a directory per network.
const HOST_LOCAL_DIR: &str = "/var/lib/cni/networks";
/// The CNI pod's DNS config (nothing answers there: only the files are checked).
const POD_DNS_SERVER: &str = "10.95.0.10";
const POD_DNS_SEARCH: &str = "default.svc.palisade.test";
/// The port busybox httpd listens on in the CNI pod's container.
const POD_HTTP_PORT: u16 = 8080;

/// A fresh random token (the kernel's uuid generator: no rand crate needed).
fn token() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading /proc/sys/kernel/random/uuid")?
        .trim()
        .replace('-', ""))
}

/// The ports of every bridge in L1 (`/sys/class/net/<bridge>/brif/<port>`).
fn bridge_ports() -> Vec<String> {
    let mut ports = Vec::new();
    for dev in entries_of(Path::new("/sys/class/net")) {
        for port in entries_of(&Path::new("/sys/class/net").join(&dev).join("brif")) {
            ports.push(format!("{dev}:{port}"));
        }
    }
    ports.sort();
    ports
}

/// host-local's lease files for `ips` (one per allocated IP, in a directory per network).
fn host_local_leases(ips: &[IpAddr]) -> Vec<PathBuf> {
    entries_of(Path::new(HOST_LOCAL_DIR))
        .into_iter()
        .flat_map(|net| {
            ips.iter()
                .map(move |ip| Path::new(HOST_LOCAL_DIR).join(&net).join(ip.to_string()))
        })
        .filter(|lease| lease.exists())
        .collect()
}

/// The pod netns, opened while the pod ran and held until the end: after the pod it shows
/// what the shim (taps, tc) and CNI (veth) left in it, whatever removed its bind mount.
struct HeldNetns {
    netns: Netns,
    path: PathBuf,
    inode: u64,
    /// The pod's IPs (host-local leases), IPv4 first.
    ips: Vec<IpAddr>,
}

/// The body of an HTTP response (after the blank line), if it is a 200.
fn http_body(response: &str) -> Option<&str> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.lines()
        .next()
        .is_some_and(|status| status.split(' ').nth(1) == Some("200"))
        .then_some(body)
}

/// Serves one HTTP request on `listener` with `body`; returns the peer's address.
async fn serve_once(listener: tokio::net::TcpListener, body: String) -> Result<SocketAddr> {
    let (mut stream, peer) = listener.accept().await.context("accept")?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
        let n = stream.read(&mut buf).await.context("reading the request")?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(response.as_bytes())
        .await
        .context("writing the response")?;
    stream.shutdown().await.context("closing")?;
    Ok(peer)
}

/// GET `path` from `addr` over HTTP/1.0; returns the whole response.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .context("sending the request")?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .context("reading the response")?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// [`http_get`], each attempt bounded by 10 s, retried until `limit` (a server that is still
/// starting refuses the connection).
async fn http_get_retried(addr: SocketAddr, path: &str, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let result = match tokio::time::timeout(Duration::from_secs(10), http_get(addr, path)).await
        {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("no answer within 10 s")),
        };
        match result {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// What the guest's eth0 looks like from inside a container.
#[derive(Debug, Default, PartialEq, Eq)]
struct GuestEth0 {
    mac: String,
    mtu: Option<u32>,
    /// `inet A/P` entries of `ip -o addr show dev eth0`.
    addresses: Vec<String>,
    /// Its `inet6 A/P` entries.
    addresses6: Vec<String>,
    default_via: Option<String>,
    default_via6: Option<String>,
}

/// Parses the identity probe's output: the MAC line, the MTU line, then `ip -o addr`,
/// `ip route` and `ip -6 route` lines.
fn parse_guest_eth0(out: &str) -> GuestEth0 {
    let mut lines = out.lines();
    let mac = lines.next().unwrap_or("").trim().to_owned();
    let mtu = lines.next().and_then(|l| l.trim().parse().ok());
    let mut eth0 = GuestEth0 {
        mac,
        mtu,
        ..Default::default()
    };
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "inet" || *w == "inet6") {
            if let Some(addr) = words.get(i + 1) {
                let list = if words[i] == "inet" {
                    &mut eth0.addresses
                } else {
                    &mut eth0.addresses6
                };
                list.push((*addr).to_owned());
            }
        }
        if let ["default", "via", gateway, ..] = words.as_slice() {
            let slot = if gateway.contains(':') {
                &mut eth0.default_via6
            } else {
                &mut eth0.default_via
            };
            *slot = Some((*gateway).to_owned());
        }
    }
    eth0
}

const CNI_PROBE: &str = "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; \
     ip -o addr show dev eth0; ip route; ip -6 route";

/// The CNI pod's life through CRI with every check but the cleanup ones.
async fn cni_pod_checks(
    args: &Args,
    cni: CniExpect,
    cri: &mut CriClient,
    checks: &mut Checks,
    created: &mut Created,
    held: &mut Option<HeldNetns>,
) -> Result<()> {
    let t = args.step_timeout;
    if !within("ImageStatus", t, cri.has_image(&args.image)).await? {
        bail!(
            "image {} is not visible to CRI (imported into k8s.io?)",
            args.image
        );
    }
    let pod = PodSpec {
        name: "cri-cni-pod",
        uid: "0b6f8f3e-cri-cni-pod",
        log_directory: &args.log_dir,
        network: PodNetwork::Cni,
        // What a kubelet passes (cluster DNS, search path, options): containerd writes it
        // into the pod's resolv.conf, which must reach the containers in the guest.
        dns: Some(DnsConfig {
            servers: vec![POD_DNS_SERVER.into()],
            searches: vec![POD_DNS_SEARCH.into()],
            options: vec!["ndots:5".into()],
        }),
    };
    let started = Instant::now();
    let pod_id = within("RunPodSandbox", t, cri.run_pod(&pod, &args.handler)).await?;
    created.pods.push(pod_id.clone());
    let run_ms = started.elapsed().as_millis();
    let (vmms, shims, ports) = (vmm_pids(), palisade_shim_pids(), bridge_ports());
    let status = within("PodSandboxStatus", t, cri.pod_status(&pod_id)).await?;
    let ip: Option<Ipv4Addr> = status.ip.parse().ok();
    // The namespace the shim was given; opened now so it can be inspected after the pod.
    let netns = match &status.netns {
        Some(path) => Some(Netns::open(path)?),
        None => None,
    };
    let links = match &netns {
        Some(ns) => ns.links()?,
        None => Vec::new(),
    };
    let has_tap = links.iter().any(|l| l.ends_with("_palisade"));
    // host-local's lease for the IP: the cni-netns check later wants it gone.
    let leases = ip.map_or_else(Vec::new, |ip| host_local_leases(&[IpAddr::V4(ip)]));
    checks.expect(
        "cni-pod",
        vmms.len() == 1
            && shims.len() == 1
            && status.state == PodSandboxState::SandboxReady
            && ip.is_some()
            && links.iter().any(|l| l == "eth0")
            && has_tap
            && ports.len() == 1
            && leases.len() == 1,
        format!(
            "RunPodSandbox (handler {}, pod netns) in {run_ms} ms: {:?}, IP {:?}, netns {} with links {links:?} (want eth0 and the shim's tap), L1 bridge ports {ports:?}, host-local lease {leases:?}; palisade-vmm pids {vmms:?}, shim pids {shims:?} (want one each)",
            args.handler,
            status.state,
            status.ip,
            status
                .netns
                .as_ref()
                .map_or("none".into(), |p| p.display().to_string()),
        ),
    );
    let (Some(ip), Some(netns), Some(path)) = (ip, netns, status.netns) else {
        bail!("the pod has no IPv4 address or no network namespace: the network checks need both");
    };
    let inode = netns.inode()?;
    let veth = netns.link_info("eth0")?;
    *held = Some(HeldNetns {
        netns,
        path,
        inode,
        ips: std::iter::once(IpAddr::V4(ip))
            .chain(
                status
                    .additional_ips
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok()),
            )
            .collect(),
    });

    // The container serves a token with busybox httpd (daemonised) and idles until TERM.
    let served = token()?;
    let script = format!(
        "mkdir -p /www && echo {served} >/www/token && httpd -p {POD_HTTP_PORT} -h /www; trap 'exit 0' TERM; while :; do sleep 1; done"
    );
    let web = start_shell(
        cri,
        created,
        t,
        (&pod_id, &pod),
        ("web", &args.image, &script),
    )
    .await?;

    let probe = within(
        "ExecSync identity",
        t,
        cri.exec_sync(&web, &["/bin/sh", "-c", CNI_PROBE], t),
    )
    .await?;
    let guest = parse_guest_eth0(&probe.stdout);
    let (veth_mac, veth_ip) = (
        format_mac(&veth.mac),
        veth.ipv4.map(|(a, p)| format!("{a}/{p}")),
    );
    let gateway = cni.gateway.to_string();
    checks.expect(
        "cni-identity",
        probe.exit_code == 0
            && guest.mac == veth_mac
            && guest.mtu == Some(veth.mtu)
            && veth.mtu == cni.mtu
            && veth.ipv4.map(|(a, _)| a) == Some(ip)
            && veth_ip.as_ref().is_some_and(|v| guest.addresses.contains(v))
            && guest.default_via.as_deref() == Some(gateway.as_str()),
        format!(
            "guest eth0: MAC {} MTU {:?} inet {:?} default via {:?}; the pod netns's veth eth0: MAC {veth_mac} MTU {} inet {veth_ip:?}; CRI's pod IP {ip}; want equal, MTU {}, default via {gateway} (exit {}, stderr {:?})",
            guest.mac,
            guest.mtu,
            guest.addresses,
            guest.default_via,
            veth.mtu,
            cni.mtu,
            probe.exit_code,
            probe.stderr.trim()
        ),
    );

    // The pod's name as hostname and the kubelet's DNS config reach the guest, as the
    // files containerd prepared for the pod (resolv.conf, hosts).
    let files = within(
        "ExecSync hostname/resolv.conf/hosts",
        t,
        cri.exec_sync(
            &web,
            &[
                "/bin/sh",
                "-c",
                "hostname; echo --; cat /etc/resolv.conf; echo --; cat /etc/hosts",
            ],
            t,
        ),
    )
    .await?;
    let mut parts = files.stdout.splitn(3, "--\n");
    let (hostname, resolv, hosts) = (
        parts.next().unwrap_or("").trim(),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let want_resolv = [
        format!("nameserver {POD_DNS_SERVER}"),
        format!("search {POD_DNS_SEARCH}"),
        "options ndots:5".to_owned(),
    ];
    checks.expect(
        "cni-dns",
        files.exit_code == 0
            && hostname == pod.name
            && want_resolv
                .iter()
                .all(|w| resolv.lines().any(|l| l.trim() == w))
            && !node_hosts.is_empty()
            && hosts == node_hosts,
        format!(
            "in the guest: hostname {hostname:?} (want {:?}); /etc/resolv.conf {:?} (want {want_resolv:?}); /etc/hosts {} the node's ({} bytes) (exit {}, stderr {:?})",
            pod.name,
            resolv.trim(),
            if hosts == node_hosts { "equals" } else { "differs from" },
            node_hosts.len(),
            files.exit_code,
            files.stderr.trim()
        ),
    );

    let ping = within(
        "ExecSync ping",
        t,
        cri.exec_sync(&web, &["ping", "-c", "3", "-W", "5", gateway.as_str()], t),
    )
    .await?;
    let summary = ping
        .stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("")
        .to_owned();
    checks.expect(
        "cni-ping",
        ping.exit_code == 0 && summary.contains(" 0% packet loss"),
        format!(
            "ping -c 3 {gateway} (the L1 bridge) from the container: exit {}, {summary:?} {}",
            ping.exit_code,
            ping.stderr.trim()
        ),
    );

    // Container -> L1: a server of ours on every L1 address; the container asks the bridge.
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .context("binding the L1 test server")?;
    let port = listener
        .local_addr()
        .context("the test server's port")?
        .port();
    let fetched_token = token()?;
    let mut server = tokio::spawn(tokio::time::timeout(
        t,
        serve_once(listener, fetched_token.clone()),
    ));
    let url = format!("http://{gateway}:{port}/token");
    let fetch = within(
        "ExecSync wget",
        t,
        cri.exec_sync(&web, &["wget", "-q", "-O", "-", url.as_str()], t),
    )
    .await;
    // wget may exit once it has the body, before the server task has returned.
    let peer = match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
        Ok(Ok(Ok(Ok(peer)))) => Ok(peer),
        Ok(Ok(Ok(Err(e)))) => Err(format!("{e:#}")),
        Ok(Ok(Err(_))) => Err(format!("no connection within {t:?}")),
        Ok(Err(e)) => Err(format!("server task: {e}")),
        Err(_) => {
            server.abort();
            Err("no connection within 5 s after wget returned".into())
        }
    };
    match fetch {
        Ok(out) => checks.expect(
            "cni-fetch",
            out.exit_code == 0
                && out.stdout == fetched_token
                && matches!(&peer, Ok(p) if p.ip() == IpAddr::V4(ip)),
            format!(
                "wget {url} in the container: exit {}, body {:?} (want {fetched_token:?}); the L1 server saw the peer {peer:?} (want the pod IP {ip}) {}",
                out.exit_code,
                out.stdout,
                out.stderr.trim()
            ),
        ),
        Err(e) => checks.fail("cni-fetch", format!("{e:#}; L1 server: {peer:?}")),
    }

    // L1 -> pod: the pod IP's httpd (it may still be starting: retried for a while).
    let addr = SocketAddr::from((ip, POD_HTTP_PORT));
    let started = Instant::now();
    match http_get_retried(addr, "/token", t).await {
        Ok(r) => {
            let body = http_body(&r).map(str::trim_end);
            checks.expect(
                "cni-serve",
                body == Some(served.as_str()),
                format!(
                    "L1 GET http://{addr}/token (busybox httpd in the container) in {} ms: body {body:?}, want {served:?}",
                    started.elapsed().as_millis()
                ),
            )
        }
        Err(e) => checks.fail("cni-serve", format!("L1 GET http://{addr}/token: {e:#}")),
    }

    if let Some(gateway6) = cni.gateway6 {
        ipv6_check(
            checks,
            cri,
            &web,
            &status.additional_ips,
            &veth.ipv6,
            &guest,
            gateway6,
            &served,
            t,
        )
        .await?;
    }

    // A second container of the pod shares its network (Kubernetes: containers of a pod
    // reach each other on localhost); in VM mode both are in the guest's namespace.
    let client = start_shell(
        cri,
        created,
        t,
        (&pod_id, &pod),
        ("client", &args.image, APP2_SCRIPT),
    )
    .await?;
    let local_url = format!("http://127.0.0.1:{POD_HTTP_PORT}/token");
    let local = within(
        "ExecSync wget localhost",
        t,
        cri.exec_sync(
            &client,
            &[
                "/bin/sh",
                "-c",
                &format!("wget -q -O - {local_url} && cat /sys/class/net/eth0/address"),
            ],
            t,
        ),
    )
    .await?;
    let mut lines = local.stdout.lines();
    let (body, mac) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    checks.expect(
        "cni-localhost",
        local.exit_code == 0 && body == served && !mac.is_empty() && mac == guest.mac,
        format!(
            "a second container: wget {local_url} (the first one's httpd) exit {}, body {body:?} (want {served:?}); its eth0 MAC {mac} (the first's {}) {}",
            local.exit_code,
            guest.mac,
            local.stderr.trim()
        ),
    );

    // Pod to pod (Kubernetes: pods reach each other at their IPs, no NAT): a second pod,
    // its own VM behind its own veth and tap, fetches the token from the first pod's IP
    // across the bridge.
    let peer_pod = PodSpec {
        name: "cri-cni-peer",
        uid: "5a1d2c77-cri-cni-peer",
        log_directory: &args.log_dir,
        network: PodNetwork::Cni,
        dns: None,
    };
    let started = Instant::now();
    let peer_id = within(
        "RunPodSandbox peer",
        t,
        cri.run_pod(&peer_pod, &args.handler),
    )
    .await?;
    created.pods.push(peer_id.clone());
    let peer_status = within("PodSandboxStatus peer", t, cri.pod_status(&peer_id)).await?;
    let peer = start_shell(
        cri,
        created,
        t,
        (&peer_id, &peer_pod),
        ("peer", &args.image, APP2_SCRIPT),
    )
    .await?;
    let peer_ms = started.elapsed().as_millis();
    let vmms_now = vmm_pids();
    let url = format!("http://{ip}:{POD_HTTP_PORT}/token");
    let got = within(
        "ExecSync wget pod to pod",
        t,
        cri.exec_sync(&peer, &["wget", "-q", "-O", "-", url.as_str()], t),
    )
    .await?;
    let peer_ip = peer_status.ip.parse::<Ipv4Addr>().ok();
    checks.expect(
        "cni-pod-to-pod",
        vmms_now.len() == 2
            && peer_ip.is_some_and(|p| p != ip)
            && got.exit_code == 0
            && got.stdout.trim_end() == served,
        format!(
            "a second CNI pod (IP {:?}, up with its container in {peer_ms} ms; palisade-vmm pids {vmms_now:?}, want two): wget {url} (the first pod's httpd) exit {}, body {:?} (want {served:?}) {}",
            peer_status.ip,
            got.exit_code,
            got.stdout.trim_end(),
            got.stderr.trim()
        ),
    );

    // The peer pod's VMM dies (kill -9): the shim takes its tap down itself (the netns lives
    // on until StopPodSandbox), CRI sees the pod and its container end, and the first pod
    // is untouched. StopPodSandbox + RemovePodSandbox below then clean up as usual.
    let peer_vmms: Vec<u32> = vmms_now
        .iter()
        .filter(|p| !vmms.contains(p))
        .copied()
        .collect();
    let peer_netns = match &peer_status.netns {
        Some(path) => Some(Netns::open(path)?),
        None => None,
    };
    match (peer_vmms.as_slice(), peer_netns) {
        ([pid], Some(peer_netns)) => {
            vmm_crash_check(
                checks,
                cri,
                (*pid, &peer_id, &peer, &peer_netns),
                (addr_of_first(ip), &served),
                t,
            )
            .await?
        }
        (pids, netns) => checks.fail(
            "cni-vmm-crash",
            format!(
                "cannot tell the peer pod's VMM ({pids:?}) or netns ({})",
                netns.is_some()
            ),
        ),
    }

    for id in [&web, &client, &peer] {
        within(
            "StopContainer",
            t,
            cri.stop_container(id, Duration::from_secs(10)),
        )
        .await?;
        within("RemoveContainer", t, cri.remove_container(id)).await?;
        created.removed.insert(id.clone());
    }
    within(
        "StopPodSandbox+RemovePodSandbox peer",
        t,
        cri.stop_and_remove_pod(&peer_id),
    )
    .await?;
    created.removed.insert(peer_id);
    Ok(())
}

/// The first CNI pod's httpd.
fn addr_of_first(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, POD_HTTP_PORT))
}

/// Kills the peer pod's VMM (`pid`) and waits (bounded) for: no tap left in its netns (CNI's
/// veth stays), PodSandboxStatus NOTREADY, its container EXITED with 137; then the first
/// pod (`first`: its httpd and token) still answers L1.
async fn vmm_crash_check(
    checks: &mut Checks,
    cri: &mut CriClient,
    (pid, pod_id, container, netns): (u32, &str, &str, &Netns),
    (first, served): (SocketAddr, &str),
    t: Duration,
) -> Result<()> {
    let started = Instant::now();
    let pid = i32::try_from(pid).context("VMM pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("kill -9 {pid}"))?;
    eprintln!("cri-vm-check: killed the peer pod's palisade-vmm {pid}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (links, state, container_state) = loop {
        let links = netns.links()?;
        let state = within("PodSandboxStatus peer", t, cri.pod_status(pod_id))
            .await?
            .state;
        let container_state =
            within("ContainerStatus peer", t, cri.container_state(container)).await?;
        let done = !links.iter().any(|l| l.ends_with("_palisade"))
            && state == PodSandboxState::SandboxNotready
            && container_state.0 == ContainerState::ContainerExited;
        eprintln!("cri-vm-check: after the kill: links {links:?}, pod {state:?}, container {container_state:?}");
        if done || Instant::now() > deadline {
            break (links, state, container_state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let settled_ms = started.elapsed().as_millis();
    let first_body = match http_get_retried(first, "/token", Duration::from_secs(10)).await {
        Ok(r) => http_body(&r).map(|b| b.trim_end().to_owned()),
        Err(e) => Some(format!("error: {e:#}")),
    };
    checks.expect(
        "cni-vmm-crash",
        links.iter().any(|l| l == "eth0")
            && !links.iter().any(|l| l.ends_with("_palisade"))
            && state == PodSandboxState::SandboxNotready
            && container_state == (ContainerState::ContainerExited, 137)
            && first_body.as_deref() == Some(served),
        format!(
            "kill -9 of the peer pod's palisade-vmm {pid}: after {settled_ms} ms its netns has {links:?} (want eth0, no tap), the pod {state:?}, its container {:?} exit {} (want NOTREADY, EXITED 137); the first pod's httpd at {first} then answers {first_body:?} (want {served:?})",
            container_state.0, container_state.1
        ),
    );
    Ok(())
}

/// Dual-stack: the pod's IPv6 address from CRI, the veth and the guest agree; the container
/// pings the IPv6 gateway and L1 reaches the container's httpd over IPv6.
#[allow(clippy::too_many_arguments)]
async fn ipv6_check(
    checks: &mut Checks,
    cri: &mut CriClient,
    web: &str,
    additional_ips: &[String],
    veth6: &[(Ipv6Addr, u8)],
    guest: &GuestEth0,
    gateway6: Ipv6Addr,
    served: &str,
    t: Duration,
) -> Result<()> {
    let ip6 = additional_ips
        .iter()
        .find_map(|ip| ip.parse::<Ipv6Addr>().ok());
    let veth6_text: Vec<String> = veth6.iter().map(|(a, p)| format!("{a}/{p}")).collect();
    let gateway = gateway6.to_string();
    let ping = within(
        "ExecSync ping IPv6",
        t,
        cri.exec_sync(web, &["ping", "-c", "3", "-W", "5", gateway.as_str()], t),
    )
    .await?;
    let summary = ping
        .stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("")
        .to_owned();
    let fetched = match ip6 {
        Some(ip6) => {
            let addr = SocketAddr::from((ip6, POD_HTTP_PORT));
            http_get_retried(addr, "/token", t)
                .await
                .map(|r| http_body(&r).map(|b| b.trim_end().to_owned()))
                .map_err(|e| format!("{e:#}"))
        }
        None => Err("no IPv6 pod IP".into()),
    };
    let ok = ip6.is_some_and(|ip6| {
        veth6.len() == 1 && veth6[0].0 == ip6 && guest.addresses6.contains(&veth6_text[0])
    }) && guest.default_via6.as_deref() == Some(gateway.as_str())
        && ping.exit_code == 0
        && summary.contains(" 0% packet loss")
        && matches!(&fetched, Ok(Some(body)) if body == served);
    checks.expect(
        "cni-ipv6",
        ok,
        format!(
            "CRI's additional pod IPs {additional_ips:?}; the veth's global IPv6 {veth6_text:?}; guest eth0 inet6 {:?} default via {:?} (want the veth's, via {gateway}); ping -c 3 {gateway}: exit {}, {summary:?} {}; L1 GET http://[{}]:{POD_HTTP_PORT}/token: {fetched:?} (want {served:?})",
            guest.addresses6,
            guest.default_via6,
            ping.exit_code,
            ping.stderr.trim(),
            ip6.map_or("?".into(), |ip| ip.to_string()),
        ),
    );
    Ok(())
}

/// After the pod: what is left of its network.
fn netns_check(checks: &mut Checks, held: &HeldNetns) {
    let mut problems = Vec::new();
    if held.path.exists() {
        problems.push(format!(
            "the netns file {} still exists",
            held.path.display()
        ));
    }
    match held.netns.links() {
        Ok(links) if links == ["lo"] => {}
        Ok(links) => problems.push(format!("the pod netns still has {links:?} (want only lo)")),
        Err(e) => problems.push(format!("listing the pod netns's links: {e:#}")),
    }
    let inside = processes_in(held.inode);
    if !inside.is_empty() {
        problems.push(format!("processes still in the pod netns: {inside:?}"));
    }
    let ports = bridge_ports();
    if !ports.is_empty() {
        problems.push(format!("L1 bridge ports left: {ports:?}"));
    }
    let leases = host_local_leases(&held.ips);
    if !leases.is_empty() {
        problems.push(format!("host-local still holds pod IPs: {leases:?}"));
    }
    if problems.is_empty() {
        checks.pass(
            "cni-netns",
            format!(
                "{} removed; the namespace (held open by the check) has only lo: no tap, no veth, no tc filter; no process in it; no L1 bridge port; host-local released {:?}",
                held.path.display(),
                held.ips
            ),
        );
    } else {
        checks.fail("cni-netns", problems.join("; "));
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
    let mut held = None;
    let outcome = match args.cni {
        None => pod_checks(&args, &mut cri, &mut checks, &mut created).await,
        Some(cni) => {
            cni_pod_checks(&args, cni, &mut cri, &mut checks, &mut created, &mut held).await
        }
    };
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
    for pod in &created.pods {
        if created.removed.contains(pod) {
            continue;
        }
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
        .pods
        .iter()
        .chain(&created.containers)
        .cloned()
        .collect();
    let name = match args.network {
        PodNetwork::Host => "cleanup",
        PodNetwork::Cni => "cni-cleanup",
    };
    cleanup_check(&args, &mut checks, name, &before, &ids).await;
    if let Some(held) = &held {
        netns_check(&mut checks, held);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_probe_output_is_parsed() {
        let out = "02:42:0a:58:00:05\n1450\n\
                   2: eth0    inet 10.88.0.5/24 brd 10.88.0.255 scope global eth0\\       valid_lft forever preferred_lft forever\n\
                   2: eth0    inet6 fd95::5/64 scope global \\       valid_lft forever preferred_lft forever\n\
                   2: eth0    inet6 fe80::42:aff:fe58:5/64 scope link \\       valid_lft forever preferred_lft forever\n\
                   default via 10.88.0.1 dev eth0 \n\
                   10.88.0.0/24 dev eth0 scope link  src 10.88.0.5 \n\
                   fd95::/64 dev eth0  metric 256 \n\
                   default via fd95::1 dev eth0  metric 1024 \n";
        assert_eq!(
            parse_guest_eth0(out),
            GuestEth0 {
                mac: "02:42:0a:58:00:05".into(),
                mtu: Some(1450),
                addresses: vec!["10.88.0.5/24".into()],
                addresses6: vec!["fd95::5/64".into(), "fe80::42:aff:fe58:5/64".into()],
                default_via: Some("10.88.0.1".into()),
                default_via6: Some("fd95::1".into()),
            }
        );
        let empty = parse_guest_eth0("");
        assert_eq!(empty.mtu, None);
        assert!(empty.addresses.is_empty() && empty.default_via.is_none());
    }

    #[test]
    fn only_a_200_response_has_a_body() {
        assert_eq!(
            http_body("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc"),
            Some("abc")
        );
        assert_eq!(http_body("HTTP/1.0 404 Not Found\r\n\r\nnope"), None);
        assert_eq!(http_body("garbage"), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_test_server_answers_one_get_and_names_the_peer() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve_once(listener, "tok".into()));
        let response = http_get(addr, "/token").await.expect("get");
        assert_eq!(http_body(&response), Some("tok"));
        let peer = server.await.expect("join").expect("serve");
        assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
