//! The container's root filesystem, set up by the init inside its new mount namespace:
//! propagation, the spec's mounts, `/dev`, `pivot_root` (or `MS_MOVE` + `chroot` with
//! `--no-pivot`), masked and read-only paths, a read-only root, and sysctls.
//!
//! Everything here runs in the forked container process; errors are strings naming the
//! mount or path, sent to the parent as the create error.

pub mod devices;
pub mod mounts;
pub mod options;

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{open, OFlag},
    mount::{mount, umount2, MntFlags, MsFlags},
    sys::{stat::Mode, statvfs::statvfs},
    unistd::{chdir, chroot, fchdir, pivot_root},
};
use oci_spec::runtime::Spec;

/// What the rootfs setup needs besides the spec.
pub struct RootfsConfig<'a> {
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    pub bundle: &'a Path,
    /// The init runs in a new user namespace: device nodes are bind-mounted from the host
    /// instead of created (`mknod` is not allowed there).
    pub in_user_ns: bool,
    /// Waits until the init is in its cgroup and returns `/proc/self/cgroup` as read
    /// before the cgroup namespace was created (inside it, every path reads `/`): where
    /// the container's cgroups are in each host hierarchy.
    pub cgroup_membership: &'a dyn Fn() -> Result<String, String>,
}

fn sys(what: impl FnOnce() -> String) -> impl FnOnce(nix::Error) -> String {
    move |e| format!("{}: {}", what(), e.desc())
}

/// Everything up to (not including) `pivot_root`: the point where createRuntime and
/// createContainer hooks run.
pub fn prepare(cfg: &RootfsConfig) -> Result<(), String> {
    let linux = cfg.spec.linux().as_ref();
    let propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        Some(name) => options::propagation(name)
            .ok_or_else(|| format!("linux.rootfsPropagation: unknown propagation {name:?}"))?,
        None => MsFlags::MS_SLAVE | MsFlags::MS_REC,
    };
    // Mount events of the container must not reach the host: make the whole tree a slave
    // (or what the spec asks) of the host's.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        propagation | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(|| "setting propagation of /".into()))?;
    // pivot_root refuses a new root whose parent mount is shared.
    let parent = mounts::mount_point_of(cfg.rootfs)?;
    mount(
        None::<&str>,
        &parent,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys(|| format!("making {} private", parent.display())))?;
    // The rootfs must be a mount point for pivot_root.
    mount(
        Some(cfg.rootfs),
        cfg.rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(|| {
        format!("bind-mounting rootfs {}", cfg.rootfs.display())
    }))?;

    for (i, m) in cfg.spec.mounts().iter().flatten().enumerate() {
        mounts::mount_entry(cfg, m)
            .map_err(|e| format!("mounts[{i}] ({}): {e}", m.destination().display()))?;
    }
    devices::setup_dev(cfg)?;
    Ok(())
}

/// Switches the root to the container's rootfs.
pub fn switch_root(rootfs: &Path, no_pivot: bool) -> Result<(), String> {
    if no_pivot {
        chdir(rootfs).map_err(sys(|| format!("chdir {}", rootfs.display())))?;
        mount(
            Some(rootfs),
            "/",
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(sys(|| "moving rootfs to /".into()))?;
        chroot(".").map_err(sys(|| "chroot".into()))?;
    } else {
        // pivot_root(".", ".") stacks the old root under the new one at "/"; detaching it
        // from there avoids needing a directory for it inside the rootfs (runc's trick).
        let old_root = open(
            "/",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys(|| "opening /".into()))?;
        chdir(rootfs).map_err(sys(|| format!("chdir {}", rootfs.display())))?;
        pivot_root(".", ".").map_err(sys(|| format!("pivot_root {}", rootfs.display())))?;
        fchdir(&old_root).map_err(sys(|| "fchdir to old root".into()))?;
        // Unmounting must not propagate to the host's mounts.
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(|| "making old root a slave".into()))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(sys(|| "detaching old root".into()))?;
    }
    chdir("/").map_err(sys(|| "chdir /".into()))?;
    Ok(())
}

/// After the root switch: sysctls, masked paths, read-only paths, read-only root.
pub fn finish(spec: &Spec) -> Result<(), String> {
    let linux = spec.linux().as_ref();
    // Before readonlyPaths, which usually include /proc/sys.
    if let Some(sysctl) = linux.and_then(|l| l.sysctl().as_ref()) {
        for (key, value) in sysctl {
            let file = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            fs::write(&file, value).map_err(|e| {
                format!(
                    "linux.sysctl {key}={value}: writing {}: {e}",
                    file.display()
                )
            })?;
        }
    }
    for path in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        mask_path(Path::new(path))?;
    }
    for path in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        readonly_path(Path::new(path))?;
    }
    if spec
        .root()
        .as_ref()
        .is_some_and(|r| r.readonly() == Some(true))
    {
        remount_readonly(Path::new("/"), MsFlags::empty())
            .map_err(|e| format!("root.readonly: {e}"))?;
    }
    Ok(())
}

/// Hides a path: a read-only empty tmpfs over a directory, `/dev/null` over a file.
fn mask_path(path: &Path) -> Result<(), String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("maskedPaths {}: {e}", path.display())),
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(sys(|| format!("linux.maskedPaths {}", path.display())))
}

/// Makes a path read-only with a bind mount onto itself.
fn readonly_path(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("linux.readonlyPaths {}: {e}", path.display())),
        Ok(_) => {}
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(|| format!("linux.readonlyPaths {}", path.display())))?;
    remount_readonly(
        path,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )
    .map_err(|e| format!("linux.readonlyPaths {}: {e}", path.display()))
}

/// Remounts a bind mount read-only, keeping the flags it already has: in a user namespace
/// the kernel refuses to clear "locked" flags such as nosuid or nodev.
pub fn remount_readonly(path: &Path, extra: MsFlags) -> Result<(), String> {
    let flags =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | extra | locked_flags(path);
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(sys(|| format!("remounting {} read-only", path.display())))
}

/// The flags of the mount at `path` that a remount must keep.
pub fn locked_flags(path: &Path) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let Ok(st) = statvfs(path) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    let mut flags = MsFlags::empty();
    for (fs_flag, ms_flag) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs_flag) {
            flags |= ms_flag;
        }
    }
    flags
}

/// Sets the hostname and domain name (in the container's uts namespace).
pub fn set_names(spec: &Spec) -> Result<(), String> {
    if let Some(name) = spec.hostname() {
        nix::unistd::sethostname(name).map_err(sys(|| format!("hostname {name:?}")))?;
    }
    if let Some(name) = spec.domainname() {
        // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
        let rc = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
        if rc != 0 {
            return Err(format!(
                "domainname {name:?}: {}",
                nix::errno::Errno::last().desc()
            ));
        }
    }
    Ok(())
}

/// Whether two paths are the same file (used to tell if a device is already in place).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
