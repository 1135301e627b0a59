//! Container root filesystems for the guest: ext4 images made from the container's
//! mounted rootfs with `mkfs.ext4 -d`, handed to the guest as virtio-blk drives.
//!
//! The VMM cannot hot-add drives, so every drive the pod will use exists from VM start:
//! drive 0 holds the sandbox (first) container's rootfs; the others are empty sparse
//! files ("spare" drives). A later container's rootfs is written into a free spare in
//! place (same inode the VMM has open). The guest sees the new contents on mount because
//! Linux drops a block device's page cache when its last opener closes it (the partition
//! scan at probe time is such an open/close), and nothing in the guest opens a spare
//! before the agent mounts it.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::Command,
};

/// Extra room in a sized-to-fit image beyond the rootfs contents (writes of the
/// container; ext4 metadata).
const HEADROOM_MIB: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("mkfs.ext4 -d {rootfs} failed ({status}): {stderr}")]
    Mkfs {
        rootfs: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("no free drive for another container's rootfs (all {0} spare drives are in use; raise vm.spare_disks)")]
    NoFreeDrive(usize),
}

/// One virtio-blk drive of the VM.
#[derive(Debug, Clone)]
pub struct Drive {
    pub image: PathBuf,
    /// Guest device node (`/dev/vda`, `/dev/vdb`, ...): drives appear in attach order.
    pub guest_device: String,
    /// Container whose rootfs it holds.
    pub owner: Option<String>,
}

/// Guest device name of the `index`th drive (vda, ..., vdz, vdaa, ...), as the guest's
/// virtio-blk driver names them.
pub fn guest_device(index: usize) -> String {
    let mut name = String::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        name.insert(0, (b'a' + (n % 26) as u8) as char);
        n /= 26;
    }
    format!("/dev/vd{name}")
}

/// Size in bytes of the files under `dir`, not following symlinks or crossing mounts.
fn tree_size(dir: &Path) -> u64 {
    fn walk(dir: &Path, dev: u64, total: &mut u64) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            *total += meta.blocks() * 512 + 4096;
            if meta.is_dir() && meta.dev() == dev {
                walk(&entry.path(), dev, total);
            }
        }
    }
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(meta) = dir.metadata() {
        walk(dir, meta.dev(), &mut total);
    }
    total
}

/// Image size for `rootfs` when the image is sized to fit (drive 0).
pub fn fitting_size_mib(rootfs: &Path) -> u64 {
    let content_mib = tree_size(rootfs).div_ceil(1 << 20);
    content_mib + content_mib / 2 + HEADROOM_MIB
}

/// Creates (or truncates) a sparse file of `size_mib`.
pub fn create_sparse(image: &Path, size_mib: u64) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(image)
        .map_err(|source| DiskError::Io {
            what: format!("creating {}", image.display()),
            source,
        })?;
    file.set_len(size_mib << 20)
        .map_err(|source| DiskError::Io {
            what: format!("sizing {}", image.display()),
            source,
        })
}

/// Writes an ext4 filesystem with the contents of `rootfs` into `image` (which must
/// exist and have its final size), in place. Blocking: run it off the async threads and
/// under the reaper's child guard (it waits for `mkfs.ext4`).
pub fn write_ext4(rootfs: &Path, image: &Path) -> Result<(), DiskError> {
    // No journal: the image is the container's scratch copy, thrown away with it; lazy
    // inode tables keep mkfs from writing the whole drive.
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=1,nodiscard",
        ])
        .args(["-L", "palisade-rootfs", "-d"])
        .arg(rootfs)
        .arg(image)
        .output()
        .map_err(|source| DiskError::Io {
            what: "running mkfs.ext4 (e2fsprogs)".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(DiskError::Mkfs {
            rootfs: rootfs.to_path_buf(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The VM's drives: which is free, which holds whose rootfs.
#[derive(Debug, Default)]
pub struct Drives {
    drives: Vec<Drive>,
}

impl Drives {
    pub fn new(images: Vec<PathBuf>) -> Self {
        Self {
            drives: images
                .into_iter()
                .enumerate()
                .map(|(i, image)| Drive {
                    image,
                    guest_device: guest_device(i),
                    owner: None,
                })
                .collect(),
        }
    }

    /// Reserves a free drive for container `id`.
    pub fn claim(&mut self, id: &str) -> Result<Drive, DiskError> {
        let spares = self.drives.len().saturating_sub(1);
        let drive = self
            .drives
            .iter_mut()
            .find(|d| d.owner.is_none())
            .ok_or(DiskError::NoFreeDrive(spares))?;
        drive.owner = Some(id.to_string());
        Ok(drive.clone())
    }

    /// Frees the drive of container `id`; returns its image so the caller can empty it.
    pub fn release(&mut self, id: &str) -> Option<PathBuf> {
        let drive = self
            .drives
            .iter_mut()
            .find(|d| d.owner.as_deref() == Some(id))?;
        drive.owner = None;
        Some(drive.image.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_devices_follow_the_virtio_blk_naming() {
        assert_eq!(guest_device(0), "/dev/vda");
        assert_eq!(guest_device(1), "/dev/vdb");
        assert_eq!(guest_device(25), "/dev/vdz");
        assert_eq!(guest_device(26), "/dev/vdaa");
    }

    #[test]
    fn drives_are_claimed_and_released() {
        let mut drives = Drives::new(vec!["a".into(), "b".into()]);
        assert_eq!(drives.claim("c1").unwrap().guest_device, "/dev/vda");
        assert_eq!(drives.claim("c2").unwrap().guest_device, "/dev/vdb");
        assert!(matches!(drives.claim("c3"), Err(DiskError::NoFreeDrive(1))));
        assert_eq!(drives.release("c1"), Some(PathBuf::from("a")));
        assert_eq!(drives.claim("c3").unwrap().guest_device, "/dev/vda");
    }

    /// Needs e2fsprogs (mkfs.ext4, debugfs).
    #[test]
    fn ext4_image_holds_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/hello"), "hi\n").unwrap();
        let image = dir.path().join("disk.img");
        let size = fitting_size_mib(&rootfs);
        assert!(size >= HEADROOM_MIB);
        create_sparse(&image, size).unwrap();
        write_ext4(&rootfs, &image).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), size << 20);
        let out = Command::new("debugfs")
            .args(["-R", "cat /etc/hello"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
        let err = write_ext4(&dir.path().join("missing"), &image).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
