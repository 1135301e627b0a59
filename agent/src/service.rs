//! The ttrpc `palisade.agent.v1.Agent` service: request plumbing onto [`Containers`] and
//! the sandbox functions. Every handler logs failures and returns them as ttrpc statuses;
//! nothing a request contains can stop the agent.

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use palisade_agent_protocol::{
    agent::*,
    agent_ttrpc::{self, Agent},
    PROTOCOL_VERSION,
};
use ttrpc::r#async::TtrpcContext;

use crate::{
    containers::Containers,
    copy::Copies,
    error::{AgentError, Result},
    network, sandbox,
};

pub struct AgentService {
    containers: Arc<Containers>,
    /// Host bind mounts copied in (CopyFile), next to `sandbox_dir`: `<state>/copies`.
    copies: Arc<Copies>,
    sandbox_dir: PathBuf,
    /// PID 1 in a VM: DestroySandbox ends the VM.
    in_vm: bool,
}

impl AgentService {
    pub fn new(containers: Arc<Containers>, sandbox_dir: PathBuf, in_vm: bool) -> Self {
        let copies = Arc::new(Copies::new(sandbox_dir.with_file_name("copies")));
        Self {
            containers,
            copies,
            sandbox_dir,
            in_vm,
        }
    }

    /// Registers the service for a ttrpc server.
    pub fn register(self) -> std::collections::HashMap<String, ttrpc::r#async::Service> {
        agent_ttrpc::create_agent(Arc::new(self))
    }
}

/// Logs a failed request and converts the error to a ttrpc status.
fn reply<T>(rpc: &str, result: Result<T>) -> ttrpc::Result<T> {
    result.map_err(|e: AgentError| {
        tracing::warn!(rpc, code = ?e.code(), "{e}");
        e.into()
    })
}

fn empty(result: Result<()>) -> Result<Empty> {
    result.map(|()| Empty::new())
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            serving: true,
            ..Default::default()
        })
    }

    async fn guest_info(
        &self,
        _: &TtrpcContext,
        _: GuestInfoRequest,
    ) -> ttrpc::Result<GuestInfoResponse> {
        reply("GuestInfo", sandbox::guest_info())
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let dir = self.sandbox_dir.clone();
        let result = tokio::task::spawn_blocking(move || sandbox::create(&req, &dir))
            .await
            .unwrap_or_else(|e| {
                Err(AgentError::Io {
                    context: "CreateSandbox".into(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        reply("CreateSandbox", empty(result))
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        _: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self.containers.remove_all().await;
        let copies = self.copies.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || copies.remove_all()).await {
            tracing::warn!("removing copies: {e}");
        }
        if self.in_vm {
            // Reply first, then end the VM.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tracing::info!("sandbox destroyed; powering off");
                crate::init::power_off();
            });
        }
        reply("DestroySandbox", empty(result))
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let id = req.container_id.clone();
        let result = self
            .containers
            .create(req)
            .await
            .map(|pid| CreateContainerResponse {
                pid,
                ..Default::default()
            });
        match &result {
            Ok(r) => tracing::info!(container = %id, pid = r.pid, "created"),
            // Copies made for a container that did not come to be go with it.
            Err(_) if !self.containers.knows(&id) => self.remove_copies(&id).await,
            Err(_) => {}
        }
        reply("CreateContainer", result)
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "StartContainer",
            empty(self.containers.start(&req.container_id).await),
        )
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let result = self
            .containers
            .exec(req)
            .await
            .map(|pid| ExecProcessResponse {
                pid,
                ..Default::default()
            });
        reply("ExecProcess", result)
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self
            .containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await;
        reply("SignalProcess", empty(result))
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        reply(
            "WaitProcess",
            self.containers.wait(&req.container_id, &req.exec_id).await,
        )
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> ttrpc::Result<WriteStdinResponse> {
        let result = self
            .containers
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .await
            .map(|len| WriteStdinResponse {
                len,
                ..Default::default()
            });
        reply("WriteStdin", result)
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        let result = self
            .containers
            .close_stdin(&req.container_id, &req.exec_id)
            .await;
        reply("CloseStdin", empty(result))
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        reply("ReadStdout", self.read(req, false).await)
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        reply("ReadStderr", self.read(req, true).await)
    }

    async fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self
            .containers
            .resize(&req.container_id, &req.exec_id, req.rows, req.columns);
        reply("TtyWinResize", empty(result))
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "PauseContainer",
            empty(self.containers.pause(&req.container_id).await),
        )
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "ResumeContainer",
            empty(self.containers.resume(&req.container_id).await),
        )
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self
            .containers
            .update(&req.container_id, &req.resources_json)
            .await;
        reply("UpdateContainer", empty(result))
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        reply(
            "StatsContainer",
            self.containers.stats(&req.container_id).await,
        )
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let result =
            self.containers
                .pids(&req.container_id)
                .await
                .map(|pids| ListProcessesResponse {
                    pids,
                    ..Default::default()
                });
        reply("ListProcesses", result)
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self.containers.remove(&req.container_id, req.force).await;
        if result.is_ok() {
            tracing::info!(container = %req.container_id, "removed");
        }
        // Also for an unknown container: the shim removes copies of a create it abandoned.
        if result.is_ok() || !self.containers.knows(&req.container_id) {
            self.remove_copies(&req.container_id).await;
        }
        reply("RemoveContainer", empty(result))
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: GetOomEventRequest,
    ) -> ttrpc::Result<OomEvent> {
        let result = self
            .containers
            .next_oom_event()
            .await
            .map(|container_id| OomEvent {
                container_id,
                ..Default::default()
            });
        reply("GetOomEvent", result)
    }

    async fn update_interface(
        &self,
        _: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Interface> {
        let result = async {
            let config = network::interface_config(&req.interface)?;
            let interface = network::update_interface(&config).await?;
            tracing::info!(
                name = %interface.name,
                mac = %interface.mac,
                mtu = interface.mtu,
                addresses = interface.addresses.len(),
                "interface configured"
            );
            Ok(interface)
        }
        .await;
        reply("UpdateInterface", result)
    }

    async fn update_routes(
        &self,
        _: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<Empty> {
        let result = async {
            let routes = network::routes_config(&req.routes)?;
            network::update_routes(&routes).await?;
            tracing::info!(routes = routes.len(), "routes configured");
            Ok(())
        }
        .await;
        reply("UpdateRoutes", empty(result))
    }

    async fn copy_file(
        &self,
        _: &TtrpcContext,
        req: CopyFileRequest,
    ) -> ttrpc::Result<CopyFileResponse> {
        if self.containers.knows(&req.container_id) {
            return reply(
                "CopyFile",
                Err(AgentError::FailedPrecondition(format!(
                    "container {:?} already exists: copies are made before it is created",
                    req.container_id
                ))),
            );
        }
        let copies = self.copies.clone();
        let result = tokio::task::spawn_blocking(move || copies.copy(&req))
            .await
            .unwrap_or_else(|e| {
                Err(AgentError::Io {
                    context: "CopyFile".into(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
            .map(|path| CopyFileResponse {
                guest_path: path.display().to_string(),
                ..Default::default()
            });
        reply("CopyFile", result)
    }
}

impl AgentService {
    async fn remove_copies(&self, container_id: &str) {
        let (copies, id) = (self.copies.clone(), container_id.to_owned());
        if let Err(e) = tokio::task::spawn_blocking(move || copies.remove(&id)).await {
            tracing::warn!(container = %container_id, "removing copies: {e}");
        }
    }

    async fn read(&self, req: ReadStreamRequest, stderr: bool) -> Result<ReadStreamResponse> {
        let (data, eof) = self
            .containers
            .read_output(&req.container_id, &req.exec_id, stderr, req.max_bytes)
            .await?;
        Ok(ReadStreamResponse {
            data,
            eof,
            ..Default::default()
        })
    }
}
