//! ADD: IPAM, then (while `nft` runs) bridge, veth pair, pod interface, addresses and routes.
//! Any failure after IPAM undoes what was done: veth, IP (and the masquerade table with the
//! network's last IP).

use super::{random_mac, Ctx, Ipam};
use crate::hostport;
use crate::ipam::{IpNet, Store};
use crate::link::{self, VethSpec};
use crate::masq;
use crate::ns;
use crate::types::{code, CniError, CniResult, Dns, Interface, IpConfig, Route};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// What IPAM handed out.
pub(super) struct Addressing {
    pub ips: Vec<(IpNet, Option<IpAddr>)>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

pub(super) async fn add(ctx: &Ctx) -> Result<CniResult, CniError> {
    let netns = ctx.open_netns()?;
    // The pod-side netlink socket is opened by a thread of its own; start it before IPAM.
    let pod_conn = netns
        .try_clone()
        .map(|f| ns::spawn_connect_in(f, tokio::runtime::Handle::current()))
        .map_err(|e| CniError::internal(format!("dup netns fd: {e}")))?;
    let addressing = ipam_add(ctx)?;
    let ips: Vec<IpAddr> = addressing.ips.iter().map(|(n, _)| n.addr).collect();
    // The network's masquerade rules: created by its first pod, running while netlink works.
    let pending = if ctx.conf.ip_masq
        && !ips.is_empty()
        && !masq::table_exists(&ctx.conf.name).unwrap_or(false)
    {
        let nets: Vec<IpNet> = addressing.ips.iter().map(|(n, _)| *n).collect();
        match masq::spawn(masq::render_add(&ctx.conf.name, &ctx.subnets(&nets))) {
            Ok(p) => Some(p),
            Err(e) => {
                undo(ctx).await;
                return Err(e.into());
            }
        }
    } else {
        None
    };
    // The pod's hostPorts, written while netlink works too.
    let ports = if ctx.port_mappings.is_empty() || ips.is_empty() {
        None
    } else {
        let script = hostport::render_add(
            &ctx.conf.name,
            &ctx.hostport_prefix(),
            &ctx.port_mappings,
            &ips,
        );
        match masq::spawn(script) {
            Ok(p) => Some(p),
            Err(e) => {
                if let Some(p) = pending {
                    let _ = p.wait();
                }
                undo(ctx).await;
                return Err(e.into());
            }
        }
    };
    let configured = configure(ctx, &netns, pod_conn, &addressing).await;
    let masq_done = pending.map(|p| p.wait()).transpose();
    let ports_done = ports.map(|p| p.wait()).transpose();
    let localnet = if configured.is_ok()
        && ports_done.is_ok()
        && ips.iter().any(|ip| ip.is_ipv4())
        && !ctx.port_mappings.is_empty()
    {
        hostport::enable_route_localnet(ctx.conf.bridge_name())
    } else {
        Ok(())
    };
    match (configured, masq_done.and(ports_done), localnet) {
        (Ok(r), Ok(_), Ok(())) => Ok(r),
        (Err(e), _, _) | (Ok(_), Ok(_), Err(e)) => {
            undo(ctx).await;
            Err(e)
        }
        (Ok(_), Err(e), _) => {
            undo(ctx).await;
            Err(e.into())
        }
    }
}

fn ipam_add(ctx: &Ctx) -> Result<Addressing, CniError> {
    match &ctx.ipam {
        Ipam::None => Ok(Addressing {
            ips: vec![],
            routes: vec![],
            dns: Dns::default(),
        }),
        Ipam::HostLocal { conf, sets, dir } => {
            let store = Store::open(dir, &ctx.conf.name)?;
            let allocs = store.allocate(sets, &ctx.env.container_id, &ctx.env.ifname)?;
            Ok(Addressing {
                ips: allocs
                    .into_iter()
                    .map(|a| (a.ip, Some(a.gateway)))
                    .collect(),
                routes: conf.routes.clone(),
                dns: conf.dns.clone().unwrap_or_default(),
            })
        }
        Ipam::Delegate { kind } => {
            let v = ctx.delegate("ADD")?.ok_or_else(|| {
                CniError::internal(format!("IPAM plugin {kind} returned no result"))
            })?;
            let r = CniResult::from_value(&v).map_err(|e| {
                CniError::new(
                    code::DECODE_FAILURE,
                    format!("cannot decode the result of IPAM plugin {kind}"),
                )
                .with_details(e)
            })?;
            let mut ips = Vec::new();
            for ip in &r.ips {
                let net = IpNet::parse(&ip.address).ok_or_else(|| {
                    CniError::internal(format!(
                        "IPAM plugin {kind} returned address {:?}",
                        ip.address
                    ))
                })?;
                ips.push((net, ip.gateway.as_deref().and_then(|g| g.parse().ok())));
            }
            Ok(Addressing {
                ips,
                routes: r.routes,
                dns: r.dns,
            })
        }
    }
}

/// Best-effort rollback after a failed ADD.
async fn undo(ctx: &Ctx) {
    if let Ok((conn, h, _)) = rtnetlink::new_connection() {
        tokio::spawn(conn);
        let _ = link::del_by_name(&h, &ctx.host_veth()).await;
    }
    let _ = super::del::remove_hostports(ctx);
    let _ = super::del::release(ctx);
}

type PodConn = std::thread::JoinHandle<
    std::io::Result<(
        rtnetlink::proto::Connection<rtnetlink::packet_route::RouteNetlinkMessage>,
        rtnetlink::Handle,
    )>,
>;

async fn configure(
    ctx: &Ctx,
    netns: &File,
    pod_conn: PodConn,
    a: &Addressing,
) -> Result<CniResult, CniError> {
    let conf = &ctx.conf;
    let (conn, h, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::internal(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    let (pconn, ph) = pod_conn
        .join()
        .map_err(|_| CniError::internal("the netns thread panicked"))?
        .map_err(|e| CniError::internal(format!("netlink socket in {}: {e}", ctx.env.netns)))?;
    tokio::spawn(pconn);

    // `lo` is always index 1 in a network namespace; bring it up meanwhile.
    let lo = tokio::spawn({
        let ph = ph.clone();
        async move { link::set_up(&ph, 1).await }
    });
    let (mtu, found) = tokio::join!(
        async {
            match conf.mtu {
                Some(m) => Ok(m),
                None => uplink_mtu(&h).await,
            }
        },
        link::get(&h, conf.bridge_name())
    );
    let (mtu, found) = (mtu?, found?);
    let bridge = link::ensure_bridge(
        &h,
        conf.bridge_name(),
        found,
        mtu,
        conf.promisc_mode,
        random_mac(),
    )
    .await?;
    let bidx = bridge.header.index;
    if conf.is_gateway {
        for (net, gw) in &a.ips {
            if let Some(gw) = gw {
                link::ensure_addr(
                    &h,
                    bidx,
                    IpNet {
                        addr: *gw,
                        prefix: net.prefix,
                    },
                )
                .await?;
            }
        }
    }
    if conf.is_gateway || conf.ip_masq {
        enable_forwarding(
            a.ips.iter().any(|(n, _)| n.addr.is_ipv4()),
            a.ips.iter().any(|(n, _)| n.addr.is_ipv6()),
        )?;
    }

    let host = ctx.host_veth();
    let (host_mac, peer_mac) = (random_mac(), random_mac());
    let spec = VethSpec {
        host: &host,
        peer: &ctx.env.ifname,
        netns_fd: netns.as_raw_fd(),
        mtu,
        bridge_index: bidx,
        host_mac,
        peer_mac,
    };
    if let Err(e) = link::create_veth(&h, &spec).await {
        if e.errno() != Some(libc::EEXIST) {
            return Err(e.into());
        }
        // Left by an earlier, interrupted ADD of this attachment: start over.
        link::del_by_name(&h, &host).await?;
        link::create_veth(&h, &spec)
            .await
            .map_err(|e| match e.errno() {
                Some(libc::EEXIST) => CniError::internal(format!(
                    "interface {} already exists in {}",
                    ctx.env.ifname, ctx.env.netns
                )),
                _ => e.into(),
            })?;
    }

    let mut routes = a.routes.clone();
    if conf.is_default_gateway {
        for (net, gw) in &a.ips {
            if let Some(gw) = gw {
                let dst = if net.addr.is_ipv4() {
                    "0.0.0.0/0"
                } else {
                    "::/0"
                };
                routes.push(Route {
                    dst: dst.into(),
                    gw: Some(gw.to_string()),
                });
            }
        }
    }
    let host_side =
        async {
            if conf.hairpin_mode {
                let msg = rtnetlink::LinkBridgePort::new(0)
                    .name(host.clone())
                    .hairpin(true)
                    .build();
                h.link().set_port(msg).execute().await.map_err(|e| {
                    CniError::internal(format!("netlink: set hairpin on {host}: {e}"))
                })?;
            }
            Ok::<_, CniError>(())
        };
    let pod_side = configure_pod(&ph, &ctx.env.ifname, a, &routes);
    let (hs, ps) = tokio::join!(host_side, pod_side);
    hs?;
    ps?;
    lo.await
        .map_err(|e| CniError::internal(format!("bringing lo up: {e}")))??;

    let sandbox = ctx.env.netns.clone();
    Ok(CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: conf.bridge_name().to_string(),
                mac: link::mac_of(&bridge),
                ..Default::default()
            },
            Interface {
                name: host.clone(),
                mac: link::format_mac(&host_mac),
                ..Default::default()
            },
            Interface {
                name: ctx.env.ifname.clone(),
                mac: link::format_mac(&peer_mac),
                sandbox,
                ..Default::default()
            },
        ],
        ips: a
            .ips
            .iter()
            .map(|(n, gw)| IpConfig {
                address: n.to_string(),
                gateway: gw.map(|g| g.to_string()),
                interface: Some(2),
            })
            .collect(),
        routes,
        dns: a.dns.clone(),
    })
}

/// Inside the pod: the interface up, addresses, routes.
async fn configure_pod(
    ph: &rtnetlink::Handle,
    ifname: &str,
    a: &Addressing,
    routes: &[Route],
) -> Result<(), CniError> {
    let pod = link::get(ph, ifname)
        .await?
        .ok_or_else(|| CniError::internal(format!("{ifname} did not appear in the pod netns")))?;
    let idx = pod.header.index;
    link::set_up(ph, idx).await?;
    for (net, _) in &a.ips {
        link::ensure_addr(ph, idx, *net).await?;
    }
    for r in routes {
        let dst = IpNet::parse(&r.dst).ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("route dst {:?} is not a CIDR", r.dst),
            )
        })?;
        let gw = match &r.gw {
            Some(g) => Some(g.parse::<IpAddr>().map_err(|_| {
                CniError::new(code::INVALID_CONFIG, format!("route gw {g:?} is not an IP"))
            })?),
            None => a
                .ips
                .iter()
                .find(|(n, g)| n.addr.is_ipv4() == dst.addr.is_ipv4() && g.is_some())
                .and_then(|(_, g)| *g),
        };
        link::add_route(ph, dst, gw, idx).await?;
    }
    Ok(())
}

/// The MTU of the interface holding the node's default IPv4 route (1500 without one).
pub(super) async fn uplink_mtu(h: &rtnetlink::Handle) -> Result<u32, CniError> {
    let Some(dev) =
        default_route_dev(&std::fs::read_to_string("/proc/net/route").unwrap_or_default())
    else {
        return Ok(1500);
    };
    Ok(link::get(h, &dev)
        .await?
        .and_then(|m| link::mtu_of(&m))
        .unwrap_or(1500))
}

/// The interface of the lowest-metric default route in `/proc/net/route` text.
pub(crate) fn default_route_dev(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[6].parse::<u32>().unwrap_or(u32::MAX), f[0].to_string()))
        })
        .min()
        .map(|(_, d)| d)
}

fn enable_forwarding(v4: bool, v6: bool) -> Result<(), CniError> {
    for (on, path) in [
        (v4, "/proc/sys/net/ipv4/ip_forward"),
        (v6, "/proc/sys/net/ipv6/conf/all/forwarding"),
    ] {
        if on
            && std::fs::read_to_string(path)
                .map(|s| s.trim() != "1")
                .unwrap_or(true)
        {
            std::fs::write(path, "1").map_err(|e| {
                CniError::new(
                    code::IO_FAILURE,
                    format!("cannot enable forwarding ({path}): {e}"),
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_route_from_proc() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                 eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                 eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(super::default_route_dev(t).as_deref(), Some("eth0"));
        assert_eq!(super::default_route_dev("Iface\n"), None);
    }
}
