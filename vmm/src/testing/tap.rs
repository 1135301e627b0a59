//! Test helpers for virtio-net with real taps: a network namespace private to the calling
//! thread, tap/tun interfaces in it, and a packet socket to exchange frames with the
//! kernel side of a tap. Need root (CAP_NET_ADMIN). Everything created lives in the
//! private namespace and disappears with it (when the thread and every fd opened in it
//! are gone), also if the test fails or is killed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Move the calling thread (only) into a new, empty network namespace. Processes it
/// spawns afterwards start there too.
pub fn unshare_netns() -> io::Result<()> {
    // SAFETY: unshare has no memory effects; CLONE_NEWNET only changes this thread.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) }).map(drop)
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad name"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Create a persistent tap (`tap == true`) or tun interface `name`, as `ip tuntap add`
/// does, and bring it up.
pub fn create_persistent(name: &str, tap: bool) -> io::Result<()> {
    let mut req = ifreq(name)?;
    let kind = if tap { libc::IFF_TAP } else { libc::IFF_TUN };
    req.ifr_ifru.ifru_flags = (kind | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: a valid NUL-terminated path; the returned fd is owned below.
    let fd =
        check(unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: TUNSETIFF reads/writes an ifreq; TUNSETPERSIST takes an integer.
    unsafe {
        check(libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req))?;
        check(libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETPERSIST,
            1 as libc::c_ulong,
        ))?;
    }
    drop(fd);
    set_up(name)
}

/// Set `IFF_UP` on interface `name`.
pub fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: socket(2) without pointers; the fd is owned below.
    let sock =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: just created, owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write an ifreq.
    unsafe {
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req))?;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req))?;
    }
    Ok(())
}

/// A raw `AF_PACKET` socket bound to one interface: sends frames into it (as if they
/// came from the wire) and sees every frame it carries.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Bind to interface `name`; `recv` waits at most `timeout`.
    pub fn bind(name: &str, timeout: Duration) -> io::Result<Self> {
        let cname = std::ffi::CString::new(name)?;
        // SAFETY: a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) without pointers; the fd is owned below.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        })?;
        // SAFETY: just created, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as libc::c_int;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SAFETY: pointers to live values of the sizes given.
        unsafe {
            check(libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ))?;
            check(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ))?;
        }
        Ok(PacketSocket { fd })
    }

    /// Send one Ethernet frame out of the socket into the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receive one frame (waits up to the timeout; `WouldBlock` when it expires).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid and writable for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}
