//! Node lifecycle: a node whose Lease and status go unrenewed for the grace period becomes
//! Ready=Unknown; nodes not Ready get the `unreachable` or `not-ready` NoSchedule and
//! NoExecute taints (removed when Ready again); pods on a NoExecute-tainted node are evicted
//! when their tolerations run out (the taint manager).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;
use tokio::task::JoinSet;

use super::events::Type;
use super::informer::Informer;
use super::queue::{Action, Queue};
use super::{Ctx, Error};
use crate::scheduler::fit;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

pub fn start(tasks: &mut JoinSet<()>, ctx: Arc<Ctx>) {
    let leases: Informer<Lease> = Informer::start(
        tasks,
        Api::namespaced(ctx.client.clone(), "kube-node-lease"),
        watcher::Config::default(),
    );
    let q = Queue::<String>::new(ctx.cfg.max_backoff);
    {
        let q = q.clone();
        let mut node_events = ctx.nodes.subscribe();
        let mut lease_events = leases.subscribe();
        let mut pod_events = ctx.pods.subscribe();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    Some(n) = node_events.recv() => q.add(n.name_any()),
                    Some(l) = lease_events.recv() => q.add(l.name_any()),
                    Some(p) = pod_events.recv() => {
                        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                            q.add(n);
                        }
                    }
                    else => break,
                }
            }
        });
    }
    {
        // Silence is noticed by time, not by an event: look at every node each period.
        let (q, c) = (q.clone(), ctx.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(c.cfg.node_monitor_period);
            loop {
                tick.tick().await;
                for n in c.nodes.store().state() {
                    q.add(n.name_any());
                }
            }
        });
    }
    let leases = Arc::new(leases);
    q.run(tasks, 1, move |name| {
        reconcile(ctx.clone(), leases.clone(), name)
    });
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

async fn reconcile(
    ctx: Arc<Ctx>,
    leases: Arc<Informer<Lease>>,
    name: String,
) -> Result<Action, Error> {
    let Some(node) = ctx.nodes.get(None, &name) else {
        return Ok(Action::Done);
    };
    let api: Api<Node> = Api::all(ctx.client.clone());
    let now = Timestamp::now();
    let grace = ctx.cfg.node_monitor_grace_period.as_secs() as i64;
    let lease_renewed = leases.get(Some("kube-node-lease"), &name).and_then(|l| {
        l.spec
            .as_ref()?
            .renew_time
            .as_ref()
            .map(|t| t.0.as_second())
    });
    let ready = ready_condition(&node).cloned();
    let heartbeat = ready
        .as_ref()
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0.as_second())
        .max(lease_renewed)
        .or_else(|| {
            node.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
        })
        .unwrap_or(now.as_second());
    let silent = now.as_second() - heartbeat > grace;
    let mut status = ready
        .as_ref()
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "Unknown".into());
    if silent && (status != "Unknown" || ready.is_none()) {
        let (message, known) = match &ready {
            Some(_) => ("Kubelet stopped posting node status.", true),
            None => ("Kubelet never posted node status.", false),
        };
        let mut conds = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        for ty in ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"] {
            let c = NodeCondition {
                type_: ty.into(),
                status: "Unknown".into(),
                reason: Some("NodeStatusUnknown".into()),
                message: Some(message.into()),
                last_heartbeat_time: conds
                    .iter()
                    .find(|c| c.type_ == ty)
                    .and_then(|c| c.last_heartbeat_time.clone()),
                last_transition_time: Some(Time(now)),
            };
            conds.retain(|c| c.type_ != ty);
            if known || ty == "Ready" {
                conds.push(c);
            }
        }
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conds}})),
        )
        .await?;
        ctx.events.publish(
            node.as_ref(),
            Type::Normal,
            "NodeNotReady",
            format!("Node {name} status is now: NodeNotReady"),
        );
        status = "Unknown".into();
    }

    // Taints follow the Ready condition.
    let key = match status.as_str() {
        "True" => None,
        "False" => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    };
    let mut taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let before = taints.clone();
    taints.retain(|t| {
        let ours = t.key == UNREACHABLE || t.key == NOT_READY;
        !ours || Some(t.key.as_str()) == key
    });
    if let Some(k) = key {
        for effect in ["NoSchedule", "NoExecute"] {
            if !taints.iter().any(|t| t.key == k && t.effect == effect) {
                taints.push(Taint {
                    key: k.into(),
                    effect: effect.into(),
                    time_added: (effect == "NoExecute").then_some(Time(now)),
                    value: None,
                });
            }
        }
    }
    if taints != before {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": taints}})),
        )
        .await?;
    }
    let next = evict(&ctx, &name, &taints, now).await?;
    let check = Duration::from_secs((heartbeat + grace + 1 - now.as_second()).max(1) as u64);
    Ok(Action::After(next.map_or(check, |n| n.min(check))))
}

/// Deletes the pods on `node` whose tolerations of its NoExecute taints have run out; when the
/// next one runs out.
async fn evict(
    ctx: &Ctx,
    node: &str,
    taints: &[Taint],
    now: Timestamp,
) -> Result<Option<Duration>, Error> {
    let no_execute: Vec<&Taint> = taints.iter().filter(|t| t.effect == "NoExecute").collect();
    if no_execute.is_empty() {
        return Ok(None);
    }
    let mut next: Option<i64> = None;
    let on_node: Vec<Arc<Pod>> = ctx
        .pods
        .store()
        .state()
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    for p in on_node {
        let tolerations = p
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        // The pod may stay until the earliest of its tolerations' ends (never, if none ends).
        let mut until: Option<i64> = None;
        let mut evict_now = false;
        for t in &no_execute {
            let matching: Vec<_> = tolerations
                .iter()
                .filter(|tol| fit::tolerates(std::slice::from_ref(tol), t))
                .collect();
            if matching.is_empty() {
                evict_now = true;
                break;
            }
            let secs = matching
                .iter()
                .filter_map(|tol| tol.toleration_seconds)
                .min();
            if let (Some(s), true) = (
                secs,
                matching.iter().all(|tol| tol.toleration_seconds.is_some()),
            ) {
                let added = t
                    .time_added
                    .as_ref()
                    .map_or(now.as_second(), |a| a.0.as_second());
                let end = added + s.max(0);
                until = Some(until.map_or(end, |u| u.min(end)));
            }
        }
        if evict_now || until.is_some_and(|u| u <= now.as_second()) {
            let ns = p.namespace().unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            ctx.events.publish(
                p.as_ref(),
                Type::Normal,
                "TaintManagerEviction",
                format!("Marking for deletion Pod {ns}/{}", p.name_any()),
            );
            match pods.delete(&p.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        } else if let Some(u) = until {
            next = Some(next.map_or(u, |n| n.min(u)));
        }
    }
    Ok(next.map(|n| Duration::from_secs((n - now.as_second()).max(1) as u64)))
}
