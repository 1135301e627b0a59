//! `palisade-agent`: PID 1 of palisade's microVM. It serves the `palisade.agent.v1` ttrpc
//! API on vsock and runs the pod's containers with `palisade-runtime`.
//!
//! On a host (`--listen unix:PATH`, not PID 1) it serves the same API without the PID-1
//! setup, which is how its RPCs are tested without a VM.

mod containers;
mod copy;
mod error;
mod init;
mod network;
mod reaper;
mod sandbox;
mod service;
mod stdio;
mod storage;
mod transport;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use palisade_agent_protocol::DEFAULT_VSOCK_PORT;
use tokio::signal::unix::{signal, SignalKind};

use crate::transport::Listen;

#[derive(Debug, Parser)]
#[command(version, about = "palisade's in-guest agent")]
struct Args {
    /// Where to serve: vsock:PORT or unix:PATH.
    #[arg(long, default_value_t = Listen::Vsock(DEFAULT_VSOCK_PORT))]
    listen: Listen,
    /// Do the PID-1 setup (mounts, cgroup2, loopback) even when not PID 1.
    #[arg(long)]
    init: bool,
    /// State directory: runtime state, bundles (containers/<id>) and sandbox files.
    #[arg(long, default_value = "/run/palisade")]
    state_dir: PathBuf,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "PALISADE_AGENT_LOG", default_value = "info")]
    log: String,
}

fn main() {
    let is_pid1 = std::process::id() == 1;
    // The kernel passes unknown boot parameters to init as arguments; as PID 1, only
    // accept ours and ignore the rest instead of dying on them.
    let args = if is_pid1 {
        Args::try_parse().unwrap_or_else(|e| {
            eprintln!("palisade-agent: ignoring arguments: {e}");
            Args::parse_from(["palisade-agent"])
        })
    } else {
        Args::parse()
    };
    let pid1 = is_pid1 || args.init;

    if pid1 {
        // Before any thread exists: setup changes the root and the environment.
        if let Err(e) = init::setup() {
            init::fatal(&e);
        }
    }
    init_logging(&args.log, pid1);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
        .and_then(|rt| rt.block_on(serve(args, pid1)));
    match result {
        Ok(()) if pid1 => init::power_off(),
        Ok(()) => {}
        Err(e) if pid1 => init::fatal(&e),
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::exit(1);
        }
    }
}

fn init_logging(filter: &str, console: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!console)
        .init();
}

async fn serve(args: Args, pid1: bool) -> Result<()> {
    if !pid1 {
        init::become_subreaper()?;
    }
    let reaper = reaper::Reaper::start().context("installing the SIGCHLD handler")?;
    let runtime = palisade_runtime::Runtime::new(args.state_dir.join("runtime"))
        .context("opening the runtime state root")?;
    let containers =
        containers::Containers::new(runtime, args.state_dir.join("containers"), reaper);
    let service =
        service::AgentService::new(containers.clone(), args.state_dir.join("sandbox"), pid1);

    let server = ttrpc::r#async::Server::new().register_service(service.register());
    let mut server = transport::bind(server, &args.listen)?;
    server
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("starting the server: {e}"))?;
    tracing::info!(listen = %args.listen, pid1, "palisade-agent serving");

    // PID 1 ignores SIGTERM/SIGINT from the kernel's default handling anyway; on a host they
    // end the agent cleanly.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
    server
        .shutdown()
        .await
        .map_err(|e| anyhow::anyhow!("server shutdown: {e}"))?;
    if let Err(e) = containers.remove_all().await {
        tracing::warn!("removing containers at shutdown: {e}");
    }
    if let Listen::Unix(path) = &args.listen {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
