//! Guest network configuration: UpdateInterface and UpdateRoutes. The shim reads the pod's
//! network namespace on the host and sends its interfaces and routes; everything in those
//! requests is validated here first (the host is trusted less than the code: a bad field is
//! an `INVALID_ARGUMENT` naming it), then applied through rtnetlink in the agent's network
//! namespace (the guest's).

use std::{net::IpAddr, str::FromStr};

use futures_util::TryStreamExt;
use palisade_agent_protocol::agent::{IPAddress, Interface, Route};
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressMessage, AddressScope},
        link::{LinkAttribute, LinkMessage},
        route::RouteScope,
        AddressFamily,
    },
    Handle, LinkUnspec, RouteMessageBuilder,
};

use crate::error::{AgentError, Result};

/// Upper bounds on what one request may carry.
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_ROUTES: usize = 128;
/// IFNAMSIZ - 1.
const MAX_IFNAME: usize = 15;
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;

/// Which guest interface a request configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Mac([u8; 6]),
    Name(String),
}

/// A validated UpdateInterface request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub selector: Selector,
    /// Rename the interface to this (only when selected by MAC).
    pub rename: Option<String>,
    pub mtu: Option<u32>,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
    pub source: Option<IpAddr>,
    pub scope: RouteScope,
    pub ipv6: bool,
}

pub fn parse_mac(field: &str, text: &str) -> Result<[u8; 6]> {
    let invalid = || {
        AgentError::invalid(
            field,
            format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
        )
    };
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != 2 {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    if mac[0] & 1 != 0 {
        return Err(AgentError::invalid(
            field,
            format!("{text:?} is a multicast MAC address"),
        ));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn validate_ifname(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok {
        return Err(AgentError::invalid(
            field,
            format!(
                "{name:?} is not an interface name (1-{MAX_IFNAME} printable bytes, no '/' or ':')"
            ),
        ));
    }
    Ok(())
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr> {
    IpAddr::from_str(text)
        .map_err(|_| AgentError::invalid(field, format!("{text:?} is not an IP address")))
}

fn check_prefix(field: &str, ip: &IpAddr, prefix: u32) -> Result<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(AgentError::invalid(
            field,
            format!("prefix length {prefix} is over {max} for {ip}"),
        ));
    }
    Ok(prefix as u8)
}

/// "10.0.0.0/8" → (10.0.0.0, 8).
fn parse_cidr(field: &str, text: &str) -> Result<(IpAddr, u8)> {
    let (ip, prefix) = text.split_once('/').ok_or_else(|| {
        AgentError::invalid(
            field,
            format!("{text:?} is not ADDRESS/PREFIX (e.g. 10.0.0.0/8)"),
        )
    })?;
    let ip = parse_ip(field, ip)?;
    let prefix: u32 = prefix
        .parse()
        .map_err(|_| AgentError::invalid(field, format!("{text:?}: bad prefix length")))?;
    Ok((ip, check_prefix(field, &ip, prefix)?))
}

fn usable_unicast(field: &str, ip: &IpAddr) -> Result<()> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(AgentError::invalid(
            field,
            format!("{ip} is not a usable unicast address"),
        ));
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return Err(AgentError::invalid(field, format!("{ip} is broadcast")));
        }
    }
    Ok(())
}

/// Validates an UpdateInterface request.
pub fn interface_config(interface: &Interface) -> Result<InterfaceConfig> {
    let selector = if !interface.mac.is_empty() {
        Selector::Mac(parse_mac("interface.mac", &interface.mac)?)
    } else if !interface.name.is_empty() {
        validate_ifname("interface.name", &interface.name)?;
        Selector::Name(interface.name.clone())
    } else {
        return Err(AgentError::invalid(
            "interface",
            "needs a mac or a name to select the guest interface",
        ));
    };
    let rename = match (&selector, interface.name.as_str()) {
        (Selector::Mac(_), name) if !name.is_empty() => {
            validate_ifname("interface.name", name)?;
            Some(name.to_owned())
        }
        _ => None,
    };
    let mtu = match interface.mtu {
        0 => None,
        mtu if (MIN_MTU..=MAX_MTU).contains(&mtu) => Some(mtu),
        mtu => {
            return Err(AgentError::invalid(
                "interface.mtu",
                format!("{mtu} is outside {MIN_MTU}..={MAX_MTU}"),
            ))
        }
    };
    if interface.addresses.len() > MAX_ADDRESSES {
        return Err(AgentError::invalid(
            "interface.addresses",
            format!(
                "{} addresses, at most {MAX_ADDRESSES}",
                interface.addresses.len()
            ),
        ));
    }
    let mut addresses = Vec::with_capacity(interface.addresses.len());
    for (i, address) in interface.addresses.iter().enumerate() {
        let field = format!("interface.addresses[{i}]");
        let ip = parse_ip(&field, &address.address)?;
        usable_unicast(&field, &ip)?;
        let prefix = check_prefix(&field, &ip, address.prefix_len)?;
        if addresses.iter().any(|(a, _)| *a == ip) {
            return Err(AgentError::invalid(field, format!("{ip} is listed twice")));
        }
        addresses.push((ip, prefix));
    }
    Ok(InterfaceConfig {
        selector,
        rename,
        mtu,
        addresses,
    })
}

/// Validates one route of an UpdateRoutes request (`i` names it in errors).
pub fn route_config(i: usize, route: &Route) -> Result<RouteConfig> {
    let field = |name: &str| format!("routes[{i}].{name}");
    let destination = if route.destination.is_empty() {
        None
    } else {
        Some(parse_cidr(&field("destination"), &route.destination)?)
    };
    let gateway = if route.gateway.is_empty() {
        None
    } else {
        let ip = parse_ip(&field("gateway"), &route.gateway)?;
        usable_unicast(&field("gateway"), &ip)?;
        Some(ip)
    };
    let source = if route.source.is_empty() {
        None
    } else {
        Some(parse_ip(&field("source"), &route.source)?)
    };
    let device = if route.device.is_empty() {
        None
    } else {
        validate_ifname(&field("device"), &route.device)?;
        Some(route.device.clone())
    };
    let scope = match route.scope.as_str() {
        "" | "universe" | "global" => RouteScope::Universe,
        "link" => RouteScope::Link,
        "host" => RouteScope::Host,
        other => {
            return Err(AgentError::invalid(
                field("scope"),
                format!("{other:?} is not universe, link or host"),
            ))
        }
    };
    // Every address of a route is of one family: the destination's, else the gateway's,
    // else IPv4 (a default route without a gateway).
    let ipv6 = destination
        .map(|(ip, _)| ip.is_ipv6())
        .or(gateway.map(|ip| ip.is_ipv6()))
        .unwrap_or(false);
    for (name, ip) in [("gateway", gateway), ("source", source)] {
        if let Some(ip) = ip {
            if ip.is_ipv6() != ipv6 {
                return Err(AgentError::invalid(
                    field(name),
                    format!(
                        "{ip} is not of the route's address family (IPv{})",
                        if ipv6 { 6 } else { 4 }
                    ),
                ));
            }
        }
    }
    if gateway.is_none() && device.is_none() {
        return Err(AgentError::invalid(
            format!("routes[{i}]"),
            "needs a gateway or a device",
        ));
    }
    Ok(RouteConfig {
        destination,
        gateway,
        device,
        source,
        scope,
        ipv6,
    })
}

/// Validates an UpdateRoutes request; the result is in the order to apply (routes without
/// a gateway first, otherwise as given).
pub fn routes_config(routes: &[Route]) -> Result<Vec<RouteConfig>> {
    if routes.len() > MAX_ROUTES {
        return Err(AgentError::invalid(
            "routes",
            format!("{} routes, at most {MAX_ROUTES}", routes.len()),
        ));
    }
    let mut out = routes
        .iter()
        .enumerate()
        .map(|(i, r)| route_config(i, r))
        .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|r| r.gateway.is_some());
    Ok(out)
}

/// A netlink failure while doing `what`.
fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AgentError {
    let context = what.into();
    move |e| AgentError::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

/// A rtnetlink connection in the calling thread's network namespace.
fn connect() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| AgentError::Io {
        context: "opening a netlink socket".into(),
        source,
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing interfaces"))
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(0)
}

fn address_ip(message: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
    // otherwise (they are equal on Ethernet).
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

async fn addresses(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing addresses"))
}

/// Applies an UpdateInterface request; returns the interface as it is afterwards.
pub async fn update_interface(config: &InterfaceConfig) -> Result<Interface> {
    let handle = connect()?;
    let all = links(&handle).await?;
    let link = all
        .iter()
        .find(|link| match &config.selector {
            Selector::Mac(mac) => link_mac(link) == Some(mac.as_slice()),
            Selector::Name(name) => link_name(link) == Some(name.as_str()),
        })
        .ok_or_else(|| {
            AgentError::NotFound(match &config.selector {
                Selector::Mac(mac) => format!("interface with MAC {}", format_mac(mac)),
                Selector::Name(name) => format!("interface {name:?}"),
            })
        })?;
    let index = link.header.index;
    let mut name = link_name(link).unwrap_or_default().to_owned();

    if let Some(new_name) = config.rename.as_ref().filter(|n| **n != name) {
        if all.iter().any(|l| link_name(l) == Some(new_name.as_str())) {
            return Err(AgentError::AlreadyExists(format!(
                "interface.name: a guest interface named {new_name:?}"
            )));
        }
        // The kernel renames only interfaces that are down.
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(netlink(format!("{name}: setting it down to rename it")))?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(new_name.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("{name}: renaming it to {new_name}")))?;
        name.clone_from(new_name);
    }
    if let Some(mtu) = config.mtu {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(netlink(format!("{name}: setting MTU {mtu}")))?;
    }
    // Replace the global addresses; link-local ones are the kernel's (derived from the MAC).
    for old in addresses(&handle, index).await? {
        if old.header.scope == AddressScope::Universe {
            let ip = address_ip(&old);
            handle
                .address()
                .del(old)
                .execute()
                .await
                .map_err(netlink(format!("{name}: removing address {ip:?}")))?;
        }
    }
    for (ip, prefix) in &config.addresses {
        handle
            .address()
            .add(index, *ip, *prefix)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("{name}: adding address {ip}/{prefix}")))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("{name}: setting it up")))?;

    // Read back what the guest has now.
    let link = links(&handle)
        .await?
        .into_iter()
        .find(|l| l.header.index == index)
        .ok_or_else(|| AgentError::NotFound(format!("interface {name:?} (vanished)")))?;
    let addresses = addresses(&handle, index)
        .await?
        .iter()
        .filter(|a| a.header.scope == AddressScope::Universe)
        .filter_map(|a| {
            address_ip(a).map(|ip| IPAddress {
                address: ip.to_string(),
                prefix_len: u32::from(a.header.prefix_len),
                ..Default::default()
            })
        })
        .collect();
    Ok(Interface {
        name: link_name(&link).unwrap_or_default().to_owned(),
        mac: link_mac(&link).map(format_mac).unwrap_or_default(),
        mtu: link_mtu(&link),
        addresses,
        ..Default::default()
    })
}

/// Applies validated routes in order (create, or replace a route to the same destination).
pub async fn update_routes(routes: &[RouteConfig]) -> Result<()> {
    if routes.is_empty() {
        return Ok(());
    }
    let handle = connect()?;
    let all = links(&handle).await?;
    for (i, route) in routes.iter().enumerate() {
        let mut builder = RouteMessageBuilder::<IpAddr>::new();
        let describe = describe_route(route);
        let field = format!("routes[{i}] ({describe})");
        let bad = |e: &dyn std::fmt::Display| AgentError::invalid(field.clone(), e.to_string());
        builder = match route.destination {
            Some((ip, prefix)) => builder
                .destination_prefix(ip, prefix)
                .map_err(|e| bad(&e))?,
            None => {
                builder.get_mut().header.address_family = if route.ipv6 {
                    AddressFamily::Inet6
                } else {
                    AddressFamily::Inet
                };
                builder
            }
        };
        if let Some(gateway) = route.gateway {
            builder = builder.gateway(gateway).map_err(|e| bad(&e))?;
        }
        if let Some(source) = route.source {
            builder = builder.pref_source(source).map_err(|e| bad(&e))?;
        }
        if let Some(device) = &route.device {
            let index = all
                .iter()
                .find(|l| link_name(l) == Some(device.as_str()))
                .map(|l| l.header.index)
                .ok_or_else(|| {
                    AgentError::NotFound(format!("interface {device:?} of route {describe}"))
                })?;
            builder = builder.output_interface(index);
        }
        let message = builder.scope(route.scope).build();
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("adding route {describe}")))?;
    }
    Ok(())
}

fn describe_route(route: &RouteConfig) -> String {
    let mut out = match route.destination {
        Some((ip, prefix)) => format!("{ip}/{prefix}"),
        None => "default".into(),
    };
    if let Some(gateway) = route.gateway {
        out.push_str(&format!(" via {gateway}"));
    }
    if let Some(device) = &route.device {
        out.push_str(&format!(" dev {device}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &str, mtu: u32, addrs: &[(&str, u32)]) -> Interface {
        Interface {
            name: name.into(),
            mac: mac.into(),
            mtu,
            addresses: addrs
                .iter()
                .map(|(a, p)| IPAddress {
                    address: (*a).into(),
                    prefix_len: *p,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn field_of(e: AgentError) -> String {
        match e {
            AgentError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other}"),
        }
    }

    #[test]
    fn interface_requests_are_validated() {
        let ok = interface_config(&iface(
            "eth0",
            "02:42:0a:58:00:05",
            1450,
            &[("10.88.0.5", 16), ("fd00::5", 64)],
        ))
        .unwrap();
        assert_eq!(
            ok.selector,
            Selector::Mac([0x02, 0x42, 0x0a, 0x58, 0x00, 0x05])
        );
        assert_eq!(ok.rename.as_deref(), Some("eth0"));
        assert_eq!(ok.mtu, Some(1450));
        assert_eq!(ok.addresses.len(), 2);
        let by_name = interface_config(&iface("eth1", "", 0, &[])).unwrap();
        assert_eq!(by_name.selector, Selector::Name("eth1".into()));
        assert_eq!(by_name.mtu, None);

        for (bad, field) in [
            (iface("", "", 0, &[]), "interface"),
            (iface("", "02:42:0a:58:00", 0, &[]), "interface.mac"),
            (iface("", "02:42:0a:58:00:05:06", 0, &[]), "interface.mac"),
            (iface("", "zz:42:0a:58:00:05", 0, &[]), "interface.mac"),
            (iface("", "01:00:5e:00:00:01", 0, &[]), "interface.mac"),
            (iface("a/b", "", 0, &[]), "interface.name"),
            (iface(&"x".repeat(16), "", 0, &[]), "interface.name"),
            (iface("eth0", "", 67, &[]), "interface.mtu"),
            (iface("eth0", "", 70000, &[]), "interface.mtu"),
            (
                iface("eth0", "", 0, &[("10.0.0.1", 33)]),
                "interface.addresses[0]",
            ),
            (
                iface("eth0", "", 0, &[("fd00::1", 64), ("fd00::2", 129)]),
                "interface.addresses[1]",
            ),
            (
                iface("eth0", "", 0, &[("10.0.0.300", 8)]),
                "interface.addresses[0]",
            ),
            (
                iface("eth0", "", 0, &[("224.0.0.1", 8)]),
                "interface.addresses[0]",
            ),
            (
                iface("eth0", "", 0, &[("10.0.0.1", 8), ("10.0.0.1", 16)]),
                "interface.addresses[1]",
            ),
        ] {
            let err = interface_config(&bad).unwrap_err();
            assert!(err.to_string().starts_with(field), "{err}");
            assert_eq!(field_of(err), field);
        }
        let many: Vec<(String, u32)> = (0..17).map(|i| (format!("10.0.0.{}", i + 1), 24)).collect();
        let many: Vec<(&str, u32)> = many.iter().map(|(a, p)| (a.as_str(), *p)).collect();
        assert_eq!(
            field_of(interface_config(&iface("eth0", "", 0, &many)).unwrap_err()),
            "interface.addresses"
        );
    }

    fn route(dest: &str, gw: &str, dev: &str, src: &str, scope: &str) -> Route {
        Route {
            destination: dest.into(),
            gateway: gw.into(),
            device: dev.into(),
            source: src.into(),
            scope: scope.into(),
            ..Default::default()
        }
    }

    #[test]
    fn routes_are_validated_and_ordered() {
        let routes = routes_config(&[
            route("", "10.88.0.1", "eth0", "", ""),
            route("10.88.0.0/16", "", "eth0", "10.88.0.5", "link"),
            route("fd00::/64", "", "eth0", "", "link"),
            route("", "fd00::1", "", "", ""),
        ])
        .unwrap();
        // Directly connected routes first.
        assert_eq!(
            routes[0].destination,
            Some(("10.88.0.0".parse().unwrap(), 16))
        );
        assert_eq!(routes[0].scope, RouteScope::Link);
        assert!(routes[1].ipv6 && routes[1].gateway.is_none());
        assert_eq!(routes[2].gateway, Some("10.88.0.1".parse().unwrap()));
        assert!(!routes[2].ipv6);
        assert!(routes[3].ipv6 && routes[3].destination.is_none());

        for (bad, field) in [
            (
                route("10.0.0.0", "", "eth0", "", ""),
                "routes[0].destination",
            ),
            (
                route("10.0.0.0/33", "", "eth0", "", ""),
                "routes[0].destination",
            ),
            (
                route("fd00::/129", "", "eth0", "", ""),
                "routes[0].destination",
            ),
            (route("", "nope", "eth0", "", ""), "routes[0].gateway"),
            (
                route("", "255.255.255.255", "eth0", "", ""),
                "routes[0].gateway",
            ),
            (
                route("10.0.0.0/8", "fd00::1", "", "", ""),
                "routes[0].gateway",
            ),
            (
                route("10.0.0.0/8", "", "eth0", "fd00::1", ""),
                "routes[0].source",
            ),
            (route("10.0.0.0/8", "", "eth/0", "", ""), "routes[0].device"),
            (
                route("10.0.0.0/8", "", "eth0", "", "site"),
                "routes[0].scope",
            ),
            (route("10.0.0.0/8", "", "", "", ""), "routes[0]"),
        ] {
            assert_eq!(field_of(routes_config(&[bad]).unwrap_err()), field);
        }
        let many = vec![route("", "10.0.0.1", "", "", ""); MAX_ROUTES + 1];
        assert_eq!(field_of(routes_config(&many).unwrap_err()), "routes");
    }

    #[test]
    fn mac_round_trips() {
        let mac = parse_mac("m", "02:AB:cd:00:01:ff").unwrap();
        assert_eq!(format_mac(&mac), "02:ab:cd:00:01:ff");
    }
}
