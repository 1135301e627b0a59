//! Linux namespaces of a container: which to create, which to join by path, and the
//! order in which a single-threaded process must enter them.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
};

use nix::{
    fcntl::{open, OFlag},
    sched::{setns, unshare, CloneFlags},
    sys::stat::Mode,
};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

/// The `clone(2)` flag of a namespace type.
pub fn clone_flag(typ: LinuxNamespaceType) -> CloneFlags {
    match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

/// The name of a namespace type under `/proc/<pid>/ns/`.
pub fn proc_name(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// What to do about namespaces, derived from `linux.namespaces`.
#[derive(Debug, Clone)]
pub struct Plan {
    /// A new user namespace is created (its id maps are written by the parent).
    pub new_user: bool,
    /// Namespaces created with `unshare`, except the user namespace.
    pub unshare: CloneFlags,
    /// Existing namespaces to join, user namespace first.
    pub join: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            new_user: false,
            unshare: CloneFlags::empty(),
            join: Vec::new(),
        }
    }
}

impl Plan {
    /// The plan for a container's init.
    pub fn for_create(namespaces: &[LinuxNamespace]) -> Self {
        let mut plan = Plan::default();
        for ns in namespaces {
            match ns.path() {
                Some(path) => plan.join.push((ns.typ(), path.clone())),
                None if ns.typ() == LinuxNamespaceType::User => plan.new_user = true,
                None => plan.unshare |= clone_flag(ns.typ()),
            }
        }
        plan.sort();
        plan
    }

    /// The plan for a process exec'd into the container whose init is `pid`: join all of
    /// its namespaces through `/proc/<pid>/ns`.
    pub fn for_exec(namespaces: &[LinuxNamespace], pid: i32) -> Self {
        let mut plan = Plan::default();
        for ns in namespaces {
            let path = PathBuf::from(format!("/proc/{pid}/ns/{}", proc_name(ns.typ())));
            plan.join.push((ns.typ(), path));
        }
        plan.sort();
        plan
    }

    /// The user namespace goes first (it owns the others and grants the capabilities to
    /// enter them), the mount namespace last (entering it changes how later paths resolve,
    /// although all files are opened before any `setns`).
    fn sort(&mut self) {
        self.join.sort_by_key(|(typ, _)| match typ {
            LinuxNamespaceType::User => 0,
            LinuxNamespaceType::Mount => 2,
            _ => 1,
        });
    }

    /// Opens the namespace files to join, before entering any of them.
    pub fn open(&self) -> Result<Vec<(LinuxNamespaceType, OwnedFd)>, String> {
        self.join
            .iter()
            .map(|(typ, path)| {
                open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .map(|fd| (*typ, fd))
                    .map_err(|e| {
                        format!(
                            "opening {} namespace {}: {}",
                            proc_name(*typ),
                            path.display(),
                            e.desc()
                        )
                    })
            })
            .collect()
    }
}

/// Joins one opened namespace.
pub fn join(typ: LinuxNamespaceType, fd: &OwnedFd) -> Result<(), String> {
    setns(fd.as_fd(), clone_flag(typ))
        .map_err(|e| format!("joining {} namespace: {}", proc_name(typ), e.desc()))
}

/// Creates new namespaces for the calling (single-threaded) process.
pub fn create(flags: CloneFlags) -> Result<(), String> {
    if flags.is_empty() {
        return Ok(());
    }
    unshare(flags).map_err(|e| format!("unshare({flags:?}): {}", e.desc()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxNamespaceBuilder;

    #[test]
    fn plan_orders_user_first_mount_last() {
        let ns = |t, p: Option<&str>| {
            let b = LinuxNamespaceBuilder::default().typ(t);
            match p {
                Some(p) => b.path(p).build().unwrap(),
                None => b.build().unwrap(),
            }
        };
        let plan = Plan::for_create(&[
            ns(LinuxNamespaceType::Mount, Some("/m")),
            ns(LinuxNamespaceType::Network, Some("/n")),
            ns(LinuxNamespaceType::User, Some("/u")),
            ns(LinuxNamespaceType::Pid, None),
        ]);
        let order: Vec<_> = plan.join.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            order,
            [
                LinuxNamespaceType::User,
                LinuxNamespaceType::Network,
                LinuxNamespaceType::Mount
            ]
        );
        assert_eq!(plan.unshare, CloneFlags::CLONE_NEWPID);
        assert!(!plan.new_user);
    }
}
