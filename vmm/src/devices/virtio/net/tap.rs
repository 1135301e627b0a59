//! The host end of a virtio-net device: an existing tap interface, opened by name.
//!
//! The tap is created by whoever sets up the network namespace (the shim, inside the pod's
//! netns); the VMM only attaches to it, in its own network namespace, with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte `virtio_net_hdr_v1` header on every
//! frame (`TUNSETVNETHDRSZ`), and no offloads until the guest acknowledges some
//! (`TUNSETOFFLOAD`, see [`Backend::set_offload`]). The fd is non-blocking.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

/// Longest interface name (`IFNAMSIZ` includes the terminating NUL).
pub const IFNAME_MAX: usize = libc::IFNAMSIZ - 1;

/// The frame transport under a [`super::NetDevice`]: one `read` returns one frame, one
/// `write` sends one frame, both prefixed with the 12-byte virtio-net header. Non-blocking:
/// `read` fails with `WouldBlock` when no frame is waiting.
pub trait Backend: AsRawFd + Send {
    /// Read one frame (header included) into `buf`; returns its length.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Send one frame (header included).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Offloads the host may use in frames it hands us (`TUN_F_*` bits): only those the
    /// guest acknowledged, so no frame needs a feature the guest's driver lacks.
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()>;
}

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("invalid tap name {0:?}: must be 1-{IFNAME_MAX} bytes without '/', NUL or whitespace")]
    InvalidName(String),
    /// No interface of that name exists in the VMM's network namespace.
    #[error("tap {0:?} does not exist in the VMM's network namespace")]
    NotFound(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// One of the set-up ioctls failed (the name exists but is not a usable tap, or
    /// permissions).
    #[error("tap {name:?}: {op} failed: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which ioctl.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// Whether `name` is acceptable as a Linux interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b == b':' || b.is_ascii_whitespace())
}

/// An attached tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// An `ifreq` carrying `name` and `flags`.
fn ifreq(name: &str, flags: libc::c_short) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    req
}

impl Tap {
    /// Attach to the existing tap `name` in the caller's network namespace. Never creates
    /// an interface: a missing name is an error, not a new (and soon vanished) tap.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let cname = CString::new(name).map_err(|_| TapError::InvalidName(name.to_string()))?;
        // SAFETY: a valid NUL-terminated string; the call has no other memory effects.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let ioctl_err = |op: &'static str| TapError::Ioctl {
            name: name.to_string(),
            op,
            source: io::Error::last_os_error(),
        };
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        let mut req = ifreq(name, flags);
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is; the fd is ours.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(ioctl_err("TUNSETIFF"));
        }
        let hdr_len = super::VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }
        let mut tap = Tap {
            file,
            name: name.to_string(),
        };
        // A persistent tap keeps the offloads of its previous user: start from none.
        tap.set_offload(0).map_err(|source| TapError::Ioctl {
            name: name.to_string(),
            op: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("tap took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        // TUNSETOFFLOAD takes the flags by value. Allowed on the device thread by the
        // seccomp filter (this request number only).
        // SAFETY: the fd is ours; the argument is an integer, not a pointer.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_ifname("tap0"));
        assert!(valid_ifname("tap_pod-123456_"));
        for bad in ["", ".", "..", "a/b", "a b", "a:1", "sixteen-bytes-xx"] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }

    #[test]
    fn missing_tap_is_not_created() {
        let err = Tap::open("pal-no-such0").unwrap_err();
        assert!(
            matches!(err, TapError::NotFound(_)),
            "unexpected error: {err}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = Tap::open("bad/name").unwrap_err();
        assert!(matches!(err, TapError::InvalidName(_)), "{err}");
    }
}
