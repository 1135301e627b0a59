//! PID-1 duties in the guest: the base mounts, a pure cgroup2 hierarchy, loopback, the
//! console, and ending the VM.
//!
//! The initramfs is the kernel's `rootfs` mount, which `pivot_root(2)` refuses to move away
//! from. Container runtimes pivot_root into the container's rootfs, so the agent first moves
//! itself onto a fresh tmpfs root (the `switch_root` trick: `MS_MOVE` the tmpfs over `/`,
//! `chroot(".")`); after that, pivot_root works in containers' mount namespaces.

use std::{fs, io::Write, os::fd::AsRawFd, path::Path};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

const NEW_ROOT: &str = "/newroot";

/// Everything PID 1 sets up before serving. Errors are fatal (see [`fatal`]).
pub fn setup() -> Result<()> {
    move_off_initramfs().context("leaving the initramfs root")?;
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    attach_console();
    mount_fs("proc", "/proc", "proc", common | MsFlags::MS_NOEXEC, None)?;
    mount_fs("sysfs", "/sys", "sysfs", common | MsFlags::MS_NOEXEC, None)?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", common, Some("mode=1777"))?;
    mount_fs("tmpfs", "/run", "tmpfs", common, Some("mode=0755"))?;
    mount_fs("tmpfs", "/tmp", "tmpfs", common, Some("mode=1777"))?;
    mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        common | MsFlags::MS_NOEXEC,
        Some("nsdelegate"),
    )?;
    enable_cgroup_controllers(Path::new("/sys/fs/cgroup")).context("cgroup2 controllers")?;
    loopback_up().context("bringing up lo")?;
    // Programs the runtime starts (hooks) and container processes without PATH.
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    Ok(())
}

/// Moves `/` onto a tmpfs; see the module documentation.
fn move_off_initramfs() -> Result<()> {
    fs::create_dir_all(NEW_ROOT).context(NEW_ROOT)?;
    mount(
        Some("rootfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .with_context(|| format!("mounting tmpfs at {NEW_ROOT}"))?;
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc"] {
        fs::create_dir_all(Path::new(NEW_ROOT).join(dir))
            .with_context(|| format!("{NEW_ROOT}/{dir}"))?;
    }
    std::env::set_current_dir(NEW_ROOT).context("chdir")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).context("MS_MOVE to /")?;
    nix::unistd::chroot(".").context("chroot")?;
    std::env::set_current_dir("/").context("chdir /")?;
    Ok(())
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .with_context(|| format!("mounting {fstype} at {target}"))
}

/// Points fds 0-2 at /dev/console. The kernel does this only when the initramfs has a
/// /dev/console node; doing it again is harmless.
fn attach_console() {
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns; `console`
        // stays open for the duration of the calls.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// Delegates every available controller to child cgroups (the runtime creates one per
/// container). The root cgroup is exempt from the no-internal-processes rule, so PID 1 can
/// stay there.
fn enable_cgroup_controllers(root: &Path) -> Result<()> {
    let available =
        fs::read_to_string(root.join("cgroup.controllers")).context("cgroup.controllers")?;
    let enable: Vec<String> = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    if enable.is_empty() {
        bail!("the kernel offers no cgroup2 controllers");
    }
    fs::write(root.join("cgroup.subtree_control"), enable.join(" "))
        .with_context(|| format!("enabling {}", enable.join(" ")))?;
    tracing::info!(controllers = %available.trim(), "cgroup2 ready");
    Ok(())
}

/// `ip link set lo up`, through SIOCSIFFLAGS.
fn loopback_up() -> Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes the flags into `req`, a live ifreq naming "lo".
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS");
    }
    // SAFETY: reading the union member SIOCGIFFLAGS just filled in.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, a live ifreq naming "lo" with the new flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS");
    }
    Ok(())
}

/// Reports a fatal error on the console and resets the guest, which makes the VMM exit
/// (the kernel runs with `reboot=k`; the VMM turns the i8042 reset into an exit). PID 1 must
/// never return: the kernel would panic.
pub fn fatal(err: &anyhow::Error) -> ! {
    let msg = format!("palisade-agent: fatal: {err:#}\n");
    if let Ok(mut console) = fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = console.write_all(msg.as_bytes());
    } else {
        let _ = std::io::stderr().write_all(msg.as_bytes());
    }
    power_off()
}

/// Ends the VM: sync, then reset.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reachable without CAP_SYS_BOOT; there is nothing left to do but stop.
    let _ = writeln!(std::io::stderr(), "palisade-agent: reboot: {err:?}");
    std::process::exit(1)
}

/// Makes orphans of container processes (e.g. double-forked daemons) our children when
/// the agent is not PID 1, so the reaper collects them as it does in the guest.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error()).context("PR_SET_CHILD_SUBREAPER");
    }
    Ok(())
}
