//! Command-line interface of `palisade`, flag-compatible with what runc offers and what
//! containerd-shim-runc-v2 (go-runc) passes.

mod info;
mod lifecycle;
mod log;
mod signals;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use palisade_runtime::Runtime;

#[derive(Debug, Parser)]
#[command(
    name = "palisade",
    version,
    about = "palisade: an OCI container runtime"
)]
pub struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = palisade_runtime::state::DEFAULT_ROOT)]
    root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    log_format: log::Format,
    /// Use systemd to manage cgroups (not supported).
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Bundle directory (holds config.json).
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// Unix socket to send the pty master to.
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// File to write the init's pid to.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Do not use pivot_root (for a rootfs on ramfs).
    #[arg(long = "no-pivot")]
    no_pivot: bool,
    /// Do not create a new session keyring.
    #[arg(long = "no-new-keyring")]
    no_new_keyring: bool,
    /// Pass N extra fds (3..3+N) to the container.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    container_id: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container (its process waits for `start`).
    Create(CreateArgs),
    /// Start a created container.
    Start { container_id: String },
    /// Create, start and wait for a container; exits with its exit code.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Do not wait for the container.
        #[arg(short, long)]
        detach: bool,
    },
    /// Print a container's state as JSON.
    State { container_id: String },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Send a signal to a container's init (or all its processes).
    Kill {
        #[arg(short, long)]
        all: bool,
        container_id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container.
    Delete {
        #[arg(short, long)]
        force: bool,
        container_id: String,
    },
    /// Run a process in a running container.
    Exec(lifecycle::ExecArgs),
    /// List a container's processes.
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        container_id: String,
        /// Arguments for ps(1) (default -ef).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Freeze a container's processes.
    Pause { container_id: String },
    /// Thaw a paused container.
    Resume { container_id: String },
    /// Change a container's resource limits.
    Update(info::UpdateArgs),
    /// Print container events (stats, OOM) as JSON lines.
    Events {
        /// Print one stats event and exit.
        #[arg(long)]
        stats: bool,
        /// Interval between stats events.
        #[arg(long, default_value = "5s")]
        interval: String,
        container_id: String,
    },
    /// Write a default config.json.
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// A spec for a rootless container.
        #[arg(long)]
        rootless: bool,
    },
    /// Print the runtime's features as JSON.
    Features,
    /// Report whether this host can run palisade's VM mode; exits 1 when it cannot.
    Check {
        /// Shim config whose [vm] section names the VMM, guest kernel and initramfs
        /// (default: $PALISADE_CONFIG, then /etc/palisade/configuration.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if let Err(e) = log::init(cli.log.as_deref(), cli.log_format, cli.debug) {
        eprintln!("palisade: opening log {:?}: {e}", cli.log);
        return 1;
    }
    let logs_to_file = cli.log.is_some();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            // containerd's shim reads the error from the log file; a human reads stderr.
            if logs_to_file {
                tracing::error!("{msg}");
            }
            eprintln!("palisade: {msg}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    if cli.systemd_cgroup {
        bail!("--systemd-cgroup is not supported: palisade manages cgroupfs directly");
    }
    let runtime = || Runtime::new(&cli.root);
    match cli.command {
        Command::Create(args) => lifecycle::create(&runtime()?, args).map(|_| 0),
        Command::Start { container_id } => {
            runtime()?.load(&container_id)?.start()?;
            Ok(0)
        }
        Command::Run { create, detach } => lifecycle::run(&runtime()?, create, detach),
        Command::State { container_id } => {
            let state = runtime()?.load(&container_id)?.state()?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(0)
        }
        Command::List { format, quiet } => info::list(&runtime()?, &format, quiet).map(|_| 0),
        Command::Kill {
            all,
            container_id,
            signal,
        } => {
            let signal = signals::parse(&signal)?;
            runtime()?.load(&container_id)?.kill(signal, all)?;
            Ok(0)
        }
        Command::Delete {
            force,
            container_id,
        } => lifecycle::delete(&runtime()?, &container_id, force).map(|_| 0),
        Command::Exec(args) => lifecycle::exec(&runtime()?, args),
        Command::Ps {
            format,
            container_id,
            ps_args,
        } => info::ps(&runtime()?, &container_id, &format, &ps_args).map(|_| 0),
        Command::Pause { container_id } => {
            runtime()?.load(&container_id)?.pause()?;
            Ok(0)
        }
        Command::Resume { container_id } => {
            runtime()?.load(&container_id)?.resume()?;
            Ok(0)
        }
        Command::Update(args) => info::update(&runtime()?, args).map(|_| 0),
        Command::Events {
            stats,
            interval,
            container_id,
        } => info::events(&runtime()?, &container_id, stats, &interval).map(|_| 0),
        Command::Spec { bundle, rootless } => info::spec(&bundle, rootless).map(|_| 0),
        Command::Features => {
            println!("{}", serde_json::to_string_pretty(&info::features())?);
            Ok(0)
        }
        Command::Check { config } => {
            use palisade_runtime::check;
            let settings = check::VmSettings::load(config.as_deref())?;
            let report = check::run(
                &check::HostRoot("/".into()),
                &settings,
                check::containerd_version(),
            );
            print!("{report}");
            Ok(if report.vm_ready() { 0 } else { 1 })
        }
    }
}
