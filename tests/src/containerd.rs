//! A private containerd (own config, root, state and socket) for tests.
//!
//! Every [`Containerd`] lives in its own temporary directory, so several engineers' and
//! several tests' daemons run side by side without sharing a socket, a content store, a
//! snapshotter, shim sockets (containerd derives those from its own socket path) or
//! cgroups (each gets a unique containerd namespace). Dropping it deletes its tasks and
//! containers, stops the daemon and any shim it left, unmounts what is still mounted
//! below its directory and removes the directory.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::image::{ImageConfig, OciImage};

/// How long containerd may take to serve its socket after it is spawned.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one `ctr` invocation may take before the test fails (instead of hanging).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion like `Command::output`, but kills it after `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The runtime type of palisade's shim.
pub const PALISADE_RUNTIME: &str = "io.containerd.palisade.v2";

/// The CRI runtime handler tests register for palisade's native mode.
pub const PALISADE_NATIVE_HANDLER: &str = "palisade-native";

/// Directory holding the built palisade binaries (`palisade`,
/// `containerd-shim-palisade-v2`): `$PALISADE_BIN_DIR`, else the cargo profile directory
/// the running test binary was built into (`<target>/<profile>/deps/<test>` → `<target>/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PALISADE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// The CRI plugin's settings, when a test wants it enabled.
#[derive(Debug, Clone)]
pub struct CriConfig {
    /// Image reference of the pod sandbox ("pause") image, imported before use.
    pub sandbox_image: String,
    /// Directory with the CNI plugin binaries (Debian: `/usr/lib/cni`).
    pub cni_bin_dir: PathBuf,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            sandbox_image: "docker.io/palisade/pause:latest".into(),
            cni_bin_dir: PathBuf::from("/usr/lib/cni"),
        }
    }
}

/// Options for a private containerd.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Enable the CRI plugin with a `palisade-native` runtime handler.
    pub cri: Option<CriConfig>,
    /// Extra environment for containerd, which its shims inherit (e.g. PALISADE_CONFIG).
    pub env: Vec<(String, String)>,
}

/// A running private containerd.
pub struct Containerd {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    namespace: String,
    options: Options,
}

impl Containerd {
    /// Starts a private containerd with default options (no CRI plugin).
    pub fn start() -> Result<Self> {
        Self::start_with(Options::default())
    }

    /// Starts a private containerd and waits until it answers on its socket.
    pub fn start_with(options: Options) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::Builder::new()
            .prefix("palisade-ctrd-")
            .tempdir()
            .context("creating the containerd directory")?;
        let namespace = format!(
            "palisade-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut containerd = Self {
            dir,
            daemon: None,
            namespace,
            options,
        };
        containerd.write_config()?;
        containerd.spawn_daemon()?;
        Ok(containerd)
    }

    /// The pid of the running daemon.
    pub fn daemon_pid(&self) -> Option<i32> {
        self.daemon.as_ref().map(|d| d.id() as i32)
    }

    /// The temporary directory holding config, root, state, sockets and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket (also the CRI endpoint when CRI is enabled).
    pub fn socket(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// The containerd namespace this instance's helpers use.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The daemon's log file (useful in assertion messages).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("containerd.log")
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// containerd's state directory, where shims keep their bundles.
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// The bundle directory containerd gives the shim of container `id`.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    fn write_config(&self) -> Result<()> {
        let d = self.dir().display().to_string();
        let mut config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
oom_score = 0
"#
        );
        let mut disabled = vec![
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.tracing.processor.v1.otlp",
        ];
        if self.options.cri.is_none() {
            disabled.push("io.containerd.grpc.v1.cri");
        }
        let disabled: Vec<String> = disabled.iter().map(|p| format!("\"{p}\"")).collect();
        writeln!(config, "disabled_plugins = [{}]", disabled.join(", "))?;
        write!(
            config,
            r#"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "debug"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        )?;
        if let Some(cri) = &self.options.cri {
            let cni_conf = self.dir().join("cni");
            fs::create_dir_all(&cni_conf)?;
            // A unique bridge and subnet per instance would need coordination between
            // parallel tests; a per-pid bridge name and a /24 derived from it is enough.
            let n = self.cni_index();
            fs::write(
                cni_conf.join("10-palisade.conflist"),
                format!(
                    r#"{{
  "cniVersion": "0.4.0",
  "name": "palisade-test-{n}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "pal{n}",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "10.{n}.0.0/24" }}]],
        "dataDir": "{d}/cni-ipam"
      }}
    }},
    {{ "type": "loopback" }}
  ]
}}
"#
                ),
            )?;
            write!(
                config,
                r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}]
      runtime_type = "{runtime}"
      pod_annotations = ["io.palisade.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
                sandbox = cri.sandbox_image,
                handler = PALISADE_NATIVE_HANDLER,
                runtime = PALISADE_RUNTIME,
                bin = cri.cni_bin_dir.display(),
                conf = cni_conf.display(),
            )?;
        }
        fs::write(self.dir().join("config.toml"), config).context("writing config.toml")?;
        Ok(())
    }

    /// Bridge `pal<N>` and subnet `10.<N>.0.0/24` of this instance's CNI network.
    fn cni_index(&self) -> u32 {
        std::process::id() % 200 + 20
    }

    fn spawn_daemon(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening containerd.log")?;
        // containerd looks shims up on its PATH: put the freshly built
        // containerd-shim-palisade-v2 first.
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(self.dir().join("config.toml"))
            .env("PATH", path)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning containerd (is it installed?)")?;
        self.daemon = Some(daemon);

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if self.socket().exists() {
                if let Ok(out) = self.ctr(["version"]) {
                    if out.status.success() {
                        return Ok(());
                    }
                }
            }
            if let Some(daemon) = self.daemon.as_mut() {
                if let Some(status) = daemon.try_wait()? {
                    bail!("containerd exited early ({status}):\n{}", self.log_tail(30));
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not come up in {STARTUP_TIMEOUT:?}:\n{}",
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops containerd (SIGTERM, then SIGKILL) without touching its shims and tasks.
    pub fn stop_daemon(&mut self) -> Result<()> {
        if let Some(mut daemon) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while daemon.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = daemon.kill();
                    daemon.wait()?;
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Restarts containerd with the same config: running shims and tasks survive.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon()?;
        self.spawn_daemon()
    }

    /// Runs `ctr --address <socket> --namespace <ns> ARGS...` and returns its output.
    pub fn ctr<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.ctr_command(args);
        output_within(&mut cmd, CTR_TIMEOUT)
    }

    /// A `ctr` command pointed at this containerd, for callers that need to spawn it.
    pub fn ctr_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// The `ctr events` lines published while `body` runs.
    pub fn events_during(&self, body: impl FnOnce()) -> Result<String> {
        use std::io::Read;
        let mut events = self
            .ctr_command(["events"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("spawning ctr events")?;
        // ctr subscribes asynchronously; give it a moment before the first event, and the
        // last event a moment to arrive.
        thread::sleep(Duration::from_millis(300));
        body();
        thread::sleep(Duration::from_millis(500));
        let _ = events.kill();
        let mut out = String::new();
        if let Some(mut stdout) = events.stdout.take() {
            stdout
                .read_to_string(&mut out)
                .context("reading ctr events")?;
        }
        let _ = events.wait();
        Ok(out)
    }

    /// Runs `ctr ARGS...`, failing with its stderr unless it exits 0; returns stdout.
    pub fn ctr_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let printable: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let out = self.ctr(&args)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}):\nstdout: {}\nstderr: {}",
                printable.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds a busybox image with `config`, imports it as `name` (`repo:tag` form, tag
    /// `latest`) and unpacks it for the default snapshotter.
    pub fn import_busybox(&self, name: &str, config: &ImageConfig) -> Result<()> {
        let base = name.strip_suffix(":latest").with_context(|| {
            format!("image name {name} must end in :latest (the tag umoci writes)")
        })?;
        let image = OciImage::busybox(config)?;
        self.ctr_ok([
            "images".as_ref(),
            "import".as_ref(),
            "--base-name".as_ref(),
            base.as_ref(),
            image.archive().as_os_str(),
        ])?;
        let listed = self.ctr_ok(["images", "ls", "-q"])?;
        if !listed.lines().any(|l| l.trim() == name) {
            bail!("imported image {name} is not listed: {listed}");
        }
        Ok(())
    }

    /// Imports `name` into the `k8s.io` namespace, where the CRI plugin looks for images.
    pub fn import_busybox_for_cri(&self, name: &str, config: &ImageConfig) -> Result<()> {
        let base = name
            .strip_suffix(":latest")
            .with_context(|| format!("image name {name} must end in :latest"))?;
        let image = OciImage::busybox(config)?;
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args([
                "--namespace",
                "k8s.io",
                "images",
                "import",
                "--base-name",
                base,
            ])
            .arg(image.archive())
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr import into k8s.io failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Pids of shim processes serving this containerd (their `-address` is our socket).
    pub fn shim_pids(&self) -> Vec<i32> {
        let socket = self.socket().display().to_string();
        let mut pids = Vec::new();
        for (pid, dir) in crate::procfs::pids() {
            let Ok(cmdline) = fs::read(dir.join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .map(|a| String::from_utf8_lossy(a).contains("containerd-shim"))
                .unwrap_or(false);
            let ours = args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == socket.as_bytes());
            if is_shim && ours {
                pids.push(pid);
            }
        }
        pids
    }

    /// The socket palisade's shim serves for pod (grouping) `id` of this containerd: the
    /// path `containerd-shim` derives from containerd's address, namespace and id.
    pub fn shim_socket_path(&self, id: &str) -> PathBuf {
        let address = containerd_shim::socket_address(
            &self.socket().display().to_string(),
            &self.namespace,
            id,
        );
        PathBuf::from(address.trim_start_matches("unix://"))
    }

    /// Mount points at or below this instance's directory, deepest first.
    pub fn mounts_below_dir(&self) -> Vec<PathBuf> {
        mounts_below(self.dir())
    }

    fn cleanup_tasks(&self, namespace: &str) {
        let run = |args: &[&str]| {
            Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .args(["--namespace", namespace])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .output()
                .ok()
        };
        if let Some(out) = run(&["tasks", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
                if !id.is_empty() {
                    run(&["tasks", "kill", "--all", "--signal", "SIGKILL", id]);
                    run(&["tasks", "delete", "--force", id]);
                }
            }
        }
        if let Some(out) = run(&["containers", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
                if !id.is_empty() {
                    run(&["containers", "delete", id]);
                }
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- containerd log ({}), last lines ---\n{}",
                self.log_path().display(),
                self.log_tail(60)
            );
        }
        if self.daemon.is_some() {
            let namespace = self.namespace.clone();
            self.cleanup_tasks(&namespace);
            if self.options.cri.is_some() {
                self.cleanup_tasks("k8s.io");
            }
        }
        let shims = self.shim_pids();
        let _ = self.stop_daemon();
        // Shims whose tasks could not be deleted outlive containerd: end them by pid.
        for pid in shims {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for mount in self.mounts_below_dir() {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
        // Per-namespace directories runtimes leave once their containers are gone: runc's
        // (and the shim tests' palisade) state roots and the cgroup parents `/<ns>`.
        let mut namespaces = vec![self.namespace.clone()];
        if self.options.cri.is_some() {
            namespaces.push("k8s.io".into());
        }
        for namespace in &namespaces {
            for root in ["/run/containerd/runc", "/run/palisade-test"] {
                // Only once empty: another test's CRI pods may still live in k8s.io.
                let dir = Path::new(root).join(namespace);
                if namespace == &self.namespace {
                    let _ = fs::remove_dir_all(&dir);
                } else {
                    let _ = fs::remove_dir(&dir);
                }
            }
            if let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") {
                for controller in controllers.flatten() {
                    remove_cgroup_tree(&controller.path().join(namespace));
                }
            }
        }
        if self.options.cri.is_some() {
            // CNI's bridge plugin leaves the bridge it created.
            let _ = Command::new("ip")
                .args(["link", "del", &format!("pal{}", self.cni_index())])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Removes an (empty of processes) cgroup directory tree, children first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&child.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(file) = fs::File::open("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = BufReader::new(file)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|line| line.split(' ').nth(4).map(unescape_mountinfo))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
pub(crate) fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\"), r"/trailing\");
    }

    // Needs root and containerd installed.
    #[test]
    fn private_containerd_starts_imports_and_cleans_up() {
        let ctrd = Containerd::start().unwrap();
        ctrd.import_busybox("docker.io/palisade/busybox:latest", &ImageConfig::default())
            .unwrap();
        let dir = ctrd.dir().to_path_buf();
        let socket = ctrd.socket();
        assert!(socket.exists());
        drop(ctrd);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// How `ctr run` reaches the runtime under test.
#[derive(Debug, Clone)]
pub enum RuntimeUnderTest {
    /// containerd's own runc shim driving a runc-compatible binary (`--runc-binary`).
    RuncBinary(PathBuf),
    /// A shim v2 runtime type (`--runtime io.containerd.palisade.v2`).
    Shim(String),
}

impl RuntimeUnderTest {
    /// containerd's runc shim driving the `palisade` CLI from [`bin_dir`].
    pub fn palisade_cli() -> Self {
        Self::RuncBinary(bin_dir().join("palisade"))
    }

    /// palisade's own shim.
    pub fn palisade_shim() -> Self {
        Self::Shim(PALISADE_RUNTIME.into())
    }

    /// The `ctr run` flags selecting this runtime.
    pub fn run_flags(&self) -> Vec<String> {
        match self {
            Self::RuncBinary(bin) => vec!["--runc-binary".into(), bin.display().to_string()],
            Self::Shim(runtime) => vec!["--runtime".into(), runtime.clone()],
        }
    }
}

impl Containerd {
    /// `ctr run [runtime flags] EXTRA... IMAGE ID ARGS...`, returning the output.
    pub fn run_container(
        &self,
        runtime: &RuntimeUnderTest,
        extra: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Result<Output> {
        let mut all: Vec<String> = vec!["run".into()];
        all.extend(runtime.run_flags());
        all.extend(extra.iter().map(|s| s.to_string()));
        all.push(image.into());
        all.push(id.into());
        all.extend(args.iter().map(|s| s.to_string()));
        self.ctr(&all)
    }

    /// The status column of `ctr task ls` for `id` (RUNNING, PAUSED, STOPPED...).
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        let listing = self.ctr_ok(["tasks", "ls"])?;
        Ok(listing.lines().skip(1).find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        }))
    }

    /// Polls `ctr task ls` until `id` has `status`.
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.task_status(id)?;
            if now.as_deref() == Some(status) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("task {id} is {now:?}, not {status}, after {timeout:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pids `ctr task ps` reports for `id`.
    pub fn task_pids(&self, id: &str) -> Result<Vec<i32>> {
        let listing = self.ctr_ok(["tasks", "ps", id])?;
        Ok(listing
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect())
    }
}

/// Runs `cmd` with a new pseudo-terminal as its stdin/stdout/stderr (what `ctr run -t`
/// requires), returning everything written to the terminal and the exit status.
pub fn run_on_pty(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(String, std::process::ExitStatus)> {
    use std::io::Read;

    // A distinctive window size, so tests can see it arrive in the container.
    let size = nix::pty::Winsize {
        ws_row: 37,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).context("openpty")?;
    let slave = fs::File::from(pty.slave);
    let mut child = cmd
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // The slave copies are closed in this process once `cmd` is dropped by the caller;
    // reading the master ends with EIO when the last slave holder exits.
    let master = fs::File::from(pty.master);
    let reader = {
        let mut master = master.try_clone()?;
        thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match master.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
            out
        })
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    // Command keeps its stdio handles until dropped; the reader ends at EIO after that.
    drop(std::mem::replace(cmd, Command::new("true")));
    let out = reader.join().unwrap_or_default();
    Ok((String::from_utf8_lossy(&out).into_owned(), status))
}
