//! The container's terminal: a pty from the container's own devpts instance, whose master
//! goes to the console socket (`SCM_RIGHTS`, with the slave's name as payload, as runc and
//! containerd's go-runc expect) or back to the caller, and whose slave becomes the
//! process's controlling terminal and stdio.

use std::{
    io::IoSlice,
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use nix::{
    fcntl::{open, OFlag},
    mount::{mount, MsFlags},
    pty::{grantpt, posix_openpt, ptsname_r, unlockpt},
    sys::{
        socket::{sendmsg, ControlMessage, MsgFlags},
        stat::Mode,
    },
};

use super::channel::{Channel, Msg};

nix::ioctl_write_int_bad!(tiocsctty, libc::TIOCSCTTY);
nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);

/// Opens a pty, hands its master over, and makes the slave the controlling terminal and
/// stdio of the calling process. With `mount_console`, the slave is also bind-mounted on
/// `/dev/console` (for the container's init).
pub fn setup(
    console_socket: Option<RawFd>,
    channel: Option<&Channel>,
    mount_console: bool,
    size: Option<&oci_spec::runtime::Box>,
) -> Result<(), String> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("opening /dev/ptmx: {}", e.desc()))?;
    grantpt(&master).map_err(|e| format!("grantpt: {}", e.desc()))?;
    unlockpt(&master).map_err(|e| format!("unlockpt: {}", e.desc()))?;
    let name = ptsname_r(&master).map_err(|e| format!("ptsname: {}", e.desc()))?;
    if let Some(size) = size {
        let ws = libc::winsize {
            ws_row: size.height().min(u16::MAX as u64) as u16,
            ws_col: size.width().min(u16::MAX as u64) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from `ws` for the duration of the call.
        unsafe { tiocswinsz(master.as_raw_fd(), &ws) }
            .map_err(|e| format!("process.consoleSize: TIOCSWINSZ: {}", e.desc()))?;
    }
    let slave = open(
        Path::new(&name),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening {name}: {}", e.desc()))?;
    if mount_console {
        let console = Path::new("/dev/console");
        if std::fs::symlink_metadata(console).is_err() {
            std::fs::File::create(console).map_err(|e| format!("creating /dev/console: {e}"))?;
        }
        mount(
            Some(Path::new(&name)),
            console,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind-mounting {name} on /dev/console: {}", e.desc()))?;
    }
    match (console_socket, channel) {
        (Some(sock), _) => {
            let fds = [master.as_raw_fd()];
            let iov = [IoSlice::new(name.as_bytes())];
            sendmsg::<()>(
                sock,
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(|e| format!("sending the pty master to the console socket: {}", e.desc()))?;
            // SAFETY: the console socket fd is ours and not used after this point.
            unsafe { libc::close(sock) };
        }
        (None, Some(channel)) => channel.send_with_fd(&Msg::PtyMaster, Some(master.as_raw_fd()))?,
        (None, None) => {
            return Err("process.terminal is true but no console socket was given".into())
        }
    }
    drop(master);
    for fd in 0..3 {
        super::fork::dup2(slave.as_raw_fd(), fd).map_err(|e| format!("dup2 tty: {}", e.desc()))?;
    }
    drop(slave);
    // SAFETY: TIOCSCTTY on our own stdin (now the pty slave) with arg 0.
    unsafe { tiocsctty(0, 0) }.map_err(|e| format!("TIOCSCTTY: {}", e.desc()))?;
    Ok(())
}
