//! A busybox OCI image built locally and `ctr image import`ed.
//!
//! No registry is reachable from the build machines, so the image is assembled from
//! Debian's `busybox-static`: a rootfs with `/bin/busybox`, one symlink per applet and a
//! minimal `/etc/passwd` and `/etc/group`, packed into an OCI image layout by `umoci`
//! (already a test dependency, see `apt-packages.txt`) and tarred into an archive that
//! `ctr image import` understands (`oci-layout`, `index.json` with an
//! `org.opencontainers.image.ref.name` annotation, blobs with one gzip layer).

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Where Debian's `busybox-static` installs the statically linked busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// The tag `umoci` writes into `index.json` as `org.opencontainers.image.ref.name`.
pub const TAG: &str = "latest";

/// What the image runs when the caller gives no command.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        }
    }
}

impl ImageConfig {
    /// A pod "pause" container for CRI tests: sleeps until it is told to stop, and stops
    /// promptly on SIGTERM/SIGINT (a shell as PID 1 ignores signals it has no trap for).
    pub fn pause() -> Self {
        Self {
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "trap 'exit 0' TERM INT; while :; do sleep 1; done".into(),
            ],
            ..Self::default()
        }
    }
}

/// An OCI image archive on disk, removed with its temporary directory on drop.
#[derive(Debug)]
pub struct OciImage {
    _dir: tempfile::TempDir,
    archive: PathBuf,
}

impl OciImage {
    /// Builds a busybox image whose default process is `config`.
    pub fn busybox(config: &ImageConfig) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("palisade-image-")
            .tempdir()
            .context("creating the image build directory")?;
        let rootfs = dir.path().join("rootfs");
        write_busybox_rootfs(&rootfs)?;

        let layout = dir.path().join("layout");
        let image = format!("{}:{TAG}", layout.display());
        umoci(&["init", "--layout", path_str(&layout)?])?;
        umoci(&["new", "--image", &image])?;
        umoci(&["insert", "--image", &image, path_str(&rootfs)?, "/"])?;
        let mut args = vec!["config".to_string(), "--image".into(), image.clone()];
        for arg in &config.cmd {
            args.push(format!("--config.cmd={arg}"));
        }
        for var in &config.env {
            args.push(format!("--config.env={var}"));
        }
        args.push("--config.workingdir=/".into());
        umoci(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        // `config` leaves the superseded manifest and config blobs behind.
        umoci(&["gc", "--layout", path_str(&layout)?])?;

        let archive = dir.path().join("image.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."))?;
        Ok(Self { _dir: dir, archive })
    }

    /// The `.tar` archive to hand to `ctr image import`.
    pub fn archive(&self) -> &Path {
        &self.archive
    }
}

/// Writes a busybox root filesystem: the binary, its applets as symlinks, the directories
/// a container expects to mount over, and root's passwd/group entries.
pub fn write_busybox_rootfs(rootfs: &Path) -> Result<()> {
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run",
        "var",
    ] {
        fs::create_dir_all(rootfs.join(dir))
            .with_context(|| format!("creating {dir} in {}", rootfs.display()))?;
    }
    let busybox = rootfs.join("bin/busybox");
    fs::copy(BUSYBOX, &busybox)
        .with_context(|| format!("copying {BUSYBOX} (is busybox-static installed?)"))?;

    let list = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list-full"))?;
    if !list.status.success() {
        bail!(
            "{BUSYBOX} --list-full failed: {}",
            String::from_utf8_lossy(&list.stderr)
        );
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        let link = rootfs.join(applet);
        if link.exists() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        symlink("/bin/busybox", &link).with_context(|| format!("linking applet {applet}"))?;
    }

    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(rootfs.join("etc/hostname"), "palisade\n")?;
    Ok(())
}

fn umoci(args: &[&str]) -> Result<()> {
    run(Command::new("umoci").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_has_busybox_applets_and_passwd() {
        let dir = tempfile::tempdir().unwrap();
        write_busybox_rootfs(dir.path()).unwrap();
        assert_eq!(
            fs::read_link(dir.path().join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(dir.path().join("bin/echo").symlink_metadata().is_ok());
        assert!(fs::read_to_string(dir.path().join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:"));
    }

    #[test]
    fn image_archive_is_an_oci_layout_with_a_ref_name() {
        let image = OciImage::busybox(&ImageConfig::default()).unwrap();
        let list = Command::new("tar")
            .arg("-tf")
            .arg(image.archive())
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&list.stdout);
        assert!(
            names
                .lines()
                .any(|l| l.trim_start_matches("./") == "oci-layout"),
            "{names}"
        );
        assert!(
            names
                .lines()
                .any(|l| l.trim_start_matches("./") == "index.json"),
            "{names}"
        );
        let index = Command::new("tar")
            .arg("-xOf")
            .arg(image.archive())
            .arg("./index.json")
            .output()
            .unwrap();
        let index: serde_json::Value = serde_json::from_slice(&index.stdout).unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            TAG
        );
        // manifest, config and exactly one layer
        let blobs = names
            .lines()
            .filter(|l| l.contains("blobs/sha256/") && !l.ends_with('/'))
            .count();
        assert_eq!(blobs, 3, "{names}");
    }
}
