//! The Kubernetes path (issue 3, must-show 2): containerd's CRI plugin with a runtime
//! handler `palisade-native` -> `io.containerd.palisade.v2`, driven by a CRI client (the
//! `k8s-cri` protos over tonic on containerd's unix socket) the way the kubelet does for
//! a pod whose RuntimeClass names that handler.
//!
//! Needs root, containerd, Debian's containernetworking-plugins (/usr/lib/cni: bridge,
//! host-local, loopback) and the built shim (see shim_ctr.rs for the engine choice).

mod common;

use std::{path::PathBuf, time::Duration};

use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest,
    LinuxContainerResources, PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest, UpdateContainerResourcesRequest, VersionRequest,
};
use palisade_tests::{
    containerd::{Containerd, CriConfig, Options, PALISADE_NATIVE_HANDLER},
    image::ImageConfig,
};
use tonic::transport::{Channel, Endpoint, Uri};

const PAUSE_IMAGE: &str = "docker.io/palisade/pause:latest";

async fn connect(socket: PathBuf) -> Channel {
    // The URI is required by tonic but unused: the connector dials the unix socket.
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect to containerd's CRI socket")
}

/// The `[native]` section of the shim config under test: the in-process
/// `palisade-runtime` library by default, or with `$PALISADE_TEST_RUNTIME_BINARY` set
/// (e.g. to runc or the `palisade` CLI) the `cli` engine driving that binary.
fn native_config() -> String {
    match std::env::var_os("PALISADE_TEST_RUNTIME_BINARY") {
        Some(binary) => {
            let binary = PathBuf::from(binary);
            assert!(binary.exists(), "{} does not exist", binary.display());
            format!(
                "[native]\nengine = \"cli\"\nruntime_binary = \"{}\"\nruntime_root = \"/run/palisade-test\"\n",
                binary.display()
            )
        }
        None => "[native]\nengine = \"library\"\nruntime_root = \"/run/palisade-test\"\n".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_through_cri() {
    common::require_ctr();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("configuration.toml");
    std::fs::write(&config, native_config()).unwrap();
    let ctrd = Containerd::start_with(Options {
        cri: Some(CriConfig {
            sandbox_image: PAUSE_IMAGE.into(),
            ..Default::default()
        }),
        env: vec![("PALISADE_CONFIG".into(), config.display().to_string())],
    })
    .expect("start containerd with CRI");
    ctrd.import_busybox_for_cri(PAUSE_IMAGE, &ImageConfig::pause())
        .unwrap();
    ctrd.import_busybox_for_cri(common::IMAGE, &ImageConfig::default())
        .unwrap();

    let channel = connect(ctrd.socket()).await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);

    let version = rt
        .version(VersionRequest::default())
        .await
        .expect("CRI Version")
        .into_inner();
    assert_eq!(version.runtime_name, "containerd");
    let status = images
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: common::IMAGE.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_some(), "busybox image not visible to CRI");

    let logs = tempfile::tempdir().unwrap();
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "palisade-pod".into(),
            uid: "0b5f0c8e-palisade-pod".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "palisade-pod".into(),
        log_directory: logs.path().display().to_string(),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: PALISADE_NATIVE_HANDLER.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctrd.log_tail(40)))
        .into_inner()
        .pod_sandbox_id;

    let container = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: common::IMAGE.into(),
                    ..Default::default()
                }),
                command: vec!["/bin/sh".into()],
                args: vec![
                    "-c".into(),
                    "echo hello-cri; trap 'exit 0' TERM; while :; do sleep 1; done".into(),
                ],
                log_path: "app.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctrd.log_tail(40)))
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: container.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", ctrd.log_tail(40)));

    // Both the pod's sandbox and its container are served by one palisade shim.
    let shims: Vec<i32> = ctrd
        .shim_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .contains("containerd-shim-palisade-v2")
        })
        .collect();
    assert_eq!(
        shims.len(),
        1,
        "expected one palisade shim for the pod: {shims:?}"
    );

    let status = rt
        .container_status(ContainerStatusRequest {
            container_id: container.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .expect("container status");
    assert_eq!(status.state(), ContainerState::ContainerRunning);

    let exec = rt
        .exec_sync(ExecSyncRequest {
            container_id: container.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo exec-ok; hostname".into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", ctrd.log_tail(40)))
        .into_inner();
    assert_eq!(
        exec.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout),
        "exec-ok\npalisade-pod\n"
    );
    let failing = rt
        .exec_sync(ExecSyncRequest {
            container_id: container.clone(),
            cmd: vec!["/bin/sh".into(), "-c".into(), "exit 4".into()],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failing.exit_code, 4);

    // UpdateContainerResources reaches the shim's Update: the limit lands in the cgroup.
    rt.update_container_resources(UpdateContainerResourcesRequest {
        container_id: container.clone(),
        linux: Some(LinuxContainerResources {
            memory_limit_in_bytes: 96 * 1024 * 1024,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", ctrd.log_tail(40)));
    let limit = rt
        .exec_sync(ExecSyncRequest {
            container_id: container.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max".into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        String::from_utf8_lossy(&limit.stdout).trim(),
        (96 * 1024 * 1024).to_string(),
        "{}",
        String::from_utf8_lossy(&limit.stderr)
    );

    // Container logs, in the CRI log format the kubelet reads.
    let log_file = logs.path().join("app.log");
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let log = loop {
        let text = std::fs::read_to_string(&log_file).unwrap_or_default();
        if text.contains("hello-cri") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        log.lines().any(|l| l.contains(" stdout F hello-cri")),
        "CRI log {}: {log:?}",
        log_file.display()
    );

    rt.stop_container(StopContainerRequest {
        container_id: container.clone(),
        timeout: 5,
    })
    .await
    .unwrap();
    let status = rt
        .container_status(ContainerStatusRequest {
            container_id: container.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state(), ContainerState::ContainerExited);
    assert_eq!(status.exit_code, 0, "the TERM trap exits 0");
    rt.remove_container(RemoveContainerRequest {
        container_id: container,
    })
    .await
    .unwrap();
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctrd.log_tail(40)));
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();

    // The pod's shim exits with its last container.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !ctrd.shim_pids().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ctrd.shim_pids().is_empty(), "shim outlived the pod");
}
