//! `containerd-shim-palisade-v2`: containerd's shim v2 for palisade (runtime type
//! `io.containerd.palisade.v2`).
//!
//! containerd runs the binary three ways:
//! - `start`: find or spawn the pod's shim server, print its ttrpc address;
//! - `delete`: clean up after a shim that died (containerd then forgets the task);
//! - no action (with `-socket`): be the shim server.
//!
//! The bootstrap is done here rather than by `containerd_shim::run` because that one
//! speaks containerd 2.x's task v3 API and start reply only; containerd 1.6/1.7 (Debian
//! 12's) calls `containerd.task.v2.Task` and reads a bare address. Serving both service
//! names with a bare address works with 1.6, 1.7 and 2.x.

mod config;
mod events;
mod logging;
mod reaper;
mod sandbox;
mod service;

use std::{
    collections::HashMap,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use containerd_shim::{
    asynchronous::{publisher::RemotePublisher, ExitSignal},
    Flags, StartOpts,
};
use containerd_shim_protos::{
    api::DeleteResponse,
    protobuf::{Message, MessageField},
    shim_async::create_task,
    ttrpc::r#async::{transport::Listener, Server},
};
use tokio::io::AsyncWriteExt;
use tracing::{error, info};

use crate::{
    config::{Config, SANDBOX_ID_ANNOTATION},
    events::EventSink,
    sandbox::native::{cleanup_after_dead_shim, engine_from_config, process::now},
    service::TaskService,
};

pub const RUNTIME_ID: &str = "io.containerd.palisade.v2";
const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            std::process::exit(2);
        }
    };
    if flags.version {
        println!("{RUNTIME_ID} {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    // One thread: a shim serves one pod and its work is waiting on pipes and children.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match flags.action.as_str() {
                "start" => start(&flags).await,
                "delete" => delete(&flags).await,
                _ => serve(&flags).await,
            }
        })
    });
    if let Err(e) = result {
        error!("{e:#}");
        eprintln!("{RUNTIME_ID}: {e:#}");
        std::process::exit(1);
    }
}

/// Containers of a CRI pod share one shim, keyed by the pod's sandbox id; anything else
/// gets a shim of its own.
fn grouping(id: &str, bundle: &Path) -> String {
    let annotations = std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|spec| spec.get("annotations").cloned());
    annotations
        .as_ref()
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(id)
        .to_string()
}

fn bundle_dir(flags: &Flags) -> Result<PathBuf> {
    if !flags.bundle.is_empty() {
        return Ok(PathBuf::from(&flags.bundle));
    }
    // containerd runs the shim in the bundle directory.
    std::env::current_dir().context("current directory (the bundle)")
}

async fn start(flags: &Flags) -> Result<()> {
    let bundle = bundle_dir(flags)?;
    let group = grouping(&flags.id, &bundle);
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    if ttrpc_address.is_empty() {
        bail!("TTRPC_ADDRESS is not set (containerd sets it when it starts a shim)");
    }
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: ttrpc_address.clone(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    // Spawns `<self> -socket ADDR ...` and returns once that server is serving (or
    // found the pod's server already serving on ADDR).
    let address = containerd_shim::spawn(opts, &group, vec![("TTRPC_ADDRESS", &ttrpc_address)])
        .await
        .context("starting the shim server")?;
    // containerd reads it back when it restarts and reconnects to running shims.
    std::fs::write(bundle.join("address"), &address).context("writing the address file")?;
    let mut stdout = tokio::io::stdout();
    stdout.write_all(address.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

async fn delete(flags: &Flags) -> Result<()> {
    let bundle = bundle_dir(flags)?;
    // A VM-mode pod's VMM (if it outlived its shim) and VM state dir.
    sandbox::vm::vmm::cleanup_after_dead_shim(&bundle);
    sandbox::vm::cgroup::cleanup_after_dead_shim(&bundle);
    // Its taps and tc mirroring in the pod's netns, if that still exists.
    let net_bundle = bundle.clone();
    tokio::task::spawn_blocking(move || sandbox::vm::network::cleanup_after_dead_shim(&net_bundle))
        .await?;
    let config = Config::load(None).context("loading the shim config")?;
    let engine = engine_from_config(&config, &flags.namespace)?;
    let id = flags.id.clone();
    let bundle_for_cleanup = bundle.clone();
    tokio::task::spawn_blocking(move || {
        cleanup_after_dead_shim(engine.as_ref(), &id, &bundle_for_cleanup)
    })
    .await?;
    // A killed shim leaves its socket behind; remove it unless a live server owns it.
    if !flags.address.is_empty() {
        let group = grouping(&flags.id, &bundle);
        let socket = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
        let path = socket.trim_start_matches("unix://");
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    let response = DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: MessageField::some(now()),
        ..Default::default()
    };
    let mut stdout = tokio::io::stdout();
    stdout.write_all(&response.write_to_bytes()?).await?;
    stdout.flush().await?;
    Ok(())
}

async fn serve(flags: &Flags) -> Result<()> {
    if flags.socket.is_empty() {
        bail!("-socket is required to serve (containerd passes it to the shim server)");
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!("becoming a subreaper: {}", std::io::Error::last_os_error());
    }
    // containerd reads the shim's log from the `log` FIFO in the bundle directory; tracing
    // events reach it as `log` records.
    if let Err(e) = logging::init(Path::new("log"), flags.debug) {
        eprintln!("{RUNTIME_ID}: no log fifo, not logging: {e}");
    }

    let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
    reaper::start(exits_tx).context("starting the reaper")?;

    let socket = flags.socket.trim_start_matches("unix://").to_string();
    let Some(listener) = bind_or_join(&socket)? else {
        // The pod's shim already serves this address; `start` is satisfied.
        std::fs::write("address", &flags.socket).ok();
        signal_server_started();
        return Ok(());
    };

    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .context("connecting to containerd's event service")?;
    let exit = Arc::new(ExitSignal::default());
    let service = Arc::new(TaskService::new(
        &flags.namespace,
        EventSink::new(publisher, &flags.namespace),
        exits_rx,
        exit.clone(),
    ));

    let mut services = HashMap::new();
    for name in [TASK_V2, TASK_V3] {
        let mut one = create_task(service.clone());
        let task = one
            .remove(TASK_V3)
            .context("containerd-shim-protos no longer generates containerd.task.v3.Task")?;
        services.insert(name.to_string(), task);
    }
    let listener = Listener::try_from(listener).context("ttrpc listener")?;
    let mut server = Server::new().add_listener(listener);
    for (name, task) in services {
        server = server.register_service(HashMap::from([(name, task)]));
    }
    server.start().await.context("starting the ttrpc server")?;
    signal_server_started();
    info!(socket, "shim serving");

    exit.wait().await;
    info!("shutting down");
    server.shutdown().await.ok();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Binds the shim socket, or returns `None` when a live server already owns it (the
/// pod's shim: containers of one pod share it).
fn bind_or_join(path: &str) -> Result<Option<UnixListener>> {
    if let Some(parent) = Path::new(path).parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match UnixListener::bind(path) {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            // A dead shim's socket.
            std::fs::remove_file(path).with_context(|| format!("removing stale {path}"))?;
            Ok(Some(
                UnixListener::bind(path).with_context(|| format!("binding {path}"))?,
            ))
        }
        Err(e) => Err(e).with_context(|| format!("binding {path}")),
    }
}

/// `start` waits for EOF on the server's stdout: point stdout at stderr.
fn signal_server_started() {
    // SAFETY: dup2 on the process's own standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}
