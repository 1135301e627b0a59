//! The container rootfs mounts containerd passes with Create (e.g. an overlay of
//! snapshotter layers), mounted at `<bundle>/rootfs` and removed with the container.

use std::path::{Path, PathBuf};

use containerd_shim_protos::types::mount::Mount;
use nix::mount::{umount2, MntFlags};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
#[error("mounting rootfs {what} at {target}: {message}")]
pub struct RootfsError {
    what: String,
    target: PathBuf,
    message: String,
}

/// Mounts `mounts` at `<bundle>/rootfs`; on failure nothing stays mounted. Returns the
/// target when something was mounted.
pub async fn mount(bundle: &Path, mounts: &[Mount]) -> Result<Option<PathBuf>, RootfsError> {
    if mounts.is_empty() {
        return Ok(None);
    }
    let target = bundle.join("rootfs");
    if let Err(e) = std::fs::create_dir_all(&target) {
        return Err(RootfsError {
            what: "directory".into(),
            target,
            message: e.to_string(),
        });
    }
    for (done, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, &target).await {
            for _ in 0..done {
                unmount(&target);
            }
            return Err(RootfsError {
                what: format!("{} from {}", m.type_, m.source),
                target,
                message: e.to_string(),
            });
        }
    }
    Ok(Some(target))
}

/// Unmounts everything stacked at `target` (lazily, so a busy mount cannot keep the
/// rootfs alive after the container is gone).
pub fn unmount(target: &Path) {
    for _ in 0..16 {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(e) => {
                warn!("unmounting {}: {e}", target.display());
                return;
            }
        }
    }
}
