//! Mounting what CreateContainer names (rootfs and extra storages) inside the guest, and
//! unmounting it again.
//!
//! Every accepted field is validated first: device paths must be under /dev, tags and
//! filesystem types are plain names, and options are a closed set of mount flags plus
//! filesystem data options that cannot smuggle in further options.

use std::{
    fs,
    os::unix::fs::FileTypeExt,
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use palisade_agent_protocol::agent::{storage::Source, Storage};

use crate::error::{AgentError, Context, Result};

/// How long to wait for a block device node to appear (hot-plugged drives show up in
/// devtmpfs asynchronously).
const DEVICE_WAIT: Duration = Duration::from_secs(5);
const MAX_OPTIONS: usize = 64;
const MAX_OPTION_LEN: usize = 256;
/// virtio-fs tags are at most 36 bytes (virtio spec, `struct virtio_fs_config`).
const MAX_VIRTIOFS_TAG: usize = 36;

/// A validated mount request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    source: PathOrTag,
    fstype: Option<String>,
    flags: MsFlags,
    data: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathOrTag {
    BlockDevice(PathBuf),
    VirtiofsTag(String),
    Bind(PathBuf),
}

/// Checks a `Storage` message; `field` names it in errors (e.g. `rootfs`, `storages[1].storage`).
pub fn plan(storage: &Storage, field: &str) -> Result<MountPlan> {
    let source = match &storage.source {
        None => {
            return Err(AgentError::invalid(
                field,
                "no source (block_device, virtiofs_tag or path)",
            ))
        }
        Some(Source::BlockDevice(dev)) => {
            let path = clean_absolute(dev, &format!("{field}.block_device"))?;
            if !path.starts_with("/dev/") {
                return Err(AgentError::invalid(
                    format!("{field}.block_device"),
                    format!("{dev:?} is not under /dev/"),
                ));
            }
            PathOrTag::BlockDevice(path)
        }
        Some(Source::VirtiofsTag(tag)) => {
            if tag.is_empty() || tag.len() > MAX_VIRTIOFS_TAG || !is_name(tag) {
                return Err(AgentError::invalid(
                    format!("{field}.virtiofs_tag"),
                    format!("{tag:?} is not a 1..={MAX_VIRTIOFS_TAG} character name"),
                ));
            }
            PathOrTag::VirtiofsTag(tag.clone())
        }
        Some(Source::Path(path)) => {
            PathOrTag::Bind(clean_absolute(path, &format!("{field}.path"))?)
        }
        Some(_) => return Err(AgentError::invalid(field, "unknown source kind")),
    };
    let fstype = match &source {
        PathOrTag::BlockDevice(_) => {
            if storage.fstype.is_empty() || !is_name(&storage.fstype) || storage.fstype.len() > 32 {
                return Err(AgentError::invalid(
                    format!("{field}.fstype"),
                    format!(
                        "{:?} is not a filesystem type (e.g. \"ext4\")",
                        storage.fstype
                    ),
                ));
            }
            Some(storage.fstype.clone())
        }
        PathOrTag::VirtiofsTag(_) => Some("virtiofs".to_owned()),
        PathOrTag::Bind(_) => None,
    };
    let (flags, data) = parse_options(&storage.options, &format!("{field}.options"))?;
    if matches!(source, PathOrTag::Bind(_)) && data.is_some() {
        return Err(AgentError::invalid(
            format!("{field}.options"),
            "filesystem data options are meaningless for a bind mount",
        ));
    }
    Ok(MountPlan {
        source,
        fstype,
        flags,
        data,
    })
}

impl MountPlan {
    /// The same mount, read-only.
    pub fn read_only(&self) -> Self {
        Self {
            flags: self.flags | MsFlags::MS_RDONLY,
            ..self.clone()
        }
    }
}

/// Mounts a tmpfs private to one container at `target` (mode 0755, nosuid, nodev).
pub fn mount_tmpfs(target: &Path) -> Result<()> {
    fs::create_dir_all(target).context(|| format!("creating {}", target.display()))?;
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .context(|| format!("mounting tmpfs at {}", target.display()))
}

/// Mounts an overlayfs of `lower` (read-only) and `upper`/`work` (on the same filesystem)
/// at `target`.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<()> {
    for dir in [upper, work, target] {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    }
    // overlayfs splits its options at ',' and ':'; our paths are built from validated ids
    // and names, which contain neither.
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .context(|| format!("mounting overlay at {}", target.display()))
}

/// Mounts `plan` at `target` (created if missing).
pub fn mount_at(plan: &MountPlan, target: &Path) -> Result<()> {
    match &plan.source {
        PathOrTag::BlockDevice(dev) => {
            wait_for_block_device(dev)?;
            fs::create_dir_all(target).context(|| format!("creating {}", target.display()))?;
            mount(
                Some(dev.as_path()),
                target,
                plan.fstype.as_deref(),
                plan.flags,
                plan.data.as_deref(),
            )
            .context(|| format!("mounting {} at {}", dev.display(), target.display()))
        }
        PathOrTag::VirtiofsTag(tag) => {
            fs::create_dir_all(target).context(|| format!("creating {}", target.display()))?;
            mount(
                Some(tag.as_str()),
                target,
                plan.fstype.as_deref(),
                plan.flags,
                plan.data.as_deref(),
            )
            .context(|| format!("mounting virtio-fs {tag:?} at {}", target.display()))
        }
        PathOrTag::Bind(source) => {
            let meta =
                fs::metadata(source).context(|| format!("bind source {}", source.display()))?;
            if meta.is_dir() {
                fs::create_dir_all(target)
            } else {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)
                        .context(|| format!("creating {}", parent.display()))?;
                }
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(target)
                    .map(drop)
            }
            .context(|| format!("creating {}", target.display()))?;
            mount(
                Some(source.as_path()),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .context(|| format!("bind-mounting {} at {}", source.display(), target.display()))?;
            // Bind mounts ignore other flags on the first call; apply them with a remount.
            let extra = plan.flags - MsFlags::MS_REC;
            if !extra.is_empty() {
                let remount = mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                    None::<&str>,
                )
                .context(|| format!("remounting {} with {extra:?}", target.display()));
                if let Err(e) = remount {
                    unmount(target);
                    return Err(e);
                }
            }
            Ok(())
        }
    }
}

/// Detaches the mount at `target`, logging (not failing) when that is impossible: callers
/// are cleaning up and continue with the next resource.
pub fn unmount(target: &Path) {
    if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
        if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
            tracing::warn!("unmounting {}: {e}", target.display());
        }
    }
}

fn wait_for_block_device(dev: &Path) -> Result<()> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        match fs::metadata(dev) {
            Ok(meta) if meta.file_type().is_block_device() => return Ok(()),
            Ok(_) => {
                return Err(AgentError::invalid(
                    "block_device",
                    format!("{} is not a block device", dev.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context(|| format!("block device {}", dev.display())),
        }
    }
}

/// An absolute path without `..`, `.` or empty components.
fn clean_absolute(path: &str, field: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    let ok = p.is_absolute()
        && path.len() <= 4096
        && !path.contains('\0')
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !ok {
        return Err(AgentError::invalid(
            field,
            format!("{path:?} is not a normalised absolute path"),
        ));
    }
    Ok(p.to_path_buf())
}

/// `[A-Za-z0-9._-]+`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Splits mount(8)-style options into flags and a filesystem data string.
fn parse_options(options: &[String], field: &str) -> Result<(MsFlags, Option<String>)> {
    if options.len() > MAX_OPTIONS {
        return Err(AgentError::invalid(
            field,
            format!("{} options (at most {MAX_OPTIONS})", options.len()),
        ));
    }
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for (i, option) in options.iter().enumerate() {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "bind" | "rbind" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                let valid = !other.is_empty()
                    && other.len() <= MAX_OPTION_LEN
                    && other.bytes().all(|b| b.is_ascii_graphic() && b != b',');
                if !valid {
                    return Err(AgentError::invalid(
                        format!("{field}[{i}]"),
                        format!("{other:?} is not a mount option"),
                    ));
                }
                data.push(other);
                continue;
            }
        };
        flags = (flags | set) - clear;
    }
    let data = (!data.is_empty()).then(|| data.join(","));
    Ok((flags, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(source: Source, fstype: &str, options: &[&str]) -> Storage {
        let mut s = Storage::new();
        s.source = Some(source);
        s.fstype = fstype.into();
        s.options = options.iter().map(|o| o.to_string()).collect();
        s
    }

    #[test]
    fn block_device_plan_splits_flags_and_data() {
        let s = storage(
            Source::BlockDevice("/dev/vdb".into()),
            "ext4",
            &["ro", "nodev", "errors=remount-ro"],
        );
        let plan = plan(&s, "rootfs").unwrap();
        assert_eq!(plan.flags, MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
        assert_eq!(plan.data.as_deref(), Some("errors=remount-ro"));
        assert_eq!(plan.fstype.as_deref(), Some("ext4"));
    }

    #[test]
    fn rejects_bad_fields_naming_them() {
        let cases = [
            (
                storage(Source::BlockDevice("/etc/passwd".into()), "ext4", &[]),
                "rootfs.block_device",
            ),
            (
                storage(Source::BlockDevice("/dev/../etc".into()), "ext4", &[]),
                "rootfs.block_device",
            ),
            (
                storage(Source::BlockDevice("/dev/vdb".into()), "", &[]),
                "rootfs.fstype",
            ),
            (
                storage(Source::BlockDevice("/dev/vdb".into()), "ext4 x", &[]),
                "rootfs.fstype",
            ),
            (
                storage(Source::VirtiofsTag("a/b".into()), "", &[]),
                "rootfs.virtiofs_tag",
            ),
            (
                storage(Source::Path("relative".into()), "", &[]),
                "rootfs.path",
            ),
            (
                storage(Source::Path("/srv".into()), "", &["mode=1,uid=0"]),
                "rootfs.options[0]",
            ),
            (
                storage(Source::Path("/srv".into()), "", &["size=1"]),
                "rootfs.options",
            ),
        ];
        for (s, field) in cases {
            match plan(&s, "rootfs") {
                Err(AgentError::InvalidArgument { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{s:?}: expected InvalidArgument({field}), got {other:?}"),
            }
        }
        let empty = Storage::new();
        assert!(matches!(
            plan(&empty, "rootfs"),
            Err(AgentError::InvalidArgument { .. })
        ));
    }
}
