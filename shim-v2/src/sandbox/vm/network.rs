//! Pod networking in VM mode, Kata's default model ("tc mirroring"): CNI (or the user)
//! put a veth into the pod's network namespace; the guest has a virtio-net NIC whose host
//! side is a tap in that same namespace. Per interface:
//!
//! ```text
//!   veth ingress --(u32 match all, mirred egress redirect)--> tap  --> VMM --> guest eth0
//!   tap  ingress --(u32 match all, mirred egress redirect)--> veth --> the pod's network
//! ```
//!
//! The guest NIC gets the veth's MAC (VMM `--net tap=..,mac=..,mtu=..`) and the agent gives
//! it the veth's MTU and addresses and the namespace's routes (UpdateInterface,
//! UpdateRoutes), so the guest *is* the pod on the network.
//!
//! Everything here runs in a thread that entered the pod's netns (`setns`): netlink sockets
//! and `/dev/net/tun` act in the network namespace of the thread that opens them.
//!
//! Ownership: [`PodNetwork::teardown_async`] removes the taps (which takes their qdiscs) and the
//! ingress qdiscs it added to the veths (which takes the filters); the shim calls it when the
//! VM goes (also when the VMM died). A record in the bundle lets `shim delete` do the same
//! after a shim that was killed; and when the namespace itself is removed (CNI DEL / the
//! netns owner), the kernel removes the taps and qdiscs with it.

use std::{
    fs::File,
    future::Future,
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use futures_util::TryStreamExt;
use palisade_agent_protocol::{
    agent::{IPAddress, Interface, Route, UpdateInterfaceRequest, UpdateRoutesRequest},
    agent_ttrpc::AgentClient,
};
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressScope},
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        tc::TcHandle,
    },
    Handle, LinkUnspec, RouteMessageBuilder,
};
use tracing::{info, warn};

/// Written into the bundle: what `shim delete` needs to undo the setup of a dead shim.
pub const RECORD_FILE: &str = "palisade-net";
/// The most interfaces one pod may bring (one virtio-net device each).
const MAX_INTERFACES: usize = 8;
/// Suffix of the taps this shim creates (`tap0_palisade`, ...): at most 15 bytes in all.
const TAP_SUFFIX: &str = "_palisade";
/// Ingress qdisc handle `ffff:` and the filters' parent.
const INGRESS_PARENT: u32 = 0xffff_0000;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {why}")]
    Netns { path: PathBuf, why: String },
    /// A step on one interface failed; `interface` names it (veth or tap).
    #[error("pod network, {interface}: {step}: {why}")]
    Step {
        interface: String,
        step: String,
        why: String,
    },
    #[error("pod network: {0}")]
    Other(String),
}

fn step(interface: &str, step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let (interface, step) = (interface.to_owned(), step.into());
    move |e| NetworkError::Step {
        interface,
        step,
        why: e.to_string(),
    }
}

/// The network namespace named in a bundle's config.json (`linux.namespaces[type=network]
/// .path`), if any: a pod whose network was set up by CNI or `ctr run --with-ns`.
pub fn netns_of_bundle(bundle: &Path) -> Result<Option<PathBuf>, NetworkError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path)
        .map_err(|e| NetworkError::Other(format!("reading {}: {e}", path.display())))?;
    let spec: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| NetworkError::Other(format!("parsing {}: {e}", path.display())))?;
    Ok(netns_of_spec(&spec))
}

fn netns_of_spec(spec: &serde_json::Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// One interface of the pod's netns, as read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsInterface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route of the pod's netns (main table) through one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsRoute {
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub scope: RouteScope,
}

/// A veth mirrored to a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub interface: NetnsInterface,
    pub tap: String,
}

/// The pod's network as mirrored into the VM.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    /// (device, inode) of the namespace: teardown only acts on this very namespace.
    netns_id: (u64, u64),
    /// Held until the VMM is started in the namespace ([`PodNetwork::netns_fd`]).
    netns_file: Option<File>,
    pub mirrors: Vec<Mirror>,
    pub routes: Vec<NetnsRoute>,
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn open_netns(path: &Path) -> Result<(File, (u64, u64)), NetworkError> {
    let netns_err = |why: String| NetworkError::Netns {
        path: path.to_owned(),
        why,
    };
    let file = File::open(path).map_err(|e| netns_err(format!("opening: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| netns_err(format!("stat: {e}")))?;
    // A network namespace file is on nsfs; anything else (a plain file) is refused by
    // setns below with EINVAL, which is named there.
    Ok((file, (meta.dev(), meta.ino())))
}

/// Runs `f` with a rtnetlink handle in a thread that entered the network namespace `netns`
/// (blocking; call it from a blocking context).
fn in_netns<T, F, Fut>(netns: &File, path: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let fd = netns.try_clone().map_err(|e| NetworkError::Netns {
        path: path.to_owned(),
        why: format!("dup: {e}"),
    })?;
    let path = path.to_owned();
    let thread = std::thread::Builder::new()
        .name("palisade-netns".into())
        .spawn(move || {
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetworkError::Netns {
                    path: path.clone(),
                    why: format!("entering it (setns): {e}"),
                }
            })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(|e| NetworkError::Other(format!("netlink runtime: {e}")))?;
            runtime.block_on(async move {
                let (connection, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| NetworkError::Other(format!("netlink socket: {e}")))?;
                let connection = tokio::spawn(connection);
                let result = f(handle).await;
                connection.abort();
                result
            })
        })
        .map_err(|e| NetworkError::Other(format!("spawning the netns thread: {e}")))?;
    thread
        .join()
        .map_err(|_| NetworkError::Other("the netns thread panicked".into()))?
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetworkError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetworkError::Other(format!("listing interfaces: {e}")))
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    Ok(links(handle)
        .await?
        .iter()
        .find(|l| link_name(l) == name)
        .map(|l| l.header.index))
}

/// The Ethernet interfaces worth mirroring: up, not loopback, not a tap (ours or anyone's).
async fn read_interfaces(handle: &Handle) -> Result<Vec<NetnsInterface>, NetworkError> {
    let mut out = Vec::new();
    for link in links(handle).await? {
        let flags = link.header.flags;
        if link.header.link_layer_type != LinkLayerType::Ether
            || flags.contains(LinkFlags::Loopback)
            || !flags.contains(LinkFlags::Up)
            || matches!(link_kind(&link), Some(InfoKind::Tun))
        {
            continue;
        }
        let name = link_name(&link);
        let Some(mac) = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
            _ => None,
        }) else {
            continue;
        };
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(1500);
        let addresses: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(step(&name, "listing addresses"))?
            .into_iter()
            .filter(|a| a.header.scope == AddressScope::Universe)
            .filter_map(|a| {
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                local.or(address).map(|ip| (ip, a.header.prefix_len))
            })
            .collect();
        out.push(NetnsInterface {
            name,
            index: link.header.index,
            mac,
            mtu,
            addresses,
        });
    }
    Ok(out)
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A route of the main table worth giving the guest: unicast, through a mirrored interface,
/// and not one the kernel derives from an address (the guest's kernel makes those itself).
fn netns_route(message: &RouteMessage, interfaces: &[NetnsInterface]) -> Option<NetnsRoute> {
    let header = &message.header;
    let table = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(header.table));
    if table != u32::from(rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN)
        || header.kind != RouteType::Unicast
        || header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut destination = None;
    let (mut gateway, mut source, mut oif) = (None, None, None);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => {
                destination = route_ip(a).map(|ip| (ip, header.destination_prefix_length))
            }
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::PrefSource(a) => source = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let device = interfaces
        .iter()
        .find(|i| Some(i.index) == oif)?
        .name
        .clone();
    // IPv6 link-local and multicast routes belong to the guest's own kernel.
    if let Some((IpAddr::V6(ip), _)) = destination {
        if ip.is_multicast() || (ip.segments()[0] & 0xffc0) == 0xfe80 {
            return None;
        }
    }
    Some(NetnsRoute {
        destination,
        gateway,
        device,
        source,
        scope: header.scope,
    })
}

async fn read_routes(
    handle: &Handle,
    interfaces: &[NetnsInterface],
) -> Result<Vec<NetnsRoute>, NetworkError> {
    let mut out = Vec::new();
    for request in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let routes: Vec<RouteMessage> =
            handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(|e| NetworkError::Other(format!("listing routes: {e}")))?;
        out.extend(routes.iter().filter_map(|r| netns_route(r, interfaces)));
    }
    Ok(out)
}

/// Creates a persistent tap named `name` in the calling thread's network namespace (the
/// VMM opens it by name later). No IFF_MULTI_QUEUE: a persistent tap is reopened only with
/// the same queue mode.
fn create_tap(name: &str) -> Result<(), NetworkError> {
    let fail = |what: &str, e: std::io::Error| NetworkError::Step {
        interface: name.to_owned(),
        step: format!("creating the tap ({what})"),
        why: e.to_string(),
    };
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| fail("opening /dev/net/tun", e))?;
    // SAFETY: an all-zero ifreq is a valid value of the plain C struct.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes `req`, a live ifreq; the fd is ours.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(fail("TUNSETIFF", std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(fail("TUNSETPERSIST", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether a netlink error is "no such object" (what removing something absent gives).
fn is_absent(e: &rtnetlink::Error) -> bool {
    if let rtnetlink::Error::NetlinkError(message) = e {
        let code = message.raw_code().abs();
        return code == libc::ENOENT || code == libc::EINVAL || code == libc::ENODEV;
    }
    false
}

/// Removes the ingress qdisc of `index` (with its filters) if it has one.
async fn remove_ingress(handle: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    let mut request = handle.qdisc().del(index as i32);
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = INGRESS_PARENT.into();
    match request.execute().await {
        Err(e) if !is_absent(&e) => Err(step(name, "removing the ingress qdisc")(e)),
        _ => Ok(()),
    }
}

/// Ingress qdisc on `from` + a filter redirecting every frame to `to`'s egress.
async fn redirect(
    handle: &Handle,
    (from, from_name): (u32, &str),
    (to, to_name): (u32, &str),
) -> Result<(), NetworkError> {
    handle
        .qdisc()
        .add(from as i32)
        .ingress()
        .execute()
        .await
        .map_err(step(from_name, "adding the ingress qdisc"))?;
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(INGRESS_PARENT)
        // ETH_P_ALL in network byte order, as tc(8) sends `protocol all`.
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)
        .map_err(step(
            from_name,
            format!("building the redirect to {to_name}"),
        ))?
        .execute()
        .await
        .map_err(step(
            from_name,
            format!("adding the mirred redirect to {to_name}"),
        ))
}

/// Removes what [`mirror`] set up for `mirror` (whatever of it exists).
async fn unmirror(handle: &Handle, mirror: &Mirror) -> Result<(), NetworkError> {
    if let Some(tap) = index_of(handle, &mirror.tap).await? {
        match handle.link().del(tap).execute().await {
            Err(e) if !is_absent(&e) => return Err(step(&mirror.tap, "removing the tap")(e)),
            _ => {}
        }
    }
    // The veth may be gone already (CNI DEL ran first).
    if index_of(handle, &mirror.interface.name).await? == Some(mirror.interface.index) {
        remove_ingress(handle, mirror.interface.index, &mirror.interface.name).await?;
    }
    Ok(())
}

async fn mirror(handle: &Handle, mirror: &Mirror) -> Result<(), NetworkError> {
    let veth = (mirror.interface.index, mirror.interface.name.as_str());
    // Leftovers of a shim that was killed in a namespace that lives on: start clean.
    unmirror(handle, mirror).await?;
    create_tap(&mirror.tap)?;
    let tap_index = index_of(handle, &mirror.tap)
        .await?
        .ok_or_else(|| NetworkError::Step {
            interface: mirror.tap.clone(),
            step: "finding the new tap".into(),
            why: "not listed by netlink".into(),
        })?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(mirror.interface.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(step(
            &mirror.tap,
            format!("setting MTU {} and up", mirror.interface.mtu),
        ))?;
    redirect(handle, veth, (tap_index, &mirror.tap)).await?;
    redirect(handle, (tap_index, &mirror.tap), veth).await
}

impl PodNetwork {
    /// Reads the interfaces and routes of the netns at `netns` and mirrors each interface
    /// to a new tap. On error nothing of it is left behind. Blocking.
    pub fn setup(netns: &Path) -> Result<Self, NetworkError> {
        let (file, netns_id) = open_netns(netns)?;
        let (mirrors, routes) = in_netns(&file, netns, |handle| async move {
            let interfaces = read_interfaces(&handle).await?;
            if interfaces.len() > MAX_INTERFACES {
                return Err(NetworkError::Other(format!(
                    "{} interfaces in the pod's network namespace, at most {MAX_INTERFACES}",
                    interfaces.len()
                )));
            }
            let routes = read_routes(&handle, &interfaces).await?;
            let mirrors: Vec<Mirror> = interfaces
                .into_iter()
                .enumerate()
                .map(|(i, interface)| Mirror {
                    interface,
                    tap: format!("tap{i}{TAP_SUFFIX}"),
                })
                .collect();
            for (done, m) in mirrors.iter().enumerate() {
                if let Err(e) = mirror(&handle, m).await {
                    for undo in &mirrors[..=done] {
                        if let Err(e) = unmirror(&handle, undo).await {
                            warn!("undoing the pod network setup: {e}");
                        }
                    }
                    return Err(e);
                }
            }
            Ok((mirrors, routes))
        })?;
        for m in &mirrors {
            info!(
                veth = %m.interface.name,
                tap = %m.tap,
                mac = %format_mac(&m.interface.mac),
                mtu = m.interface.mtu,
                "pod interface mirrored to a tap (tc mirred)"
            );
        }
        Ok(Self {
            netns: netns.to_owned(),
            netns_id,
            netns_file: Some(file),
            mirrors,
            routes,
        })
    }

    /// The fd of the pod's netns, for the VMM's `setns` before exec (None once released).
    pub fn netns_fd(&self) -> Option<RawFd> {
        self.netns_file.as_ref().map(|f| f.as_raw_fd())
    }

    /// Closes the namespace fd: the shim must not keep a removed namespace alive.
    pub fn release_netns(&mut self) {
        self.netns_file = None;
    }

    /// The VMM's `--net` arguments, one per mirrored interface.
    pub fn vmm_args(&self) -> Vec<String> {
        self.mirrors
            .iter()
            .flat_map(|m| {
                [
                    "--net".to_owned(),
                    format!(
                        "tap={},mac={},mtu={}",
                        m.tap,
                        format_mac(&m.interface.mac),
                        m.interface.mtu
                    ),
                ]
            })
            .collect()
    }

    /// The agent requests that give the guest the pod's interfaces and routes.
    pub fn agent_requests(&self) -> (Vec<UpdateInterfaceRequest>, UpdateRoutesRequest) {
        let interfaces = self
            .mirrors
            .iter()
            .map(|m| UpdateInterfaceRequest {
                interface: Some(Interface {
                    name: m.interface.name.clone(),
                    mac: format_mac(&m.interface.mac),
                    mtu: m.interface.mtu,
                    addresses: m
                        .interface
                        .addresses
                        .iter()
                        .map(|(ip, prefix)| IPAddress {
                            address: ip.to_string(),
                            prefix_len: u32::from(*prefix),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| Route {
                destination: r
                    .destination
                    .map(|(ip, prefix)| format!("{ip}/{prefix}"))
                    .unwrap_or_default(),
                gateway: r.gateway.map(|ip| ip.to_string()).unwrap_or_default(),
                device: r.device.clone(),
                source: r.source.map(|ip| ip.to_string()).unwrap_or_default(),
                scope: match r.scope {
                    RouteScope::Link => "link",
                    RouteScope::Host => "host",
                    _ => "universe",
                }
                .into(),
                ..Default::default()
            })
            .collect();
        (
            interfaces,
            UpdateRoutesRequest {
                routes,
                ..Default::default()
            },
        )
    }

    /// Gives the guest the pod's interfaces (matched by MAC) and routes through the agent;
    /// errors name the interface or the routes.
    pub async fn configure_guest(
        &self,
        agent: &AgentClient,
        timeout: std::time::Duration,
    ) -> Result<(), NetworkError> {
        let (interfaces, routes) = self.agent_requests();
        for request in &interfaces {
            let interface = request.interface.clone().unwrap_or_default();
            let configured = agent
                .update_interface(super::agent::deadline(timeout), request)
                .await
                .map_err(|e| NetworkError::Step {
                    interface: interface.name.clone(),
                    step: format!(
                        "configuring the guest NIC with MAC {} (UpdateInterface)",
                        interface.mac
                    ),
                    why: e.to_string(),
                })?;
            info!(
                guest_interface = %configured.name,
                mac = %configured.mac,
                mtu = configured.mtu,
                addresses = ?configured.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect::<Vec<_>>(),
                "guest interface configured"
            );
        }
        if !routes.routes.is_empty() {
            agent
                .update_routes(super::agent::deadline(timeout), &routes)
                .await
                .map_err(|e| NetworkError::Other(format!("guest routes (UpdateRoutes): {e}")))?;
        }
        Ok(())
    }

    /// [`PodNetwork::setup`] off the async runtime.
    pub async fn setup_async(netns: PathBuf) -> Result<Self, NetworkError> {
        tokio::task::spawn_blocking(move || Self::setup(&netns))
            .await
            .map_err(|e| NetworkError::Other(format!("setup task: {e}")))?
    }

    /// Removes the taps and the veths' ingress qdiscs, if the namespace still exists and is
    /// the one set up, and the bundle's record. Safe to call more than once.
    pub async fn teardown_async(&self, bundle: &Path) {
        let (netns, id, mirrors) = (self.netns.clone(), self.netns_id, self.mirrors.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || teardown(&netns, id, &mirrors)).await {
            warn!("pod network teardown task: {e}");
        }
        let _ = std::fs::remove_file(bundle.join(RECORD_FILE));
    }

    /// Records the setup in `bundle` for [`cleanup_after_dead_shim`].
    pub fn write_record(&self, bundle: &Path) -> Result<(), NetworkError> {
        let mut text = format!(
            "{}\n{} {}\n",
            self.netns.display(),
            self.netns_id.0,
            self.netns_id.1
        );
        for m in &self.mirrors {
            text.push_str(&format!(
                "{} {} {}\n",
                m.tap, m.interface.index, m.interface.name
            ));
        }
        let path = bundle.join(RECORD_FILE);
        std::fs::write(&path, text)
            .map_err(|e| NetworkError::Other(format!("writing {}: {e}", path.display())))
    }
}

fn teardown(netns: &Path, netns_id: (u64, u64), mirrors: &[Mirror]) {
    let Ok((file, id)) = open_netns(netns) else {
        // The namespace is gone, and with it the taps and qdiscs.
        return;
    };
    if id != netns_id {
        warn!(netns = %netns.display(), "the network namespace was replaced; nothing to undo in it");
        return;
    }
    let mirrors = mirrors.to_vec();
    let result = in_netns(&file, netns, |handle| async move {
        let mut first_error = None;
        for m in &mirrors {
            if let Err(e) = unmirror(&handle, m).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    });
    match result {
        Ok(()) => info!(netns = %netns.display(), "pod network mirroring removed"),
        Err(e) => warn!("removing the pod network mirroring: {e}"),
    }
}

/// What a killed shim left of the pod network (recorded in `bundle`): removes the taps and
/// qdiscs if the namespace still exists. Used by `shim delete`.
pub fn cleanup_after_dead_shim(bundle: &Path) {
    let record = bundle.join(RECORD_FILE);
    let Ok(text) = std::fs::read_to_string(&record) else {
        return;
    };
    let mut lines = text.lines();
    let (Some(netns), Some(id)) = (lines.next(), lines.next()) else {
        let _ = std::fs::remove_file(&record);
        return;
    };
    let id = id
        .split_once(' ')
        .and_then(|(d, i)| Some((d.parse().ok()?, i.parse().ok()?)));
    let mirrors: Vec<Mirror> = lines
        .filter_map(|line| {
            let mut words = line.splitn(3, ' ');
            let (tap, index, name) = (words.next()?, words.next()?, words.next()?);
            // Only ever our own taps.
            tap.ends_with(TAP_SUFFIX).then_some(())?;
            Some(Mirror {
                tap: tap.to_owned(),
                interface: NetnsInterface {
                    name: name.to_owned(),
                    index: index.parse().ok()?,
                    mac: [0; 6],
                    mtu: 0,
                    addresses: Vec::new(),
                },
            })
        })
        .collect();
    if let Some(id) = id {
        teardown(Path::new(netns), id, &mirrors);
    }
    let _ = std::fs::remove_file(record);
}

/// The spec's network namespace, rewritten for the guest: a path names a namespace on the
/// host, which the guest does not have; there the pod's network is the guest's own (its
/// eth0 carries the pod's addresses), so the container joins the guest's namespace.
pub fn guest_network_namespace(spec: &mut serde_json::Value) {
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(|n| n.as_array_mut())
    {
        namespaces.retain(|ns| {
            !(ns.get("type").and_then(|t| t.as_str()) == Some("network")
                && ns
                    .get("path")
                    .and_then(|p| p.as_str())
                    .is_some_and(|p| !p.is_empty()))
        });
    }
}

#[cfg(test)]
mod tests;
