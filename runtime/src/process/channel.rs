//! The sync channel between the caller and the processes it forks: a `SOCK_SEQPACKET`
//! socket pair (message boundaries are kept, so each message is one JSON datagram),
//! optionally carrying one file descriptor with `SCM_RIGHTS`.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use nix::{
    cmsg_space,
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::socket::{
        recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
        SockFlag, SockType,
    },
};
use serde::{Deserialize, Serialize};

/// Largest message: the state JSON with annotations must fit.
const MAX_MESSAGE: usize = 256 * 1024;

/// What the processes tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Intermediate → caller: a new user namespace exists; write its id maps.
    NeedIdMaps,
    /// Caller → intermediate or container process: go on.
    Ack,
    /// Intermediate → caller: the pid of the container process (the caller's child).
    Pid(i32),
    /// Caller → container init: it has been moved into its cgroup.
    CgroupJoined,
    /// Container init → caller: mounts are done; run prestart/createRuntime hooks and send
    /// the state for createContainer and startContainer hooks.
    RunHooks,
    /// Caller → container init: hooks ran; the OCI state JSON.
    HooksDone(String),
    /// Container process → caller: the pty master (carried as the message's fd).
    PtyMaster,
    /// Container init → caller: set up, about to block on the exec fifo.
    Ready,
    /// Any → caller: what failed.
    Error(String),
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A connected pair: (caller's end, forked process's end). Both are close-on-exec, so a
/// successful `execve` in the container process closes its end (the caller sees EOF).
pub fn pair() -> nix::Result<(Channel, Channel)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((Channel { fd: a }, Channel { fd: b }))
}

impl Channel {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends a message, with `fd` attached if given.
    pub fn send_with_fd(&self, msg: &Msg, fd: Option<RawFd>) -> Result<(), String> {
        let data = serde_json::to_vec(msg).map_err(|e| format!("encoding {msg:?}: {e}"))?;
        let iov = [IoSlice::new(&data)];
        let fds;
        let cmsgs: &[ControlMessage] = match fd {
            Some(fd) => {
                fds = [fd];
                &[ControlMessage::ScmRights(&fds)]
            }
            None => &[],
        };
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| format!("sending {msg:?}: {}", e.desc()))?;
        Ok(())
    }

    pub fn send(&self, msg: &Msg) -> Result<(), String> {
        self.send_with_fd(msg, None)
    }

    /// Receives the next message; `Ok(None)` when every peer closed its end.
    pub fn recv(&self) -> Result<Option<(Msg, Option<OwnedFd>)>, String> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = cmsg_space!([RawFd; 1]);
        let (len, fd) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(r) => {
                    let mut fd = None;
                    for c in r
                        .cmsgs()
                        .map_err(|e| format!("reading control data: {e}"))?
                    {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            for raw in fds {
                                // SAFETY: SCM_RIGHTS just installed `raw` in our table; we
                                // are its only owner.
                                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                                fd.get_or_insert(owned);
                            }
                        }
                    }
                    break (r.bytes, fd);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("receiving: {}", e.desc())),
            }
        };
        if len == 0 {
            return Ok(None);
        }
        let msg =
            serde_json::from_slice(&buf[..len]).map_err(|e| format!("decoding message: {e}"))?;
        Ok(Some((msg, fd)))
    }

    /// Waits up to `timeout` for the channel to become readable.
    pub fn readable(&self, timeout: Duration) -> bool {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&self.fd),
            PollFlags::POLLIN,
        )];
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        matches!(poll(&mut fds, ms), Ok(n) if n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_fds_round_trip() {
        let (a, b) = pair().unwrap();
        b.send(&Msg::Pid(42)).unwrap();
        assert_eq!(a.recv().unwrap().unwrap().0, Msg::Pid(42));
        let file = std::fs::File::open("/dev/null").unwrap();
        b.send_with_fd(&Msg::PtyMaster, Some(file.as_raw_fd()))
            .unwrap();
        let (msg, fd) = a.recv().unwrap().unwrap();
        assert_eq!(msg, Msg::PtyMaster);
        assert!(fd.is_some());
        drop(b);
        assert!(a.recv().unwrap().is_none());
    }
}
