//! Node IPAM: every Node gets `spec.podCIDR` (and `podCIDRs`), a /24 (the mask is a flag) of
//! the cluster CIDR that no other node has.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;
use tokio::task::JoinSet;

use super::queue::{Action, Queue};
use super::{Ctx, Error};

pub fn start(tasks: &mut JoinSet<()>, ctx: Arc<Ctx>) {
    let q = Queue::<String>::new(ctx.cfg.max_backoff);
    let mut events = ctx.nodes.subscribe();
    let qq = q.clone();
    tasks.spawn(async move {
        while let Some(n) = events.recv().await {
            qq.add(n.name_any());
        }
    });
    for n in ctx.nodes.store().state() {
        q.add(n.name_any());
    }
    // One worker: two nodes never pick the same range.
    let assigned = Arc::new(std::sync::Mutex::new(HashMap::<String, u32>::new()));
    q.run(tasks, 1, move |name| {
        reconcile(ctx.clone(), assigned.clone(), name)
    });
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    Some((ip.parse().ok()?, len.parse().ok()?))
}

/// The index of the first free block of size `mask` in `cluster`, given the taken ones.
pub fn first_free(cluster: (Ipv4Addr, u8), mask: u8, taken: &HashSet<u32>) -> Option<Ipv4Addr> {
    let (base, len) = cluster;
    if mask < len || mask > 32 {
        return None;
    }
    let base = u32::from(base) & (u32::MAX.checked_shl(32 - len as u32).unwrap_or(0));
    let count = 1u64 << (mask - len);
    let step = 1u64 << (32 - mask);
    (0..count)
        .map(|i| base + (i * step) as u32)
        .find(|b| !taken.contains(b))
        .map(Ipv4Addr::from)
}

/// `assigned` remembers what this controller gave each node, so that a cache that has not yet
/// shown a node's range never makes it pick a second one.
async fn reconcile(
    ctx: Arc<Ctx>,
    assigned: Arc<std::sync::Mutex<HashMap<String, u32>>>,
    name: String,
) -> Result<Action, Error> {
    let Some(node) = ctx.nodes.get(None, &name) else {
        assigned.lock().expect("assigned lock").remove(&name);
        return Ok(Action::Done);
    };
    let have = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .and_then(parse_cidr);
    let cidr = {
        let mut a = assigned.lock().expect("assigned lock");
        if let Some((ip, _)) = have {
            a.insert(name.clone(), u32::from(ip));
            return Ok(Action::Done);
        }
        if a.contains_key(&name) {
            // Given already; the cache will show it.
            return Ok(Action::Done);
        }
        let mut taken: HashSet<u32> = a.values().copied().collect();
        for n in ctx.nodes.store().state() {
            if let Some((ip, _)) = n
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .and_then(parse_cidr)
            {
                taken.insert(u32::from(ip));
            }
        }
        let mask = ctx.cfg.node_cidr_mask;
        let ip = first_free(ctx.cfg.cluster_cidr, mask, &taken).ok_or_else(|| {
            Error::CidrFull(
                format!("{}/{}", ctx.cfg.cluster_cidr.0, ctx.cfg.cluster_cidr.1),
                mask,
            )
        })?;
        a.insert(name.clone(), u32::from(ip));
        format!("{ip}/{mask}")
    };
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
    if let Err(e) = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        assigned.lock().expect("assigned lock").remove(&name);
        return Err(e.into());
    }
    tracing::info!(node = %name, %cidr, "pod CIDR allocated");
    Ok(Action::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_cut_in_order() {
        let cluster = (Ipv4Addr::new(10, 244, 0, 0), 16);
        let mut taken = HashSet::new();
        assert_eq!(
            first_free(cluster, 24, &taken),
            Some(Ipv4Addr::new(10, 244, 0, 0))
        );
        taken.insert(u32::from(Ipv4Addr::new(10, 244, 0, 0)));
        assert_eq!(
            first_free(cluster, 24, &taken),
            Some(Ipv4Addr::new(10, 244, 1, 0))
        );
        let tiny = (Ipv4Addr::new(10, 0, 0, 0), 24);
        taken.insert(u32::from(Ipv4Addr::new(10, 0, 0, 0)));
        assert_eq!(first_free(tiny, 24, &taken), None);
    }
}
