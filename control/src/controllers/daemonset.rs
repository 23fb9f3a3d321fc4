//! The DaemonSet controller: one pod per eligible node (nodeSelector, required node affinity,
//! taints and tolerations), pinned to it by node affinity and placed by the scheduler;
//! RollingUpdate within maxUnavailable, or OnDelete.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

use super::deployment::template_hash;
use super::events::Type;
use super::owners::{self, Expectations};
use super::pods;
use super::queue::Action;
use super::{Ctx, Error, Key};
use crate::scheduler::fit;

pub const HASH_LABEL: &str = "controller-revision-hash";

/// Tolerations every daemon pod carries, so node conditions do not evict it.
fn daemon_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// The pod a daemon set runs on `node`.
fn pod_for(ds: &DaemonSet, node: &str, hash: &str) -> Pod {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", ds.name_any()));
    meta.namespace = ds.metadata.namespace.clone();
    meta.owner_references = Some(vec![owners::controller_ref(ds)]);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let mut spec = template.spec.unwrap_or_default();
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for t in daemon_tolerations() {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    // Pinned by node affinity on the node's name, as upstream: the scheduler binds it.
    let affinity: k8s_openapi::api::core::v1::Affinity =
        serde_json::from_value(json!({"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}}))
        .expect("a valid affinity");
    spec.affinity
        .get_or_insert_with(Default::default)
        .node_affinity = affinity.node_affinity;
    Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    }
}

/// The node a daemon pod is for: where it is bound, or what its affinity names.
fn target_node(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    if let Some(n) = spec.node_name.clone().filter(|n| !n.is_empty()) {
        return Some(n);
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

fn eligible(ds: &DaemonSet, node: &Node, hash: &str) -> bool {
    let pod = pod_for(ds, &node.name_any(), hash);
    // Resources and ports are the scheduler's to judge; here only whether it may run there.
    !matches!(
        fit::filter(&pod, node, &[]),
        Err(fit::Unfit::Taint(_) | fit::Unfit::Affinity | fit::Unfit::Unschedulable)
    )
}

pub async fn reconcile(
    ctx: Arc<Ctx>,
    exp: Arc<Expectations<Key>>,
    key: Key,
) -> Result<Action, Error> {
    let (ns, name) = (&key.0, &key.1);
    let (ds, all) = match super::owner_and_pods(&ctx, &ctx.daemonsets, &exp, &key) {
        super::Owner::Gone => return Ok(Action::Done),
        super::Owner::Lagging(action) => return Ok(action),
        super::Owner::Ready(o, pods) => (o, pods),
    };
    let spec = ds.spec.clone().unwrap_or_default();
    let hash = template_hash(
        &spec.template,
        ds.status.as_ref().and_then(|s| s.collision_count),
    );
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut by_node: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
    for p in &all {
        let mine = owners::controller_of(&p.metadata).is_some_and(|o| o.uid == uid);
        if mine && pods::is_active(p) {
            if let Some(n) = target_node(p) {
                by_node.entry(n).or_default().push(p.clone());
            }
        }
    }
    let nodes = ctx.nodes.store().state();
    let now = Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let mut to_create = Vec::new();
    let mut to_delete: Vec<Arc<Pod>> = Vec::new();
    let mut desired = 0;
    for node in &nodes {
        let n = node.name_any();
        let have = by_node.remove(&n).unwrap_or_default();
        if eligible(&ds, node, &hash) {
            desired += 1;
            if have.is_empty() {
                to_create.push(n);
            } else {
                to_delete.extend(have.iter().skip(1).cloned());
            }
        } else {
            to_delete.extend(have);
        }
    }
    // Pods for nodes that no longer exist.
    to_delete.extend(by_node.into_values().flatten());
    let ours: Vec<Arc<Pod>> = all
        .iter()
        .filter(|p| {
            owners::controller_of(&p.metadata).is_some_and(|o| o.uid == uid) && pods::is_active(p)
        })
        .cloned()
        .collect();
    let is_updated = |p: &Pod| p.labels().get(HASH_LABEL) == Some(&hash);
    // Rolling update: old pods go while fewer than maxUnavailable are unavailable.
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        != Some("OnDelete");
    if rolling && ds.metadata.deletion_timestamp.is_none() {
        let max_unavailable = match spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_unavailable.clone())
        {
            Some(IntOrString::Int(n)) => n.max(1),
            Some(IntOrString::String(p)) => {
                let pct: i32 = p.trim_end_matches('%').parse().unwrap_or(0);
                (pct * desired / 100).max(1)
            }
            None => 1,
        };
        let unavailable = desired
            - ours
                .iter()
                .filter(|p| pods::is_available(p, min_ready, now))
                .count() as i32;
        let mut budget = max_unavailable - unavailable.max(0);
        let mut old: Vec<&Arc<Pod>> = ours
            .iter()
            .filter(|p| !is_updated(p) && !to_delete.contains(p))
            .collect();
        // Unavailable old pods first: replacing them costs nothing.
        old.sort_by_key(|p| pods::is_available(p, min_ready, now));
        for p in old {
            let avail = pods::is_available(p, min_ready, now);
            if !avail {
                to_delete.push(p.clone());
            } else if budget > 0 {
                budget -= 1;
                to_delete.push(p.clone());
            }
        }
    }
    if ds.metadata.deletion_timestamp.is_none() {
        for node in &to_create {
            match api
                .create(&PostParams::default(), &pod_for(&ds, node, &hash))
                .await
            {
                Ok(p) => {
                    exp.created(&key, p.name_any());
                    ctx.events.publish(
                        ds.as_ref(),
                        Type::Normal,
                        "SuccessfulCreate",
                        format!("Created pod: {}", p.name_any()),
                    );
                }
                Err(e) => {
                    ctx.events.publish(
                        ds.as_ref(),
                        Type::Warning,
                        "FailedCreate",
                        format!("Error creating: {}", super::replicaset::api_message(&e)),
                    );
                    return Err(e.into());
                }
            }
        }
        for p in &to_delete {
            exp.deleted(&key, p.name_any());
            match api.delete(&p.name_any(), &DeleteParams::default()).await {
                Ok(_) => ctx.events.publish(
                    ds.as_ref(),
                    Type::Normal,
                    "SuccessfulDelete",
                    format!("Deleted pod: {}", p.name_any()),
                ),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let kept: Vec<&Arc<Pod>> = ours.iter().filter(|p| !to_delete.contains(p)).collect();
    let scheduled = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let available = kept
        .iter()
        .filter(|p| pods::is_available(p, min_ready, now))
        .count() as i32;
    let status = DaemonSetStatus {
        desired_number_scheduled: desired,
        current_number_scheduled: kept.iter().filter(|p| scheduled(p)).count() as i32,
        number_misscheduled: 0,
        number_ready: kept.iter().filter(|p| pods::is_ready(p)).count() as i32,
        number_available: Some(available),
        number_unavailable: Some((desired - available).max(0)),
        updated_number_scheduled: Some(
            kept.iter()
                .filter(|p| scheduled(p) && is_updated(p))
                .count() as i32,
        ),
        observed_generation: ds.metadata.generation,
        collision_count: ds.status.as_ref().and_then(|s| s.collision_count),
        conditions: ds.status.as_ref().and_then(|s| s.conditions.clone()),
    };
    if ds.status.as_ref() != Some(&status) {
        let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), ns);
        ds_api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    Ok(if min_ready > 0 && status.number_ready > available {
        Action::After(std::time::Duration::from_secs(min_ready as u64))
    } else {
        Action::Done
    })
}
