//! CHECK: the attachment described by prevResult is still in place.

use super::{Ctx, Ipam};
use crate::ipam::{IpNet, Store};
use crate::link;
use crate::masq;
use crate::ns;
use crate::types::{code, CniError};

fn mismatch(msg: String) -> CniError {
    CniError::internal(msg)
}

pub(super) async fn check(ctx: &Ctx) -> Result<(), CniError> {
    let prev = ctx.prev_result()?.ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult in the configuration",
        )
    })?;
    let ifname = &ctx.env.ifname;
    let idx = prev
        .interfaces
        .iter()
        .position(|i| &i.name == ifname && !i.sandbox.is_empty());
    let want: Vec<IpNet> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == idx)
        .filter_map(|ip| IpNet::parse(&ip.address))
        .collect();

    match &ctx.ipam {
        Ipam::HostLocal { dir, .. } => {
            let held = Store::open(dir, &ctx.conf.name)?.find(&ctx.env.container_id, ifname)?;
            for n in &want {
                if !held.contains(&n.addr) {
                    return Err(mismatch(format!(
                        "IPAM: {} is not allocated to container {}",
                        n.addr, ctx.env.container_id
                    )));
                }
            }
        }
        Ipam::Delegate { .. } => {
            ctx.delegate("CHECK")?;
        }
        Ipam::None => {}
    }

    if ctx.conf.ip_masq && !want.is_empty() && !masq::table_exists(&ctx.conf.name).unwrap_or(false)
    {
        return Err(mismatch(format!(
            "the masquerade table {} of network {} is missing",
            masq::table_name(&ctx.conf.name),
            ctx.conf.name
        )));
    }

    if !ctx.port_mappings.is_empty()
        && !want.is_empty()
        && !crate::hostport::chains_exist(&ctx.conf.name, &ctx.hostport_prefix()).unwrap_or(false)
    {
        return Err(mismatch(format!(
            "the hostPort rules of container {} are missing from table {}",
            ctx.env.container_id,
            crate::hostport::table_name(&ctx.conf.name)
        )));
    }

    let netns = ctx.open_netns()?;
    let (conn, h, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::internal(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    let (pconn, ph) = ns::connect_in(&netns, &tokio::runtime::Handle::current())
        .map_err(|e| CniError::internal(format!("netlink socket in netns: {e}")))?;
    tokio::spawn(pconn);

    let bridge = link::get(&h, ctx.conf.bridge_name())
        .await?
        .ok_or_else(|| mismatch(format!("bridge {} does not exist", ctx.conf.bridge_name())))?;
    // The host end named in prevResult (another plugin may have made the attachment), else ours.
    let host = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_empty() && i.name != ctx.conf.bridge_name())
        .map(|i| i.name.clone())
        .unwrap_or_else(|| ctx.host_veth());
    let hv = link::get(&h, &host)
        .await?
        .ok_or_else(|| mismatch(format!("host interface {host} does not exist")))?;
    if link::controller_of(&hv) != Some(bridge.header.index) {
        return Err(mismatch(format!(
            "host interface {host} is not attached to bridge {}",
            ctx.conf.bridge_name()
        )));
    }
    let pod = link::get(&ph, ifname).await?.ok_or_else(|| {
        mismatch(format!(
            "interface {ifname} does not exist in {}",
            ctx.env.netns
        ))
    })?;
    if !link::is_up(&pod) {
        return Err(mismatch(format!("interface {ifname} is down")));
    }
    let have = link::addresses(&ph, pod.header.index).await?;
    for n in &want {
        if !have.contains(n) {
            return Err(mismatch(format!("interface {ifname} lacks address {n}")));
        }
    }
    Ok(())
}
