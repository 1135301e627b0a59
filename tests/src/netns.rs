//! Looking into a network namespace from outside it: the interfaces, one interface's MAC,
//! MTU and IPv4 address, and which processes are in it. Used by the nested test host's CRI
//! client (`cri-vm-check`) on the pod netns CNI set up, to compare it with what the guest
//! shows and to see what is left of it after the pod. Everything runs in a short-lived
//! thread that `setns`-ed into the namespace: sockets and `/proc/thread-self/net` act in
//! the network namespace of the calling thread.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// An open network namespace (the open file keeps it alive, also after its bind mount was
/// removed).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

/// One interface as seen inside the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The primary IPv4 address and its prefix length, if any.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// The global-scope IPv6 addresses and their prefix lengths.
    pub ipv6: Vec<(Ipv6Addr, u8)>,
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Interface names from the text of `/proc/net/dev` (two header lines, then `name: stats`).
pub fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

/// The global-scope IPv6 addresses of interface `name` from the text of
/// `/proc/net/if_inet6` (`<32 hex digits> <ifindex> <prefix len> <scope> <flags> <name>`, all
/// hex; scope 0 is global).
pub fn parse_if_inet6(text: &str, name: &str) -> Vec<(Ipv6Addr, u8)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [addr, _index, prefix, scope, _flags, ifname] = f.as_slice() else {
                return None;
            };
            if *ifname != name || u8::from_str_radix(scope, 16).ok()? != 0 {
                return None;
            }
            let addr = u128::from_str_radix(addr, 16).ok()?;
            Some((Ipv6Addr::from(addr), u8::from_str_radix(prefix, 16).ok()?))
        })
        .collect()
}

fn ifreq_for(name: &str) -> Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name:?}: 1 to {} bytes", libc::IFNAMSIZ - 1);
    }
    // SAFETY: an all-zero ifreq is a valid value of the plain C struct.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// One SIOCGIF* ioctl on `socket` for interface `name`.
fn ifreq_ioctl(socket: &OwnedFd, name: &str, request: libc::c_ulong) -> Result<libc::ifreq> {
    let mut req = ifreq_for(name)?;
    // SAFETY: the SIOCGIF* requests read the name from and write their answer into `req`, a
    // live ifreq; the socket fd is open.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("ioctl {request:#x} on {name}"));
    }
    Ok(req)
}

fn sockaddr_ipv4(addr: &libc::sockaddr) -> Option<Ipv4Addr> {
    if i32::from(addr.sa_family) != libc::AF_INET {
        return None;
    }
    // SAFETY: an AF_INET sockaddr is a sockaddr_in, which fits in sockaddr (both 16 bytes);
    // read_unaligned copes with the ifreq union's alignment.
    let sin: libc::sockaddr_in = unsafe {
        std::ptr::read_unaligned(addr as *const libc::sockaddr as *const libc::sockaddr_in)
    };
    Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

/// MAC, MTU and IPv4 address of `name` in the calling thread's network namespace.
fn link_info_here(name: &str) -> Result<LinkInfo> {
    // SAFETY: socket(2) with constant arguments; the returned fd is checked, then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_INET)");
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let hw = ifreq_ioctl(&socket, name, libc::SIOCGIFHWADDR)?;
    // SAFETY: SIOCGIFHWADDR filled the ifru_hwaddr member of the union.
    let hwaddr = unsafe { hw.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hwaddr.sa_data.iter()) {
        *dst = *src as u8;
    }
    let mtu = ifreq_ioctl(&socket, name, libc::SIOCGIFMTU)?;
    // SAFETY: SIOCGIFMTU filled the ifru_mtu member.
    let mtu = unsafe { mtu.ifr_ifru.ifru_mtu };
    // No IPv4 address is EADDRNOTAVAIL: not an error here.
    let ipv4 = match ifreq_ioctl(&socket, name, libc::SIOCGIFADDR) {
        Ok(addr) => {
            // SAFETY: SIOCGIFADDR filled the ifru_addr member.
            let ip = sockaddr_ipv4(&unsafe { addr.ifr_ifru.ifru_addr });
            let mask = ifreq_ioctl(&socket, name, libc::SIOCGIFNETMASK)?;
            // SAFETY: SIOCGIFNETMASK filled the ifru_netmask member.
            let mask = sockaddr_ipv4(&unsafe { mask.ifr_ifru.ifru_netmask });
            ip.zip(mask)
                .map(|(ip, mask)| (ip, u32::from(mask).count_ones() as u8))
        }
        Err(_) => None,
    };
    // No IPv6 at all (disabled) leaves no file: no addresses.
    let ipv6 = std::fs::read_to_string("/proc/thread-self/net/if_inet6")
        .map(|text| parse_if_inet6(&text, name))
        .unwrap_or_default();
    Ok(LinkInfo {
        mac,
        mtu: u32::try_from(mtu).unwrap_or(0),
        ipv4,
        ipv6,
    })
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("opening the network namespace {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// The namespace's inode: `/proc/PID/ns/net` of a process in it links to `net:[INO]`.
    pub fn inode(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .with_context(|| format!("stat {}", self.path.display()))?
            .ino())
    }

    /// Runs `f` in a thread inside the namespace.
    fn run_in<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let fd = self.file.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).with_context(
                        || format!("entering the network namespace {}", self.path.display()),
                    )?;
                    f()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?
        })
    }

    /// The names of the namespace's interfaces.
    pub fn links(&self) -> Result<Vec<String>> {
        self.run_in(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/dev")
                .context("reading /proc/thread-self/net/dev")?;
            Ok(parse_net_dev(&text))
        })
    }

    /// MAC, MTU and IPv4 address of interface `name` in the namespace.
    pub fn link_info(&self, name: &str) -> Result<LinkInfo> {
        let name = name.to_owned();
        self.run_in(move || link_info_here(&name))
    }
}

/// Pids of the processes (other than this one) in the network namespace with inode `ino`.
pub fn processes_in(ino: u64) -> Vec<u32> {
    let want = format!("net:[{ino}]");
    let me = std::process::id();
    crate::procfs::pids()
        .into_iter()
        .filter_map(|(pid, dir)| u32::try_from(pid).ok().map(|pid| (pid, dir)))
        .filter(|(pid, dir)| {
            *pid != me
                && std::fs::read_link(dir.join("ns/net"))
                    .is_ok_and(|l| l.to_str() == Some(want.as_str()))
        })
        .map(|(pid, _)| pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_names_are_parsed() {
        let text = "Inter-|   Receive                            |  Transmit\n \
                    face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
                    lo:    1234      10    0    0    0     0          0         0     1234\n  \
                    eth0: 9 1 0 0 0 0 0 0 9\n\
                    tap0_palisade: 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text), vec!["lo", "eth0", "tap0_palisade"]);
        assert!(parse_net_dev("only\nheaders\n").is_empty());
    }

    #[test]
    fn global_ipv6_addresses_are_parsed() {
        let text = "fd950000000000000000000000000002 05 40 00 80     eth0\n\
                    fe80000000000000306302fffe50a28f 05 40 20 80     eth0\n\
                    00000000000000000000000000000001 01 80 10 80       lo\n\
                    fd950000000000000000000000000009 06 40 00 80     eth1\n";
        assert_eq!(
            parse_if_inet6(text, "eth0"),
            vec![("fd95::2".parse().expect("ip"), 64)]
        );
        assert!(parse_if_inet6(text, "lo").is_empty(), "::1 is host scope");
        assert!(parse_if_inet6("garbage line\n", "eth0").is_empty());
    }

    #[test]
    fn loopback_of_this_namespace_is_read() {
        let ns = Netns::open(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(ns.links().expect("links").iter().any(|l| l == "lo"));
        let lo = ns.link_info("lo").expect("lo");
        assert_eq!(lo.mac, [0; 6], "loopback has an all-zero MAC");
        assert!(lo.mtu >= 1500, "lo mtu {}", lo.mtu);
        // Down loopback (a fresh netns) has no address; an up one has 127.0.0.1/8.
        if let Some((ip, prefix)) = lo.ipv4 {
            assert_eq!((ip, prefix), (Ipv4Addr::LOCALHOST, 8));
        }
        assert!(ns.link_info("no-such-if0").is_err());
        assert!(ns.link_info("").is_err());
        assert_eq!(
            format_mac(&[2, 0x42, 10, 0x58, 0, 0xff]),
            "02:42:0a:58:00:ff"
        );
    }
}
