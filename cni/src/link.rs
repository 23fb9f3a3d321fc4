//! Links, addresses and routes through rtnetlink: the bridge, the veth pair and the pod side.

use crate::ipam::IpNet;
use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
};
use std::net::IpAddr;
use std::os::fd::RawFd;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = LinkError> = std::result::Result<T, E>;

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let op = op.into();
    move |source| LinkError::Netlink { op, source }
}

/// The errno of a netlink error reply.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

impl LinkError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink { source, .. } => errno(source),
            _ => None,
        }
    }
}

/// A link by name, `None` when absent.
pub async fn get(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

/// Every link (for GC).
pub async fn list(h: &Handle) -> Result<Vec<LinkMessage>> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))
}

pub fn name_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| {
        if let LinkAttribute::IfName(n) = a {
            Some(n.as_str())
        } else {
            None
        }
    })
}

pub fn mtu_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| {
        if let LinkAttribute::Mtu(n) = a {
            Some(*n)
        } else {
            None
        }
    })
}

pub fn controller_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| {
        if let LinkAttribute::Controller(n) = a {
            Some(*n)
        } else {
            None
        }
    })
}

pub fn is_up(m: &LinkMessage) -> bool {
    m.header.flags.contains(LinkFlags::Up)
}

pub fn mac_of(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| {
            if let LinkAttribute::Address(b) = a {
                Some(format_mac(b))
            } else {
                None
            }
        })
        .unwrap_or_default()
}

pub fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn is_veth(m: &LinkMessage) -> bool {
    m.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    })
}

fn is_bridge(m: &LinkMessage) -> bool {
    bridge_info(m).is_some()
}

fn bridge_info(m: &LinkMessage) -> Option<&Vec<InfoBridge>> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| if let LinkInfo::Data(InfoData::Bridge(b)) = i { Some(b) } else { None }),
        _ => None,
    })
    .or_else(|| {
        m.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)))))
            .then_some(&EMPTY)
    })
}
static EMPTY: Vec<InfoBridge> = Vec::new();

/// Ensures the bridge exists, is up, has `nf_call_iptables` (ClusterIP between pods on one bridge)
/// and the requested promiscuity. Tolerates a concurrent creator.
/// `found` is the result of an earlier `get(name)`. A new bridge gets `mac` so its address does
/// not follow its ports as they come and go.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    found: Option<LinkMessage>,
    mtu: u32,
    promisc: bool,
    mac: [u8; 6],
) -> Result<LinkMessage> {
    let existing = match found {
        Some(m) => Some(m),
        None => {
            let msg = LinkBridge::new(name)
                .mtu(mtu)
                .address(mac.to_vec())
                .nf_call_iptables(true)
                .promiscuous(promisc)
                .build();
            match h.link().add(msg).execute().await {
                Ok(()) => None,
                Err(e) if errno(&e) == Some(libc::EEXIST) => None,
                Err(e) => return Err(nl(format!("create bridge {name}"))(e)),
            }
        }
    };
    let link = match existing {
        Some(m) => m,
        None => get(h, name)
            .await?
            .ok_or_else(|| LinkError::Invalid(format!("bridge {name} vanished after creation")))?,
    };
    let Some(info) = bridge_info(&link) else {
        return Err(LinkError::Invalid(format!(
            "{name} exists and is not a bridge"
        )));
    };
    let idx = link.header.index;
    if !info
        .iter()
        .any(|i| matches!(i, InfoBridge::NfCallIpTables(true)))
    {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name)
            .index(idx)
            .nf_call_iptables(true)
            .build();
        h.link()
            .change(msg)
            .execute()
            .await
            .map_err(nl(format!("set nf_call_iptables on {name}")))?;
    }
    let want_promisc = promisc && !link.header.flags.contains(LinkFlags::Promisc);
    if !is_up(&link) || want_promisc {
        let mut b = LinkUnspec::new_with_index(idx).up();
        if promisc {
            b = b.promiscuous(true);
        }
        h.link()
            .change(b.build())
            .execute()
            .await
            .map_err(nl(format!("set {name} up")))?;
    }
    Ok(link)
}

/// Adds an address to a link; an existing identical address is fine.
/// IPv6 addresses skip duplicate address detection: IPAM made them unique, and a tentative
/// address would keep the pod offline for seconds.
pub async fn ensure_addr(h: &Handle, index: u32, net: IpNet) -> Result<()> {
    let mut req = h.address().add(index, net.addr, net.prefix);
    if net.addr.is_ipv6() {
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(nl(format!("add address {net}"))(e)),
    }
}

/// Addresses on a link.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<IpNet>> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list addresses"))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(IpNet {
                    addr: *ip,
                    prefix: m.header.prefix_len,
                }),
                _ => None,
            })
        })
        .collect())
}

/// What the veth pair is made of.
pub struct VethSpec<'a> {
    pub host: &'a str,
    pub peer: &'a str,
    pub netns_fd: RawFd,
    pub mtu: u32,
    pub bridge_index: u32,
    pub host_mac: [u8; 6],
    pub peer_mac: [u8; 6],
}

/// Creates the pair in one request: the peer is born inside the pod netns with its final name,
/// and the host end is already enslaved to the bridge and up. (The peer cannot be brought up in
/// the same request: veth refuses to open before its pair is complete.)
pub async fn create_veth(h: &Handle, s: &VethSpec<'_>) -> Result<()> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(s.peer)
        .mtu(s.mtu)
        .address(s.peer_mac.to_vec())
        .setns_by_fd(s.netns_fd)
        .build();
    let msg = LinkMessageBuilder::<rtnetlink::LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(s.host)
        .mtu(s.mtu)
        .address(s.host_mac.to_vec())
        .controller(s.bridge_index)
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl(format!("create veth {} with peer {}", s.host, s.peer)))
}

/// Hairpin on a bridge port: a pod can reach itself through a Service.
pub async fn set_hairpin(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set_port(LinkBridgePort::new(index).hairpin(true).build())
        .execute()
        .await
        .map_err(nl("set hairpin"))
}

/// Deletes a link by name; false when it did not exist.
pub async fn del_by_name(h: &Handle, name: &str) -> Result<bool> {
    let Some(m) = get(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(m.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl(format!("delete link {name}"))(e)),
    }
}

pub async fn set_up(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("set link up"))
}

/// Adds a route through `dev`, via `gw` when given; an existing one is fine.
pub async fn add_route(h: &Handle, dst: IpNet, gw: Option<IpAddr>, dev: u32) -> Result<()> {
    let msg = match (dst.addr, gw) {
        (IpAddr::V4(d), g) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(d, dst.prefix)
                .output_interface(dev);
            if let Some(IpAddr::V4(g)) = g {
                b = b.gateway(g);
            }
            b.build()
        }
        (IpAddr::V6(d), g) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(d, dst.prefix)
                .output_interface(dev);
            if let Some(IpAddr::V6(g)) = g {
                b = b.gateway(g);
            }
            b.build()
        }
    };
    match h.route().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(nl(format!("add route {dst}"))(e)),
    }
}

/// Whether a link is a bridge (used to refuse enslaving to a non-bridge).
pub fn check_bridge(m: &LinkMessage) -> bool {
    is_bridge(m)
}
