//! `exec`: another process in a running container's namespaces and cgroup.

use std::os::{
    fd::{AsRawFd, OwnedFd},
    unix::net::UnixStream,
};

use nix::{sys::wait::waitpid, unistd::Pid};

use super::{
    create::{check_terminal, stdio_fds},
    Container,
};
use crate::{
    error::{Context, Error, Result},
    namespaces,
    process::{
        channel::{self, Msg},
        child::{self, ChildConfig, Role},
        ExecHandle, ExecOptions, Terminal,
    },
    seccomp, spec, utils,
};

pub(super) fn exec(container: &Container, opts: ExecOptions) -> Result<ExecHandle> {
    let state = container.persisted();
    spec::validate_process(&opts.process, "process")?;
    check_terminal(opts.process.terminal().unwrap_or(false), &opts.terminal)?;
    let linux = state.spec.linux().clone().unwrap_or_default();
    let seccomp = linux.seccomp().as_ref().map(seccomp::compile).transpose()?;
    let plan =
        namespaces::Plan::for_exec(linux.namespaces().as_deref().unwrap_or_default(), state.pid);
    let console_socket = match &opts.terminal {
        Terminal::ConsoleSocket(path) => Some(
            UnixStream::connect(path)
                .context(|| format!("connecting to console socket {}", path.display()))?,
        ),
        _ => None,
    };
    let (parent_end, child_end) = channel::pair().context(|| "socketpair".into())?;
    let cfg = ChildConfig {
        role: Role::Exec,
        process: &opts.process,
        plan: &plan,
        cgroup: Some(&state.cgroup),
        stdio: stdio_fds(&opts.stdio),
        console_socket: console_socket.as_ref().map(|s| s.as_raw_fd()),
        return_master: opts.terminal == Terminal::ReturnMaster,
        preserve_fds: opts.preserve_fds,
        seccomp: seccomp.as_ref(),
        channel: &child_end,
    };
    let intermediate = child::spawn_intermediate(&cfg)?;
    drop(child_end);
    drop(console_socket);

    let mut pid = None;
    let mut pty_master: Option<OwnedFd> = None;
    // The process's end of the channel is close-on-exec: EOF means it executed (or died
    // without a word, which its exit status will tell the caller).
    // Read to EOF: the intermediate's `Pid` may arrive after the process's `Error`.
    let mut failure = None;
    loop {
        match parent_end.recv() {
            Ok(Some((Msg::Pid(p), _))) => pid = Some(p),
            Ok(Some((Msg::PtyMaster, fd))) => pty_master = fd,
            Ok(Some((Msg::Error(msg), _))) => {
                failure.get_or_insert(msg);
            }
            Ok(Some((other, _))) => {
                failure.get_or_insert(format!("unexpected message {other:?}"));
            }
            Ok(None) => break,
            Err(e) => {
                failure.get_or_insert(e);
                break;
            }
        }
    }
    let _ = waitpid(intermediate, None);
    if let Some(msg) = failure {
        if let Some(pid) = pid {
            // It reported its failure and exits: reap it, the caller never learns its pid.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
        }
        return Err(Error::Child(msg));
    }
    let pid = pid.ok_or_else(|| Error::Child("exec: the process was not created".into()))?;
    if let Some(pid_file) = &opts.pid_file {
        utils::write_atomic(pid_file, pid.to_string().as_bytes())?;
    }
    tracing::debug!(container = %state.id, pid, "exec");
    Ok(ExecHandle { pid, pty_master })
}
