//! DEL: always succeeds when there is nothing left to remove, with or without the netns.
//! Frees the IPs, the masquerade elements (the network's table with its last pod) and the host veth.

use super::{result_ips, Ctx, Ipam};
use crate::ipam::Store;
use crate::link;
use crate::masq;
use crate::types::CniError;
use std::net::IpAddr;

pub(super) async fn del(ctx: &Ctx) -> Result<(), CniError> {
    let mut known = match ctx.prev_result() {
        Ok(Some(r)) => result_ips(&r),
        _ => Vec::new(),
    };
    known.dedup();
    // The veth goes first: a pod must not keep an address that IPAM already handed out again.
    let (conn, h, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::internal(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    link::del_by_name(&h, &ctx.host_veth()).await?;
    release(ctx, &known)
}

/// Frees the attachment's IPs and their masquerade elements; `extra` are IPs known from elsewhere
/// (prevResult, a failed ADD). Runs nft under the IPAM lock so a concurrent ADD cannot lose its
/// element when the network's table goes away with its last pod.
pub(super) fn release(ctx: &Ctx, extra: &[IpAddr]) -> Result<(), CniError> {
    let mut ips: Vec<IpAddr> = extra.to_vec();
    let (_store, remaining) = match &ctx.ipam {
        Ipam::HostLocal { dir, .. } => {
            let store = Store::open(dir, &ctx.conf.name)?;
            ips.extend(store.release_attachment(&ctx.env.container_id, &ctx.env.ifname)?);
            let remaining = store.allocations()?.len();
            (Some(store), remaining)
        }
        Ipam::Delegate { .. } => {
            ctx.delegate("DEL")?;
            (None, usize::MAX)
        }
        Ipam::None => (None, usize::MAX),
    };
    ips.sort();
    ips.dedup();
    if ctx.conf.ip_masq && (!ips.is_empty() || remaining == 0) {
        masq::apply(masq::render_del(&ctx.conf.name, &ips, remaining == 0))?;
    }
    Ok(())
}
