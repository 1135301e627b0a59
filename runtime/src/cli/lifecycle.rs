//! create / run / delete / exec.

use std::{
    io::{IsTerminal, Read, Write},
    os::fd::OwnedFd,
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitStatus},
    unistd::Pid,
};
use oci_spec::runtime::Process;
use palisade_runtime::{spec, CreateOptions, Error, ExecOptions, Runtime, Stdio, Terminal};

use super::{signals, CreateArgs};

fn create_options(args: &CreateArgs, terminal: Terminal) -> CreateOptions {
    CreateOptions {
        stdio: Stdio::default(),
        terminal,
        pid_file: args.pid_file.clone(),
        no_pivot: args.no_pivot,
        no_new_keyring: args.no_new_keyring,
        preserve_fds: args.preserve_fds,
    }
}

/// The spec's `process.terminal`, to decide how a foreground run gets its tty.
fn wants_terminal(bundle: &std::path::Path) -> Result<bool> {
    let loaded = spec::load_bundle(bundle)?;
    Ok(loaded
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false))
}

pub fn create(runtime: &Runtime, args: CreateArgs) -> Result<()> {
    let terminal = match &args.console_socket {
        Some(path) => Terminal::ConsoleSocket(path.clone()),
        None => Terminal::None,
    };
    runtime.create(
        &args.container_id,
        &args.bundle,
        create_options(&args, terminal),
    )?;
    Ok(())
}

pub fn run(runtime: &Runtime, args: CreateArgs, detach: bool) -> Result<i32> {
    let terminal = match &args.console_socket {
        Some(path) => Terminal::ConsoleSocket(path.clone()),
        None if !detach && wants_terminal(&args.bundle)? => Terminal::ReturnMaster,
        None => Terminal::None,
    };
    let mut container = runtime.create(
        &args.container_id,
        &args.bundle,
        create_options(&args, terminal),
    )?;
    let pid = container.pid().context("container has no init pid")?;
    // Sized before the container runs anything that could ask.
    let master = container.take_pty_master();
    if let Some(master) = &master {
        copy_window_size(master);
    }
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        return Err(e.into());
    }
    if detach {
        return Ok(0);
    }
    signals::forward_to(pid);
    let code = wait_with_tty(pid, master)?;
    container.delete(true)?;
    Ok(code)
}

pub fn delete(runtime: &Runtime, id: &str, force: bool) -> Result<()> {
    match runtime.load(id) {
        Ok(container) => Ok(container.delete(force)?),
        // A directory without a state file is what an interrupted create leaves; with
        // --force that is removed too (runc does the same).
        Err(Error::NotFound(_)) if force => {
            palisade_runtime::state::validate_id(id)?;
            let dir = runtime.root().join(id);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", dir.display()))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// JSON file with the process to run (runtime-spec `process`).
    #[arg(short, long)]
    process: Option<PathBuf>,
    /// Allocate a pty.
    #[arg(short, long)]
    tty: bool,
    /// Do not wait for the process.
    #[arg(short, long)]
    detach: bool,
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// Extra environment variables (KEY=VALUE).
    #[arg(short, long)]
    env: Vec<String>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// `uid[:gid]`.
    #[arg(short, long)]
    user: Option<String>,
    /// Extra capabilities.
    #[arg(short, long)]
    cap: Vec<String>,
    /// Set no_new_privs.
    #[arg(long = "no-new-privs")]
    no_new_privs: bool,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    container_id: String,
    /// Command and arguments (when no --process is given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn exec_process(args: &ExecArgs, base: Option<&Process>) -> Result<Process> {
    if let Some(path) = &args.process {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        return serde_json::from_slice(&text)
            .with_context(|| format!("parsing process {}", path.display()));
    }
    if args.command.is_empty() {
        bail!("exec needs a command or --process");
    }
    let mut process = base.cloned().unwrap_or_default();
    process.set_args(Some(args.command.clone()));
    process.set_terminal(Some(args.tty));
    let mut env = process.env().clone().unwrap_or_default();
    env.extend(args.env.iter().cloned());
    process.set_env(Some(env));
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.clone());
    }
    if let Some(user) = &args.user {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let mut u = process.user().clone();
        u.set_uid(uid.parse().with_context(|| format!("--user {user:?}"))?);
        if let Some(g) = gid {
            u.set_gid(g.parse().with_context(|| format!("--user {user:?}"))?);
        }
        process.set_user(u);
    }
    if !args.cap.is_empty() {
        let mut caps = process.capabilities().clone().unwrap_or_default();
        let mut value = serde_json::to_value(&caps)?;
        for set in [
            "bounding",
            "effective",
            "permitted",
            "ambient",
            "inheritable",
        ] {
            if let Some(list) = value.get_mut(set).and_then(|l| l.as_array_mut()) {
                for cap in &args.cap {
                    list.push(cap.clone().into());
                }
            }
        }
        caps = serde_json::from_value(value).context("--cap")?;
        process.set_capabilities(Some(caps));
    }
    if args.no_new_privs {
        process.set_no_new_privileges(Some(true));
    }
    Ok(process)
}

pub fn exec(runtime: &Runtime, args: ExecArgs) -> Result<i32> {
    let container = runtime.load(&args.container_id)?;
    let process = exec_process(&args, container.spec().process().as_ref())?;
    let tty = process.terminal().unwrap_or(false);
    let terminal = match &args.console_socket {
        Some(path) => Terminal::ConsoleSocket(path.clone()),
        None if tty && !args.detach => Terminal::ReturnMaster,
        None => Terminal::None,
    };
    let mut process = process;
    if tty && process.console_size().is_none() {
        process.set_console_size(our_window_size());
    }
    let mut opts = ExecOptions::new(process);
    opts.terminal = terminal;
    opts.pid_file = args.pid_file.clone();
    opts.preserve_fds = args.preserve_fds;
    let handle = container.exec(opts)?;
    if args.detach {
        return Ok(0);
    }
    signals::forward_to(handle.pid);
    wait_with_tty(handle.pid, handle.pty_master)
}

/// Waits for `pid`, copying between our stdio and the pty master if there is one; returns
/// the exit code the way a shell reports it (128+n for a signal).
fn wait_with_tty(pid: i32, master: Option<OwnedFd>) -> Result<i32> {
    let _raw = master.as_ref().and_then(|_| RawMode::enable());
    if let Some(master) = master {
        let mut input = std::fs::File::from(master.try_clone()?);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || input.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut output = std::fs::File::from(master);
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        // EIO once the last slave fd is closed: the process is gone.
        while let Ok(n) = output.read(&mut buf) {
            if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = stdout.flush();
        }
    }
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).with_context(|| format!("waiting for {pid}")),
        }
    }
}

nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);

/// The size of our terminal, if stdin is one.
fn window_size() -> Option<libc::winsize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into `ws`, owned by this frame.
    unsafe { tiocgwinsz(0, &mut ws) }.ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(ws)
}

/// `process.consoleSize` for an exec'd process: our terminal's size.
fn our_window_size() -> Option<oci_spec::runtime::Box> {
    let ws = window_size()?;
    oci_spec::runtime::BoxBuilder::default()
        .height(u64::from(ws.ws_row))
        .width(u64::from(ws.ws_col))
        .build()
        .ok()
}

/// Gives the container's pty the size of our terminal (if stdin is one).
fn copy_window_size(master: &OwnedFd) {
    use std::os::fd::AsRawFd;
    if let Some(ws) = window_size() {
        // SAFETY: TIOCSWINSZ reads the valid winsize `ws` for the duration of the call.
        let _ = unsafe { tiocswinsz(master.as_raw_fd(), &ws) };
    }
}

/// Puts our terminal in raw mode while a container's tty is attached.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enable() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}
