//! `palisade-vmm`: boot a guest in a KVM microVM; see `--help` for flags and exit status.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use palisade_vmm::vmm::{install_termination_handlers, Vmm};
use palisade_vmm::{Cli, VmConfig};
use tracing_subscriber::EnvFilter;

fn run(cli: &Cli) -> anyhow::Result<palisade_vmm::Outcome> {
    let config = VmConfig::from_cli(cli).context("invalid configuration")?;
    install_termination_handlers().context("installing signal handlers")?;
    let vmm = Vmm::build(config, Vec::new()).context("cannot create the VM")?;
    vmm.run().context("VM run failed")
}

fn main() -> ExitCode {
    // One malloc arena for all threads: glibc shrinks a secondary (per-thread) arena only
    // after reading /proc/sys/vm/overcommit_memory, an `openat` the device and vCPU seccomp
    // filters rightly refuse — seen killing the VMM under sustained vsock traffic. The main
    // arena shrinks with brk alone. Must run before any thread exists.
    // SAFETY: mallopt only adjusts allocator parameters; called while single-threaded.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    match run(&cli) {
        Ok(outcome) => {
            match &outcome {
                palisade_vmm::Outcome::GuestFailure(why) => {
                    eprintln!("palisade-vmm: guest failed: {why}")
                }
                palisade_vmm::Outcome::HostError(why) => eprintln!("palisade-vmm: error: {why}"),
                _ => tracing::info!("exiting: {outcome:?}"),
            }
            ExitCode::from(outcome.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("palisade-vmm: {e:#}");
            ExitCode::from(1)
        }
    }
}
