//! DEL: always succeeds when there is nothing left to remove, with or without the netns.
//! Frees the host veth, the IPs and, with the network's last IP, its masquerade table.

use super::{Ctx, Ipam};
use crate::hostport;
use crate::ipam::Store;
use crate::link;
use crate::masq;
use crate::types::CniError;

pub(super) async fn del(ctx: &Ctx) -> Result<(), CniError> {
    // The veth goes first: a pod must not keep an address that IPAM already handed out again.
    let (conn, h, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::internal(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    if !link::del_by_name(&h, &ctx.host_veth()).await? {
        // Not ours by name: an attachment made by another plugin (the reference bridge names
        // its veths at random). Remove the pod end, which takes the pair with it.
        if let Ok(netns) = crate::ns::open(&ctx.env.netns) {
            let (pconn, ph) = crate::ns::connect_in(&netns, &tokio::runtime::Handle::current())
                .map_err(|e| CniError::internal(format!("netlink socket in netns: {e}")))?;
            tokio::spawn(pconn);
            if let Some(l) = link::get(&ph, &ctx.env.ifname).await? {
                if link::is_veth(&l) {
                    link::del_by_name(&ph, &ctx.env.ifname).await?;
                }
            }
        }
    }
    remove_hostports(ctx)?;
    release(ctx)
}

/// Removes the attachment's hostPort chains, found by name (DEL may come without
/// runtimeConfig, e.g. after the runtime lost its cache).
pub(super) fn remove_hostports(ctx: &Ctx) -> Result<(), CniError> {
    let prefix = ctx.hostport_prefix();
    if hostport::chains_exist(&ctx.conf.name, &prefix).unwrap_or(true) {
        masq::apply(hostport::render_del(&ctx.conf.name, &prefix))?;
    }
    Ok(())
}

/// Frees the attachment's IPs; with the network's last IP, its masquerade table. nft runs under
/// the IPAM lock: an ADD allocates under that lock before it looks for the table, so it either
/// counts as remaining here or finds the table gone and creates it again.
pub(super) fn release(ctx: &Ctx) -> Result<(), CniError> {
    let (_store, remaining) = match &ctx.ipam {
        Ipam::HostLocal { dir, .. } => {
            let store = Store::open(dir, &ctx.conf.name)?;
            store.release_attachment(&ctx.env.container_id, &ctx.env.ifname)?;
            let remaining = store.allocations()?.len();
            (Some(store), remaining)
        }
        Ipam::Delegate { .. } => {
            ctx.delegate("DEL")?;
            (None, usize::MAX)
        }
        Ipam::None => (None, usize::MAX),
    };
    if remaining == 0 {
        drop_tables(ctx)?;
    }
    Ok(())
}

/// Removes the network's masquerade and hostPort tables (its last IP is gone).
pub(super) fn drop_tables(ctx: &Ctx) -> Result<(), CniError> {
    let mut script = String::new();
    if ctx.conf.ip_masq {
        script += &masq::render_drop(&ctx.conf.name);
    }
    if hostport::table_exists(&ctx.conf.name).unwrap_or(true) {
        script += &hostport::render_drop(&ctx.conf.name);
    }
    if !script.is_empty() {
        masq::apply(script)?;
    }
    Ok(())
}
