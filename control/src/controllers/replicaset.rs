//! The ReplicaSet controller: keeps `replicas` active pods matching the selector, adopting
//! orphans and releasing pods whose labels no longer match, and reports what it sees.

use std::sync::Arc;

use futures_util::future::join_all;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

use super::events::Type;
use super::owners::{self, Expectations};
use super::pods;
use super::queue::Action;
use super::{Ctx, Error, Key};

/// The most pods created or deleted in one pass (kube-controller-manager's burstReplicas).
const BURST: usize = 500;

pub async fn reconcile(
    ctx: Arc<Ctx>,
    exp: Arc<Expectations<Key>>,
    key: Key,
) -> Result<Action, Error> {
    let (ns, name) = (&key.0, &key.1);
    let (rs, all) = match super::owner_and_pods(&ctx, &ctx.replicasets, &exp, &key) {
        super::Owner::Gone => return Ok(Action::Done),
        super::Owner::Lagging(action) => return Ok(action),
        super::Owner::Ready(o, pods) => (o, pods),
    };
    let spec = rs.spec.clone().unwrap_or_default();
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut owned: Vec<Arc<Pod>> = Vec::new();
    for p in &all {
        let selected = owners::matches(&spec.selector, p.metadata.labels.as_ref());
        match owners::controller_of(&p.metadata) {
            Some(o) if o.uid == uid => {
                if selected {
                    owned.push(p.clone());
                } else if p.metadata.deletion_timestamp.is_none() {
                    let patch = owners::release_patch(&uid, &p.metadata);
                    api.patch(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                }
            }
            Some(_) => {}
            None if selected
                && owners::selects_anything(&spec.selector)
                && rs.metadata.deletion_timestamp.is_none()
                && pods::is_active(p) =>
            {
                let patch = owners::adopt_patch(rs.as_ref(), &p.metadata);
                api.patch(
                    &p.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
                owned.push(p.clone());
            }
            None => {}
        }
    }
    let mut active: Vec<Arc<Pod>> = owned
        .iter()
        .filter(|p| pods::is_active(p))
        .cloned()
        .collect();
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    let mut manage_err = None;
    let mut deleted: Vec<String> = Vec::new();
    if rs.metadata.deletion_timestamp.is_none() {
        if active.len() < want {
            manage_err = create_pods(&ctx, &exp, &key, &rs, (want - active.len()).min(BURST))
                .await
                .err();
        } else if active.len() > want {
            active.sort_by(|a, b| pods::deletion_order(a, b));
            let victims: Vec<Arc<Pod>> = active.drain(..(active.len() - want).min(BURST)).collect();
            for p in &victims {
                exp.deleted(&key, p.name_any());
                deleted.push(p.name_any());
            }
            let results = join_all(victims.iter().map(|p| {
                let api = api.clone();
                async move { api.delete(&p.name_any(), &DeleteParams::default()).await }
            }))
            .await;
            for (p, r) in victims.iter().zip(results) {
                match r {
                    Ok(_) => ctx.events.publish(
                        rs.as_ref(),
                        Type::Normal,
                        "SuccessfulDelete",
                        format!("Deleted pod: {}", p.name_any()),
                    ),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        ctx.events.publish(
                            rs.as_ref(),
                            Type::Warning,
                            "FailedDelete",
                            format!("Error deleting: {e}"),
                        );
                        manage_err = Some(e.into());
                    }
                }
            }
        }
    }
    let now = Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    // Pods deleted in this pass no longer count, so a reader never sees them as available.
    let counted: Vec<&Arc<Pod>> = owned
        .iter()
        .filter(|p| pods::is_active(p) && !deleted.contains(&p.name_any()))
        .collect();
    let status = ReplicaSetStatus {
        replicas: counted.len() as i32,
        fully_labeled_replicas: Some(
            counted
                .iter()
                .filter(|p| {
                    let l = p.metadata.labels.clone().unwrap_or_default();
                    template_labels.iter().all(|(k, v)| l.get(k) == Some(v))
                })
                .count() as i32,
        ),
        ready_replicas: Some(counted.iter().filter(|p| pods::is_ready(p)).count() as i32),
        available_replicas: Some(
            counted
                .iter()
                .filter(|p| pods::is_available(p, min_ready, now))
                .count() as i32,
        ),
        observed_generation: rs.metadata.generation,
        conditions: rs.status.as_ref().and_then(|s| s.conditions.clone()),
        terminating_replicas: None,
    };
    if rs.status.as_ref() != Some(&status) {
        let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), ns);
        rs_api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    if let Some(e) = manage_err {
        return Err(e);
    }
    let waiting = status.ready_replicas != status.available_replicas;
    Ok(if min_ready > 0 && waiting {
        Action::After(std::time::Duration::from_secs(min_ready as u64))
    } else {
        Action::Done
    })
}

/// Creates `n` pods in slow-start batches (1, 2, 4, ...): a failing batch stops the rest.
async fn create_pods(
    ctx: &Ctx,
    exp: &Expectations<Key>,
    key: &Key,
    rs: &ReplicaSet,
    n: usize,
) -> Result<(), Error> {
    let pod = pod_from_template(rs);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.0);
    let (mut done, mut batch) = (0, 1);
    while done < n {
        let size = batch.min(n - done);
        let pp = PostParams::default();
        let results = join_all((0..size).map(|_| api.create(&pp, &pod))).await;
        let mut failed = None;
        for r in results {
            match r {
                Ok(p) => {
                    exp.created(key, p.name_any());
                    ctx.events.publish(
                        rs,
                        Type::Normal,
                        "SuccessfulCreate",
                        format!("Created pod: {}", p.name_any()),
                    );
                }
                Err(e) => {
                    ctx.events.publish(
                        rs,
                        Type::Warning,
                        "FailedCreate",
                        format!("Error creating: {}", api_message(&e)),
                    );
                    failed = Some(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        done += size;
        batch *= 2;
    }
    Ok(())
}

pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        e => e.to_string(),
    }
}

/// A pod of `rs`: the template's labels, annotations and spec, controlled by `rs`.
fn pod_from_template(rs: &ReplicaSet) -> Pod {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", rs.name_any()));
    meta.namespace = rs.metadata.namespace.clone();
    meta.owner_references = Some(vec![owners::controller_ref(rs)]);
    meta.creation_timestamp = None;
    Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    }
}
