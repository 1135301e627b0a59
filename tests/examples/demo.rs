//! The README's demo: one busybox bundle run natively by the `palisade` CLI, then the same
//! image through containerd and palisade's shim (`ctr run --runtime io.containerd.palisade.v2`)
//! with a private containerd. Run by `tests/demo.sh` (as root), which builds the binaries
//! first and points `PALISADE_BIN_DIR` at them.

use std::process::Command;

use anyhow::{bail, Context, Result};
use palisade_tests::bundle::Bundle;
use palisade_tests::containerd::{bin_dir, Containerd, RuntimeUnderTest};
use palisade_tests::image::ImageConfig;

const SCRIPT: &str = "echo \"hello from $(hostname), pid $$, uid $(id -u)\"; \
                      grep -E '^(NoNewPrivs|Seccomp|CapEff)' /proc/self/status";

fn main() -> Result<()> {
    native_cli()?;
    containerd_shim()?;
    Ok(())
}

/// `palisade run` on a bundle, as runc users would.
fn native_cli() -> Result<()> {
    println!("== native: palisade run (busybox bundle) ==");
    let bundle = Bundle::busybox(&["/bin/sh", "-c", SCRIPT])?;
    let root = tempfile::Builder::new()
        .prefix("palisade-demo-")
        .tempdir()?;
    let id = format!("demo-{}", std::process::id());
    let status = Command::new(bin_dir().join("palisade"))
        .arg("--root")
        .arg(root.path())
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg(&id)
        .status()
        .context("running palisade")?;
    if !status.success() {
        bail!("palisade run exited with {status}");
    }
    Ok(())
}

/// The same through containerd 1.6 and `containerd-shim-palisade-v2` (native mode).
fn containerd_shim() -> Result<()> {
    println!("== native: ctr run --runtime io.containerd.palisade.v2 (private containerd) ==");
    let containerd = Containerd::start()?;
    let image = "docker.io/palisade/demo:latest";
    containerd.import_busybox(image, &ImageConfig::default())?;
    let id = format!("demo-shim-{}", std::process::id());
    let out = containerd.run_container(
        &RuntimeUnderTest::palisade_shim(),
        &["--rm"],
        image,
        &id,
        &["/bin/sh", "-c", SCRIPT],
    )?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "ctr run exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
