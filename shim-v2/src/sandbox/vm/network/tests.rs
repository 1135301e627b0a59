use std::{
    io::{Read, Write},
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::json;

use super::*;

#[test]
fn the_spec_names_the_netns_and_the_guest_spec_drops_it() {
    let mut spec = json!({
        "linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "mount"}
        ]}
    });
    assert_eq!(
        netns_of_spec(&spec),
        Some(PathBuf::from("/var/run/netns/cni-1234"))
    );
    guest_network_namespace(&mut spec);
    let types: Vec<&str> = spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["pid", "mount"]);

    // A new (pathless) network namespace stays: the container asked for no network.
    let mut isolated = json!({"linux": {"namespaces": [{"type": "network"}]}});
    assert_eq!(netns_of_spec(&isolated), None);
    guest_network_namespace(&mut isolated);
    assert_eq!(isolated["linux"]["namespaces"].as_array().unwrap().len(), 1);
    assert_eq!(netns_of_spec(&json!({"process": {}})), None);
}

#[test]
fn vmm_args_and_agent_requests_carry_the_veth() {
    let network = PodNetwork {
        netns: "/var/run/netns/x".into(),
        netns_id: (0, 0),
        netns_file: None,
        mirrors: vec![Mirror {
            interface: NetnsInterface {
                name: "eth0".into(),
                index: 2,
                mac: [0x02, 0x42, 0x0a, 0x58, 0, 5],
                mtu: 1450,
                addresses: vec![("10.88.0.5".parse().unwrap(), 16)],
            },
            tap: "tap0_palisade".into(),
        }],
        routes: vec![NetnsRoute {
            destination: None,
            gateway: Some("10.88.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
            scope: RouteScope::Universe,
        }],
    };
    assert_eq!(
        network.vmm_args(),
        ["--net", "tap=tap0_palisade,mac=02:42:0a:58:00:05,mtu=1450"]
    );
    let (interfaces, routes) = network.agent_requests();
    let interface = interfaces[0].interface.clone().unwrap();
    assert_eq!(
        (
            interface.name.as_str(),
            interface.mac.as_str(),
            interface.mtu
        ),
        ("eth0", "02:42:0a:58:00:05", 1450)
    );
    assert_eq!(interface.addresses[0].address, "10.88.0.5");
    assert_eq!(interface.addresses[0].prefix_len, 16);
    assert_eq!(routes.routes[0].destination, "");
    assert_eq!(routes.routes[0].gateway, "10.88.0.1");
    assert_eq!(routes.routes[0].device, "eth0");
}

/// Two named network namespaces (`ip netns add`), removed on drop: `pod` with the
/// container end of a veth pair addressed as CNI's bridge plugin would, `peer` with the
/// other end (the bridge side).
struct Namespaces {
    pod: String,
    peer: String,
}

const POD_MAC: &str = "02:42:0a:fa:00:05";

fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Namespaces {
    fn new(tag: &str) -> Self {
        let ns = Self {
            pod: format!("palisade-pod-{tag}-{}", std::process::id()),
            peer: format!("palisade-peer-{tag}-{}", std::process::id()),
        };
        let (pod, peer) = (&ns.pod, &ns.peer);
        sh(&format!(
            "set -e
             ip netns add {pod}; ip netns add {peer}
             ip -n {pod} link add eth0 address {POD_MAC} mtu 1400 type veth peer name host0 netns {peer}
             ip -n {pod} addr add 10.250.0.5/24 dev eth0
             ip -n {pod} link set eth0 up; ip -n {pod} link set lo up
             ip -n {pod} route add default via 10.250.0.1
             ip -n {pod} route add 198.51.100.0/24 via 10.250.0.1 src 10.250.0.5
             ip -n {peer} link set host0 mtu 1400 up
             ip -n {peer} addr add 10.250.0.1/24 dev host0"
        ));
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.pod)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Opens the tap in the pod namespace (a second queue-less attach, as the VMM does) and
/// runs `f` with it in that thread.
fn with_tap<T: Send + 'static>(
    netns: &Path,
    tap: &str,
    f: impl FnOnce(File) -> T + Send + 'static,
) -> T {
    let file = File::open(netns).unwrap();
    let tap = tap.to_owned();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: zeroed ifreq is valid; TUNSETIFF reads/writes it.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(tap.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: see above.
        assert!(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } >= 0);
        f(tun)
    })
    .join()
    .unwrap()
}

/// Reads frames from `tap` until one satisfies `want` (2 s at most).
fn read_frame_until(tap: &mut File, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    // SAFETY: fcntl on our own fd.
    unsafe {
        let flags = libc::fcntl(tap.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        match tap.read(&mut buf) {
            Ok(n) if want(&buf[..n]) => return Some(buf[..n].to_vec()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
    None
}

/// An ARP request from the pod's MAC/IP for `target`.
fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mac = [0x02, 0x42, 0x0a, 0xfa, 0x00, 0x05];
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[10, 250, 0, 5]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

/// Root + iproute2: the pod netns is read as CNI left it, a tap is created with tc
/// mirroring both ways, frames really cross in both directions, and teardown (and the dead
/// shim's cleanup from the bundle record) remove every trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veth_is_mirrored_to_a_tap_and_torn_down() {
    let ns = Namespaces::new("m");
    let network = PodNetwork::setup_async(ns.path()).await.expect("setup");
    assert_eq!(network.mirrors.len(), 1, "{network:?}");
    let m = &network.mirrors[0];
    assert_eq!(m.tap, "tap0_palisade");
    assert_eq!(m.interface.name, "eth0");
    assert_eq!(format_mac(&m.interface.mac), POD_MAC);
    assert_eq!(m.interface.mtu, 1400);
    assert_eq!(m.interface.addresses, [("10.250.0.5".parse().unwrap(), 24)]);
    assert!(
        network.routes.iter().any(|r| r.destination.is_none()
            && r.gateway == Some("10.250.0.1".parse().unwrap())
            && r.device == "eth0"),
        "{:?}",
        network.routes
    );
    assert!(
        network.routes.iter().any(
            |r| r.destination == Some(("198.51.100.0".parse().unwrap(), 24))
                && r.source == Some("10.250.0.5".parse().unwrap())
        ),
        "{:?}",
        network.routes
    );
    // The kernel's own route for the address is not copied.
    assert!(!network
        .routes
        .iter()
        .any(|r| r.destination == Some(("10.250.0.0".parse().unwrap(), 24))));

    let pod = &ns.pod;
    let veth_filters = sh(&format!("tc -n {pod} filter show dev eth0 ingress"));
    assert!(
        veth_filters.contains("protocol all")
            && veth_filters.contains("mirred (Egress Redirect to device tap0_palisade)"),
        "{veth_filters}"
    );
    let tap_filters = sh(&format!(
        "tc -n {pod} filter show dev tap0_palisade ingress"
    ));
    assert!(
        tap_filters.contains("mirred (Egress Redirect to device eth0)"),
        "{tap_filters}"
    );
    let tap_link = sh(&format!("ip -n {pod} -o link show tap0_palisade"));
    assert!(
        tap_link.contains("mtu 1400") && tap_link.contains("UP"),
        "{tap_link}"
    );

    // veth -> tap: the peer's ARP for the pod's address arrives on the tap.
    let peer = ns.peer.clone();
    let arp = with_tap(&ns.path(), "tap0_palisade", move |mut tap| {
        // busybox (busybox-static, which the tests install) rather than iputils. No one
        // answers behind the tap (no VM here): the ping itself fails.
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &peer, "busybox", "ping", "-c", "2", "-W", "1",
            ])
            .arg("10.250.0.5")
            .output()
            .expect("ip netns exec busybox ping");
        let arp = read_frame_until(&mut tap, |f| {
            f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[38..42] == [10, 250, 0, 5]
        });
        // tap -> veth: an ARP request from the pod's address reaches the peer, which
        // learns the pod's MAC.
        tap.write_all(&arp_request([10, 250, 0, 1])).unwrap();
        arp
    });
    assert!(arp.is_some(), "no ARP request for 10.250.0.5 on the tap");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let neigh = sh(&format!("ip -n {} neigh show 10.250.0.5", ns.peer));
        if neigh.contains(POD_MAC) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "peer never learned the pod MAC: {neigh:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Teardown: tap and ingress qdiscs gone, the veth untouched.
    let bundle = tempfile::tempdir().unwrap();
    network.write_record(bundle.path()).unwrap();
    network.teardown_async(bundle.path()).await;
    assert!(!bundle.path().join(RECORD_FILE).exists());
    let links = sh(&format!("ip -n {pod} -o link show"));
    assert!(
        !links.contains("tap0_palisade") && links.contains("eth0"),
        "{links}"
    );
    let qdiscs = sh(&format!("tc -n {pod} qdisc show dev eth0"));
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    // Twice is harmless.
    network.teardown_async(bundle.path()).await;

    // A shim killed with the network set up: `shim delete` undoes it from the record.
    let again = PodNetwork::setup_async(ns.path())
        .await
        .expect("setup again");
    again.write_record(bundle.path()).unwrap();
    drop(again);
    assert!(sh(&format!("ip -n {pod} -o link show")).contains("tap0_palisade"));
    let dir = bundle.path().to_owned();
    tokio::task::spawn_blocking(move || cleanup_after_dead_shim(&dir))
        .await
        .unwrap();
    assert!(!sh(&format!("ip -n {pod} -o link show")).contains("tap0_palisade"));
    assert!(!sh(&format!("tc -n {pod} qdisc show dev eth0")).contains("ingress"));
    assert!(!bundle.path().join(RECORD_FILE).exists());

    // Setting up over leftovers of a killed shim (tap and qdiscs still there) works.
    let first = PodNetwork::setup_async(ns.path()).await.unwrap();
    let second = PodNetwork::setup_async(ns.path())
        .await
        .expect("setup over leftovers");
    let filters = sh(&format!("tc -n {pod} filter show dev eth0 ingress"));
    assert_eq!(filters.matches("mirred").count(), 1, "{filters}");
    second.teardown_async(bundle.path()).await;
    drop(first);
}

#[tokio::test]
async fn a_path_that_is_no_netns_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let not_ns = dir.path().join("not-a-netns");
    std::fs::write(&not_ns, b"").unwrap();
    let err = PodNetwork::setup_async(not_ns.clone()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&not_ns.display().to_string()) && msg.contains("setns"),
        "{msg}"
    );
    let err = PodNetwork::setup_async(dir.path().join("missing"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
