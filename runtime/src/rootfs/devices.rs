//! `/dev` inside the container: the default devices every container gets, the spec's
//! `linux.devices`, `/dev/ptmx` pointing at the container's devpts, and the `/dev/fd`
//! family of symlinks.

use std::{fs, os::unix::fs::symlink, path::Path};

use nix::{
    mount::{mount, MsFlags},
    sys::stat::{makedev, mknod, Mode, SFlag},
    unistd::{chown, Gid, Uid},
};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};

use super::RootfsConfig;
use crate::utils::secure_join;

/// A device node to create.
struct Device {
    path: String,
    kind: SFlag,
    major: i64,
    minor: i64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The devices runc gives every container.
fn defaults() -> Vec<Device> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| Device {
        path: path.to_string(),
        kind: SFlag::S_IFCHR,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

fn from_spec(d: &LinuxDevice) -> Result<Device, String> {
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(format!(
                "linux.devices {}: type \"a\" is only valid in cgroup rules",
                d.path().display()
            ))
        }
    };
    Ok(Device {
        path: d.path().to_string_lossy().into_owned(),
        kind,
        major: d.major(),
        minor: d.minor(),
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// Populates `/dev`, unless the spec bind-mounts a `/dev` from somewhere else.
pub fn setup_dev(cfg: &RootfsConfig) -> Result<(), String> {
    let dev_is_bind = cfg.spec.mounts().iter().flatten().any(|m| {
        m.destination() == Path::new("/dev")
            && m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind")
    });
    if dev_is_bind {
        return Ok(());
    }
    let mut devices = defaults();
    for d in cfg
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let d = from_spec(d)?;
        devices.retain(|existing| existing.path != d.path);
        devices.push(d);
    }
    for d in &devices {
        create_device(cfg, d)?;
    }
    let dev = secure_join(cfg.rootfs, Path::new("/dev")).map_err(|e| format!("/dev: {e}"))?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        match symlink(target, dev.join(link)) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("symlink /dev/{link}: {e}"))
            }
            _ => {}
        }
    }
    if Path::new("/proc/kcore").exists() {
        let _ = symlink("/proc/kcore", dev.join("core"));
    }
    // /dev/ptmx must be the container's own devpts instance (newinstance), not the host's.
    let ptmx = dev.join("ptmx");
    if dev.join("pts").is_dir() {
        match fs::remove_file(&ptmx) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("removing /dev/ptmx: {e}"))
            }
            _ => {}
        }
        symlink("pts/ptmx", &ptmx).map_err(|e| format!("symlink /dev/ptmx: {e}"))?;
    }
    Ok(())
}

fn create_device(cfg: &RootfsConfig, d: &Device) -> Result<(), String> {
    let dest = secure_join(cfg.rootfs, Path::new(&d.path))
        .map_err(|e| format!("device {}: {e}", d.path))?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("device {}: {e}", d.path))?;
    }
    if cfg.in_user_ns {
        // mknod is refused in a user namespace: bind the host's node instead.
        if fs::symlink_metadata(&dest).is_err() {
            fs::File::create(&dest).map_err(|e| format!("device {}: {e}", d.path))?;
        }
        return mount(
            Some(Path::new(&d.path)),
            &dest,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "device {}: bind-mounting from the host: {}",
                d.path,
                e.desc()
            )
        });
    }
    match fs::remove_file(&dest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("device {}: removing existing file: {e}", d.path))
        }
        _ => {}
    }
    let dev = makedev(d.major as u64, d.minor as u64);
    mknod(&dest, d.kind, Mode::from_bits_truncate(d.mode), dev)
        .map_err(|e| format!("device {}: mknod: {}", d.path, e.desc()))?;
    // mknod's mode is filtered by the umask; the spec's mode is exact.
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        &dest,
        Mode::from_bits_truncate(d.mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| format!("device {}: chmod: {}", d.path, e.desc()))?;
    chown(
        &dest,
        Some(Uid::from_raw(d.uid)),
        Some(Gid::from_raw(d.gid)),
    )
    .map_err(|e| format!("device {}: chown: {}", d.path, e.desc()))?;
    Ok(())
}
