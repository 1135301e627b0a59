//! A CRI client: the kubelet's side of containerd's CRI plugin, on the `k8s-cri` protos
//! over tonic and containerd's unix socket. Shared by the host test (tests/tests/cri.rs)
//! and the nested test host's client (`cri-vm-check`, run inside L1), so both build pods
//! and containers the same way.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, DnsConfig, ExecSyncRequest, ImageSpec, ImageStatusRequest,
    LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// Opens a gRPC channel to the CRI endpoint at `socket` (containerd's own socket).
pub async fn connect(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    let shown = socket.display().to_string();
    // tonic requires a URI, but the connector below dials the unix socket instead.
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to the CRI endpoint {shown}"))
}

/// The runtime and image services of one CRI endpoint.
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

/// How a pod is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// Its own network namespace, set up by the CRI plugin's CNI config.
    Cni,
    /// The node's network namespace (`hostNetwork: true`): no CNI involved.
    Host,
}

/// What a test pod looks like.
#[derive(Debug, Clone)]
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub log_directory: &'a Path,
    pub network: PodNetwork,
    /// The pod's DNS settings (the kubelet's `dnsConfig`); None: the node's resolv.conf.
    pub dns: Option<DnsConfig>,
}

impl PodSpec<'_> {
    /// The namespaces the kubelet asks for: network per `network`, a PID namespace per
    /// container (no `shareProcessNamespace`), the pod's IPC namespace.
    pub fn namespace_options(&self) -> NamespaceOption {
        NamespaceOption {
            network: match self.network {
                PodNetwork::Cni => NamespaceMode::Pod,
                PodNetwork::Host => NamespaceMode::Node,
            } as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        }
    }

    /// The pod's RunPodSandbox config (also passed again with each CreateContainer).
    pub fn config(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.into(),
                uid: self.uid.into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            // Like the kubelet: a host-network pod shares the node's UTS namespace, so it
            // asks for no hostname (runc and palisade refuse one without a UTS namespace).
            hostname: match self.network {
                PodNetwork::Cni => self.name.into(),
                PodNetwork::Host => String::new(),
            },
            log_directory: self.log_directory.display().to_string(),
            dns_config: self.dns.clone(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(self.namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A container of this pod running `command` from `image`, logging to `log_path`
    /// (relative to the pod's log directory).
    pub fn container(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
        log_path: &str,
    ) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: log_path.into(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(self.namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// What PodSandboxStatus (verbose) says about a pod.
#[derive(Debug, Clone)]
pub struct PodStatus {
    pub state: PodSandboxState,
    /// The pod's IP (from CNI's result; empty for a host-network pod).
    pub ip: String,
    /// The pod's further IPs (dual-stack: the other family's).
    pub additional_ips: Vec<String>,
    /// The network namespace in the sandbox's OCI spec (containerd's verbose `info`), which
    /// is what the runtime's shim is given.
    pub netns: Option<PathBuf>,
}

/// The network namespace path in containerd's verbose sandbox info (the JSON under key
/// `info`: `runtimeSpec.linux.namespaces[type=network].path`).
pub fn netns_of_sandbox_info(info: &str) -> Option<PathBuf> {
    let info: serde_json::Value = serde_json::from_str(info).ok()?;
    info.pointer("/runtimeSpec/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// What ExecSync returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CriClient {
    pub async fn connect(socket: &Path) -> Result<Self> {
        let channel = connect(socket).await?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// Whether the image service knows `image` (imported into the `k8s.io` namespace).
    pub async fn has_image(&mut self, image: &str) -> Result<bool> {
        let status = self
            .images
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .with_context(|| format!("ImageStatus {image}"))?
            .into_inner();
        Ok(status.image.is_some())
    }

    /// RunPodSandbox with runtime handler `handler`; returns the pod sandbox id.
    pub async fn run_pod(&mut self, pod: &PodSpec<'_>, handler: &str) -> Result<String> {
        Ok(self
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.config()),
                runtime_handler: handler.into(),
            })
            .await
            .with_context(|| format!("RunPodSandbox {} (handler {handler})", pod.name))?
            .into_inner()
            .pod_sandbox_id)
    }

    /// PodSandboxStatus, verbose.
    pub async fn pod_status(&mut self, pod_id: &str) -> Result<PodStatus> {
        let response = self
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: true,
            })
            .await
            .with_context(|| format!("PodSandboxStatus {pod_id}"))?
            .into_inner();
        let status = response
            .status
            .with_context(|| format!("PodSandboxStatus {pod_id}: no status"))?;
        let network = status.network.clone().unwrap_or_default();
        Ok(PodStatus {
            state: status.state(),
            ip: network.ip,
            additional_ips: network.additional_ips.into_iter().map(|i| i.ip).collect(),
            netns: response
                .info
                .get("info")
                .and_then(|info| netns_of_sandbox_info(info)),
        })
    }

    /// CreateContainer + StartContainer; returns the container id.
    pub async fn start_container(
        &mut self,
        pod_id: &str,
        pod: &PodSpec<'_>,
        config: ContainerConfig,
    ) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config),
                sandbox_config: Some(pod.config()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("StartContainer {name} ({id})"))?;
        Ok(id)
    }

    /// The container's state and exit code.
    pub async fn container_state(&mut self, id: &str) -> Result<(ContainerState, i32)> {
        let status = self
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .with_context(|| format!("ContainerStatus {id}"))?
            .into_inner()
            .status
            .with_context(|| format!("ContainerStatus {id}: no status"))?;
        Ok((status.state(), status.exit_code))
    }

    /// ExecSync `cmd` in container `id`, bounded by `timeout` (whole seconds, at least 1).
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let out = self
            .runtime
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs().max(1) as i64,
            })
            .await
            .with_context(|| format!("ExecSync {cmd:?} in {id}"))?
            .into_inner();
        Ok(ExecOutput {
            exit_code: out.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// StopContainer: SIGTERM, SIGKILL after `grace`.
    pub async fn stop_container(&mut self, id: &str, grace: Duration) -> Result<()> {
        self.runtime
            .stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: grace.as_secs() as i64,
            })
            .await
            .with_context(|| format!("StopContainer {id}"))?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<()> {
        self.runtime
            .remove_container(RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .with_context(|| format!("RemoveContainer {id}"))?;
        Ok(())
    }

    /// StopPodSandbox + RemovePodSandbox.
    pub async fn stop_and_remove_pod(&mut self, pod_id: &str) -> Result<()> {
        self.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await
            .with_context(|| format!("StopPodSandbox {pod_id}"))?;
        self.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await
            .with_context(|| format!("RemovePodSandbox {pod_id}"))?;
        Ok(())
    }
}

/// Polls the CRI log file at `path` until a line carries `stream` ("stdout"/"stderr"),
/// the full-line tag `F` and exactly `text` (the kubelet's log format:
/// `<RFC3339 time> <stream> <F|P> <text>`); returns the file's content either way.
pub async fn wait_for_log_line(
    path: &Path,
    stream: &str,
    text: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let content = std::fs::read_to_string(path).unwrap_or_default();
        if has_log_line(&content, stream, text) {
            return Ok(content);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no `{stream} F {text}` line in the CRI log {} after {timeout:?}: {content:?}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether CRI log `content` holds a full `stream` line with exactly `text`.
pub fn has_log_line(content: &str, stream: &str, text: &str) -> bool {
    content.lines().any(|line| {
        let mut fields = line.splitn(4, ' ');
        let (_time, s, tag, rest) = (fields.next(), fields.next(), fields.next(), fields.next());
        s == Some(stream) && tag == Some("F") && rest == Some(text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_matched_by_stream_tag_and_text() {
        let log = "2026-12-02T05:00:00.1Z stdout F hello\n\
                   2026-12-02T05:00:00.2Z stderr P partial\n\
                   2026-12-02T05:00:00.3Z stderr F oops\n";
        assert!(has_log_line(log, "stdout", "hello"));
        assert!(has_log_line(log, "stderr", "oops"));
        assert!(!has_log_line(log, "stderr", "hello"));
        assert!(!has_log_line(log, "stderr", "partial"));
        assert!(!has_log_line(log, "stdout", "hell"));
    }

    #[test]
    fn the_netns_is_read_from_containerds_sandbox_info() {
        let info = r#"{"pid":42,"runtimeSpec":{"linux":{"namespaces":[
            {"type":"pid"},{"type":"ipc"},{"type":"uts"},
            {"type":"network","path":"/var/run/netns/cni-1234"}]}},
            "cniResult":{"Interfaces":{}}}"#;
        assert_eq!(
            netns_of_sandbox_info(info),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        // A host-network pod has no network namespace entry; an empty path is none either.
        let host = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"}]}}}"#;
        assert_eq!(netns_of_sandbox_info(host), None);
        let empty = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"network","path":""}]}}}"#;
        assert_eq!(netns_of_sandbox_info(empty), None);
        assert_eq!(netns_of_sandbox_info("not json"), None);
    }

    #[test]
    fn cni_pods_ask_for_a_pod_namespace_and_a_hostname() {
        let pod = PodSpec {
            name: "p",
            uid: "u",
            log_directory: Path::new("/tmp/logs"),
            network: PodNetwork::Cni,
            dns: None,
        };
        let config = pod.config();
        let ns = config
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .expect("namespace options");
        assert_eq!(ns.network, NamespaceMode::Pod as i32);
        assert_eq!(config.hostname, "p");
    }

    #[test]
    fn host_network_pods_ask_for_the_node_namespace() {
        let dir = Path::new("/tmp/logs");
        let pod = PodSpec {
            name: "p",
            uid: "u",
            log_directory: dir,
            network: PodNetwork::Host,
            dns: None,
        };
        let ns = pod.config().linux.unwrap().security_context.unwrap();
        let ns = ns.namespace_options.unwrap();
        assert_eq!(ns.network, NamespaceMode::Node as i32);
        assert_eq!(ns.pid, NamespaceMode::Container as i32);
        assert_eq!(
            pod.config().hostname,
            "",
            "no hostname without a UTS namespace"
        );
        let c = pod.container("c", "img", &["/bin/true"], "c.log");
        assert_eq!(c.command, vec!["/bin/true".to_string()]);
        assert_eq!(c.log_path, "c.log");
    }
}
