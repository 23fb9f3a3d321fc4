//! GC and STATUS (spec 1.1).

use super::{is_host_veth_name, Ctx, Ipam};
use crate::hostport;
use crate::ipam::Store;
use crate::link;
use crate::masq;
use crate::types::{code, Attachment, CniError};
use std::collections::HashSet;

/// Removes IPs and host veths of attachments not in `cni.dev/valid-attachments` (and the
/// network's masquerade table when no IP is left).
pub(super) async fn gc(ctx: &Ctx) -> Result<(), CniError> {
    let valid: HashSet<Attachment> = ctx
        .conf
        .valid_attachments
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let valid_ids: HashSet<&str> = valid.iter().map(|a| a.container_id.as_str()).collect();
    match &ctx.ipam {
        Ipam::HostLocal { dir, .. } => {
            let store = Store::open(dir, &ctx.conf.name)?;
            let all = store.allocations()?;
            let stale: Vec<_> = all
                .iter()
                .filter(|(_, id, ifname)| {
                    if ifname.is_empty() {
                        !valid_ids.contains(id.as_str())
                    } else {
                        !valid.contains(&Attachment {
                            container_id: id.clone(),
                            ifname: ifname.clone(),
                        })
                    }
                })
                .map(|(ip, _, _)| *ip)
                .collect();
            store.release(&stale)?;
            let remaining = all.len() - stale.len();
            if remaining == 0 {
                super::del::drop_tables(ctx)?;
            }
        }
        Ipam::Delegate { .. } | Ipam::None => {
            if matches!(ctx.ipam, Ipam::Delegate { .. }) {
                ctx.delegate("GC")?;
            }
            // Without host-local there is no count of the network's IPs: its masquerade table
            // goes when GC says no attachment is valid.
            if valid.is_empty() {
                super::del::drop_tables(ctx)?;
            }
        }
    }
    // hostPort chains of attachments that are not valid (an ADD killed before its runtime
    // recorded it leaves some).
    if hostport::table_exists(&ctx.conf.name).unwrap_or(false) {
        let keep: HashSet<String> = valid
            .iter()
            .map(|a| hostport::chain_prefix(&a.container_id, &a.ifname))
            .collect();
        let mut script = String::new();
        for prefix in hostport::attachments(&ctx.conf.name)? {
            if !keep.contains(&prefix) {
                script += &hostport::render_del(&ctx.conf.name, &prefix);
            }
        }
        if !script.is_empty() {
            masq::apply(script)?;
        }
    }

    let keep: HashSet<String> = valid
        .iter()
        .map(|a| super::host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let (conn, h, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::internal(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    let Some(bridge) = link::get(&h, ctx.conf.bridge_name()).await? else {
        return Ok(());
    };
    for l in link::list(&h).await? {
        let Some(name) = link::name_of(&l) else {
            continue;
        };
        if is_host_veth_name(name)
            && link::controller_of(&l) == Some(bridge.header.index)
            && !keep.contains(name)
        {
            link::del_by_name(&h, name).await?;
        }
    }
    Ok(())
}

/// Ready for ADD when the IPAM store is usable and every range set has a free address.
pub(super) fn status(ctx: &Ctx) -> Result<(), CniError> {
    match &ctx.ipam {
        Ipam::HostLocal { dir, sets, .. } => {
            let store = Store::open(dir, &ctx.conf.name).map_err(|e| {
                CniError::new(code::NOT_AVAILABLE, "the IPAM store is not usable").with_details(e)
            })?;
            if !store.has_free(sets)? {
                return Err(CniError::new(
                    code::NOT_AVAILABLE,
                    "no IP addresses available in the configured ranges",
                ));
            }
            Ok(())
        }
        Ipam::Delegate { .. } => ctx.delegate("STATUS").map(|_| ()),
        Ipam::None => Ok(()),
    }
}
