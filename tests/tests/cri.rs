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
    ContainerState, LinuxContainerResources, UpdateContainerResourcesRequest, VersionRequest,
};
use palisade_tests::{
    containerd::{Containerd, CriConfig, Options, PALISADE_NATIVE_HANDLER},
    cri::{wait_for_log_line, CriClient, PodNetwork, PodSpec},
    image::ImageConfig,
};

const PAUSE_IMAGE: &str = "docker.io/palisade/pause:latest";

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

    let mut cri = CriClient::connect(&ctrd.socket())
        .await
        .expect("connect to containerd's CRI socket");

    let version = cri
        .runtime
        .version(VersionRequest::default())
        .await
        .expect("CRI Version")
        .into_inner();
    assert_eq!(version.runtime_name, "containerd");
    assert!(
        cri.has_image(common::IMAGE).await.unwrap(),
        "busybox image not visible to CRI"
    );

    let logs = tempfile::tempdir().unwrap();
    let pod_spec = PodSpec {
        name: "palisade-pod",
        uid: "0b5f0c8e-palisade-pod",
        log_directory: logs.path(),
        network: PodNetwork::Cni,
        dns: None,
    };
    let pod = cri
        .run_pod(&pod_spec, PALISADE_NATIVE_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctrd.log_tail(40)));

    let container = cri
        .start_container(
            &pod,
            &pod_spec,
            pod_spec.container(
                "app",
                common::IMAGE,
                &[
                    "/bin/sh",
                    "-c",
                    "echo hello-cri; trap 'exit 0' TERM; while :; do sleep 1; done",
                ],
                "app.log",
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctrd.log_tail(40)));

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

    let (state, _) = cri.container_state(&container).await.unwrap();
    assert_eq!(state, ContainerState::ContainerRunning);

    let exec = cri
        .exec_sync(
            &container,
            &["/bin/sh", "-c", "echo exec-ok; hostname"],
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctrd.log_tail(40)));
    assert_eq!(exec.exit_code, 0, "{}", exec.stderr);
    assert_eq!(exec.stdout, "exec-ok\npalisade-pod\n");
    let failing = cri
        .exec_sync(
            &container,
            &["/bin/sh", "-c", "exit 4"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(failing.exit_code, 4);

    // UpdateContainerResources reaches the shim's Update: the limit lands in the cgroup.
    cri.runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: container.clone(),
            linux: Some(LinuxContainerResources {
                memory_limit_in_bytes: 96 * 1024 * 1024,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", ctrd.log_tail(40)));
    let limit = cri
        .exec_sync(
            &container,
            &[
                "/bin/sh",
                "-c",
                "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        limit.stdout.trim(),
        (96 * 1024 * 1024).to_string(),
        "{}",
        limit.stderr
    );

    // Container logs, in the CRI log format the kubelet reads.
    wait_for_log_line(
        &logs.path().join("app.log"),
        "stdout",
        "hello-cri",
        common::TIMEOUT,
    )
    .await
    .unwrap();

    cri.stop_container(&container, Duration::from_secs(5))
        .await
        .unwrap();
    let (state, exit_code) = cri.container_state(&container).await.unwrap();
    assert_eq!(state, ContainerState::ContainerExited);
    assert_eq!(exit_code, 0, "the TERM trap exits 0");
    cri.remove_container(&container).await.unwrap();
    cri.stop_and_remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctrd.log_tail(40)));

    // The pod's shim exits with its last container.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !ctrd.shim_pids().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ctrd.shim_pids().is_empty(), "shim outlived the pod");
}
