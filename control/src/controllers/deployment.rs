//! The Deployment controller: one ReplicaSet per pod template (named by the template's hash),
//! rolling updates within maxSurge and maxUnavailable, Recreate, proportional scaling, paused
//! deployments, rollback by template match, revision history cleanup and the status and
//! conditions `kubectl rollout` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use super::events::Type;
use super::owners;
use super::queue::Action;
use super::{Ctx, Error, Key};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const HASH_LABEL: &str = "pod-template-hash";

/// Deployment annotations not copied to its ReplicaSets.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

pub async fn reconcile(ctx: Arc<Ctx>, key: Key) -> Result<Action, Error> {
    let (ns, name) = (&key.0, &key.1);
    let Some(d) = ctx.deployments.get(Some(ns), name) else {
        return Ok(Action::Done);
    };
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::Done);
    }
    let spec = d.spec.clone().unwrap_or_default();
    if !owners::selects_anything(&spec.selector) {
        ctx.events.publish(
            d.as_ref(),
            Type::Warning,
            "SelectingAll",
            "This deployment is selecting all pods. A non-empty selector is required.".into(),
        );
        return Ok(Action::Done);
    }
    let rss = claim_replica_sets(&ctx, &d).await?;
    let mut run = Run {
        ctx: &ctx,
        d: &d,
        api: Api::namespaced(ctx.client.clone(), ns),
        rss,
        pending_conditions: None,
    };
    if spec.paused == Some(true) || run.is_scaling_event() {
        return run.sync().await;
    }
    match spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) {
        Some("Recreate") => run.recreate().await,
        _ => run.rolling().await,
    }
}

/// The ReplicaSets this deployment controls, after adopting orphans its selector matches and
/// releasing those it no longer matches.
async fn claim_replica_sets(ctx: &Ctx, d: &Deployment) -> Result<Vec<ReplicaSet>, Error> {
    let ns = d.namespace().unwrap_or_default();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let sel = &d.spec.as_ref().expect("checked").selector;
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out = Vec::new();
    for rs in ctx.replicasets.in_namespace(&ns) {
        let selected = owners::matches(sel, rs.metadata.labels.as_ref());
        match owners::controller_of(&rs.metadata) {
            Some(o) if o.uid == uid => {
                if selected {
                    out.push(rs.as_ref().clone());
                } else {
                    let patch = owners::release_patch(&uid, &rs.metadata);
                    api.patch(
                        &rs.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                }
            }
            None if selected && rs.metadata.deletion_timestamp.is_none() => {
                let patch = owners::adopt_patch(d, &rs.metadata);
                let adopted = api
                    .patch(
                        &rs.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                out.push(adopted);
            }
            _ => {}
        }
    }
    Ok(out)
}

pub fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn status_of(
    rs: &ReplicaSet,
    f: impl Fn(&k8s_openapi::api::apps::v1::ReplicaSetStatus) -> Option<i32>,
) -> i32 {
    rs.status.as_ref().and_then(f).unwrap_or(0)
}

/// Available pods, never more than the set is sized for: a set just scaled down may still
/// report the pods it is deleting.
fn available(rs: &ReplicaSet) -> i32 {
    status_of(rs, |s| s.available_replicas).min(replicas(rs))
}

/// A template as JSON without the hash label: two templates are the same when these are.
fn template_identity(t: &PodTemplateSpec) -> Value {
    let mut t = t.clone();
    if let Some(m) = t.metadata.as_mut() {
        if let Some(l) = m.labels.as_mut() {
            l.remove(HASH_LABEL);
            if l.is_empty() {
                m.labels = None;
            }
        }
        m.creation_timestamp = None;
        if *m == ObjectMeta::default() {
            t.metadata = None;
        }
    }
    serde_json::to_value(t).unwrap_or(Value::Null)
}

pub fn same_template(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    template_identity(a) == template_identity(b)
}

/// The pod-template-hash: FNV-1a of the template (and the collision count), spelt with
/// characters that make no words, as upstream's hashes look.
pub fn template_hash(t: &PodTemplateSpec, collisions: Option<i32>) -> String {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    feed(&serde_json::to_vec(&template_identity(t)).unwrap_or_default());
    if let Some(c) = collisions {
        feed(&c.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|c| ALPHABET[c as usize % ALPHABET.len()] as char)
        .collect()
}

/// maxSurge and maxUnavailable as numbers: percentages of `replicas`, surge rounded up and
/// unavailable down; both zero makes unavailable one.
pub fn resolve_fenceposts(d: &Deployment) -> (i32, i32) {
    let spec = d.spec.as_ref().expect("deployment spec");
    let replicas = spec.replicas.unwrap_or(1);
    let ru = spec
        .strategy
        .as_ref()
        .filter(|s| s.type_.as_deref() != Some("Recreate"))
        .and_then(|s| s.rolling_update.as_ref());
    let Some(ru) = ru else {
        return (0, 0);
    };
    let pct = |v: Option<&IntOrString>, default: &str, up: bool| -> i32 {
        let s = match v {
            Some(IntOrString::Int(n)) => return *n,
            Some(IntOrString::String(s)) => s.as_str(),
            None => default,
        };
        let p: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
        let x = p * replicas as i64;
        (if up { (x + 99) / 100 } else { x / 100 }) as i32
    };
    let surge = pct(ru.max_surge.as_ref(), "25%", true);
    let unavailable = pct(ru.max_unavailable.as_ref(), "25%", false);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

fn max_unavailable(d: &Deployment) -> i32 {
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if replicas == 0 {
        return 0;
    }
    resolve_fenceposts(d).1.min(replicas)
}

/// One pass over a deployment and its ReplicaSets.
struct Run<'a> {
    ctx: &'a Ctx,
    d: &'a Deployment,
    api: Api<ReplicaSet>,
    rss: Vec<ReplicaSet>,
    pending_conditions: Option<Vec<DeploymentCondition>>,
}

impl Run<'_> {
    fn want(&self) -> i32 {
        self.d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }

    fn find_new(&self) -> Option<usize> {
        let t = &self.d.spec.as_ref()?.template;
        let mut matching: Vec<usize> = (0..self.rss.len())
            .filter(|&i| {
                self.rss[i]
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|rt| same_template(rt, t))
            })
            .collect();
        // Several equal templates (after a collision): the oldest is the one.
        matching.sort_by_key(|&i| {
            self.rss[i]
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
        });
        matching.first().copied()
    }

    fn old_indices(&self, new: Option<usize>) -> Vec<usize> {
        (0..self.rss.len()).filter(|&i| Some(i) != new).collect()
    }

    /// Whether some active ReplicaSet was sized for another replica count than wanted now.
    fn is_scaling_event(&self) -> bool {
        let want = self.want().to_string();
        self.rss.iter().filter(|rs| replicas(rs) > 0).any(|rs| {
            rs.annotations()
                .get(DESIRED_REPLICAS)
                .is_some_and(|d| *d != want)
        })
    }

    fn max_old_revision(&self, new: Option<usize>) -> i64 {
        self.old_indices(new)
            .into_iter()
            .map(|i| revision(&self.rss[i]))
            .max()
            .unwrap_or(0)
    }

    fn copied_annotations(&self) -> BTreeMap<String, String> {
        self.d
            .annotations()
            .iter()
            .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Finds the ReplicaSet of the current template (creating it if asked), brings its
    /// revision up to date and records that revision on the deployment.
    async fn new_replica_set(&mut self, create: bool) -> Result<Option<usize>, Error> {
        let found = self.find_new();
        let new_revision = self.max_old_revision(found) + 1;
        let ns = self.d.namespace().unwrap_or_default();
        let idx = if let Some(i) = found {
            let rs = &self.rss[i];
            let old = revision(rs);
            let mut ann = self.copied_annotations();
            let mut changed = ann.iter().any(|(k, v)| rs.annotations().get(k) != Some(v));
            if old < new_revision {
                ann.insert(REVISION.into(), new_revision.to_string());
                if old > 0 {
                    let mut history: Vec<String> = rs
                        .annotations()
                        .get(REVISION_HISTORY)
                        .map(|h| h.split(',').map(str::to_string).collect())
                        .unwrap_or_default();
                    history.push(old.to_string());
                    ann.insert(REVISION_HISTORY.into(), history.join(","));
                }
                changed = true;
            }
            let min_ready = self.d.spec.as_ref().and_then(|s| s.min_ready_seconds);
            let min_ready_changed = rs.spec.as_ref().and_then(|s| s.min_ready_seconds) != min_ready;
            if changed || min_ready_changed {
                let patch = json!({"metadata": {"annotations": ann}, "spec": {"minReadySeconds": min_ready}});
                self.rss[i] = self
                    .api
                    .patch(
                        &rs.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            Some(i)
        } else if create {
            Some(self.create_new(new_revision, &ns).await?)
        } else {
            None
        };
        if let Some(i) = idx {
            let rev = revision(&self.rss[i]).to_string();
            if self.d.annotations().get(REVISION) != Some(&rev) {
                let dapi: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &ns);
                let patch = json!({"metadata": {"annotations": {REVISION: rev}}});
                dapi.patch(
                    &self.d.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            }
        }
        Ok(idx)
    }

    async fn create_new(&mut self, new_revision: i64, ns: &str) -> Result<usize, Error> {
        let spec = self.d.spec.as_ref().expect("deployment spec");
        let collisions = self.d.status.as_ref().and_then(|s| s.collision_count);
        let hash = template_hash(&spec.template, collisions);
        let mut template = spec.template.clone();
        let meta = template.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let (surge, _) = resolve_fenceposts(self.d);
        let mut ann = self.copied_annotations();
        ann.insert(REVISION.into(), new_revision.to_string());
        ann.insert(DESIRED_REPLICAS.into(), self.want().to_string());
        ann.insert(MAX_REPLICAS.into(), (self.want() + surge).to_string());
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(HASH_LABEL.into(), hash.clone());
        let name = format!("{}-{hash}", self.d.name_any());
        let mut rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(labels),
                annotations: Some(ann),
                owner_references: Some(vec![owners::controller_ref(self.d)]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(template),
            }),
            status: None,
        };
        let all: Vec<&ReplicaSet> = self.rss.iter().collect();
        let size = self.new_rs_replicas(&all, None);
        rs.spec.as_mut().expect("set").replicas = Some(size);
        let created = match self.api.create(&PostParams::default(), &rs).await {
            Ok(c) => c,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = self.api.get(&name).await?;
                let same = existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| same_template(t, &spec.template));
                let ours = owners::controller_of(&existing.metadata)
                    .is_some_and(|o| Some(&o.uid) == self.d.metadata.uid.as_ref());
                if same && ours {
                    existing
                } else {
                    // A hash collision: count it so the next hash differs, and try again.
                    let dapi: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), ns);
                    let patch = json!({"status": {"collisionCount": collisions.unwrap_or(0) + 1}});
                    dapi.patch_status(
                        &self.d.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                    return Err(Error::Collision(name));
                }
            }
            Err(e) => return Err(e.into()),
        };
        if size > 0 {
            self.ctx.events.publish(
                self.d,
                Type::Normal,
                "ScalingReplicaSet",
                format!("Scaled up replica set {name} from 0 to {size}"),
            );
        }
        self.set_condition(progressing(
            "True",
            "NewReplicaSetCreated",
            format!("Created new replica set \"{name}\""),
        ));
        self.rss.push(created);
        Ok(self.rss.len() - 1)
    }

    /// How many replicas the new ReplicaSet may have now.
    fn new_rs_replicas(&self, all: &[&ReplicaSet], new: Option<&ReplicaSet>) -> i32 {
        let want = self.want();
        let cur_new = new.map_or(0, replicas);
        let recreate = self
            .d
            .spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.type_.as_deref())
            == Some("Recreate");
        if recreate {
            return want;
        }
        let (surge, _) = resolve_fenceposts(self.d);
        let current: i32 = all.iter().map(|rs| replicas(rs)).sum();
        let max_total = want + surge;
        if current >= max_total {
            return cur_new;
        }
        let up = (max_total - current).min(want - cur_new).max(0);
        cur_new + up
    }

    async fn scale(&mut self, i: usize, to: i32) -> Result<bool, Error> {
        let rs = &self.rss[i];
        let from = replicas(rs);
        let (surge, _) = resolve_fenceposts(self.d);
        let desired = self.want().to_string();
        let max = (self.want() + surge).to_string();
        let ann = rs.annotations();
        let ann_ok =
            ann.get(DESIRED_REPLICAS) == Some(&desired) && ann.get(MAX_REPLICAS) == Some(&max);
        if from == to && ann_ok {
            return Ok(false);
        }
        let patch = json!({"metadata": {"annotations": {DESIRED_REPLICAS: desired, MAX_REPLICAS: max}},
            "spec": {"replicas": to}});
        let name = rs.name_any();
        self.rss[i] = self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if from != to {
            let dir = if to > from { "up" } else { "down" };
            self.ctx.events.publish(
                self.d,
                Type::Normal,
                "ScalingReplicaSet",
                format!("Scaled {dir} replica set {name} from {from} to {to}"),
            );
        }
        Ok(from != to)
    }

    async fn rolling(&mut self) -> Result<Action, Error> {
        let new = self.new_replica_set(true).await?.expect("created");
        let want = self.want();
        // Scale the new ReplicaSet up (or down to the wanted size).
        let cur = replicas(&self.rss[new]);
        if cur > want {
            if self.scale(new, want).await? {
                return self.sync_status(Some(new)).await;
            }
        } else if cur < want {
            let others: Vec<&ReplicaSet> = self.rss.iter().collect();
            let to = self.new_rs_replicas(&others, Some(&self.rss[new]));
            if self.scale(new, to).await? {
                return self.sync_status(Some(new)).await;
            }
        }
        if self.scale_down_old(new).await? {
            return self.sync_status(Some(new)).await;
        }
        if self.complete(Some(new)) {
            self.cleanup(Some(new)).await?;
        }
        self.sync_status(Some(new)).await
    }

    /// Scales old ReplicaSets down as far as maxUnavailable allows: their unhealthy pods
    /// first, then the oldest sets' available ones.
    async fn scale_down_old(&mut self, new: usize) -> Result<bool, Error> {
        let mut old: Vec<usize> = self
            .old_indices(Some(new))
            .into_iter()
            .filter(|&i| replicas(&self.rss[i]) > 0)
            .collect();
        if old.is_empty() {
            return Ok(false);
        }
        old.sort_by_key(|&i| {
            (
                self.rss[i]
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0),
                self.rss[i].name_any(),
            )
        });
        let all_pods: i32 = self.rss.iter().map(replicas).sum();
        let min_available = self.want() - max_unavailable(self.d);
        let new_unavailable = replicas(&self.rss[new]) - available(&self.rss[new]);
        let mut budget = all_pods - min_available - new_unavailable;
        if budget <= 0 {
            return Ok(false);
        }
        let mut scaled = false;
        for &i in &old {
            if budget <= 0 {
                break;
            }
            let r = replicas(&self.rss[i]);
            let unhealthy = (r - available(&self.rss[i])).max(0);
            let down = unhealthy.min(budget);
            if down > 0 {
                budget -= down;
                scaled |= self.scale(i, r - down).await?;
            }
        }
        let available_all: i32 = self.rss.iter().map(available).sum();
        let mut budget = available_all - min_available;
        for &i in &old {
            if budget <= 0 {
                break;
            }
            let r = replicas(&self.rss[i]);
            let down = r.min(budget);
            if down > 0 {
                budget -= down;
                scaled |= self.scale(i, r - down).await?;
            }
        }
        Ok(scaled)
    }

    async fn recreate(&mut self) -> Result<Action, Error> {
        let new = self.new_replica_set(false).await?;
        let old = self.old_indices(new);
        let mut scaled = false;
        for &i in &old {
            if replicas(&self.rss[i]) > 0 {
                scaled |= self.scale(i, 0).await?;
            }
        }
        if scaled {
            return self.sync_status(new).await;
        }
        // New pods start only when no old pod runs any more.
        let old_uids: Vec<String> = old
            .iter()
            .filter_map(|&i| self.rss[i].metadata.uid.clone())
            .collect();
        let ns = self.d.namespace().unwrap_or_default();
        let old_running = self.ctx.pods.in_namespace(&ns).iter().any(|p| {
            owners::controller_of(&p.metadata).is_some_and(|o| old_uids.contains(&o.uid))
                && !super::pods::is_terminal(p)
        });
        if old_running {
            return self.sync_status(new).await;
        }
        let new = match new {
            Some(n) => n,
            None => self.new_replica_set(true).await?.expect("created"),
        };
        let want = self.want();
        if self.scale(new, want).await? {
            return self.sync_status(Some(new)).await;
        }
        if self.complete(Some(new)) {
            self.cleanup(Some(new)).await?;
        }
        self.sync_status(Some(new)).await
    }

    /// Paused deployments and scaling events: sizes change, templates do not roll.
    async fn sync(&mut self) -> Result<Action, Error> {
        let new = self.new_replica_set(false).await?;
        self.proportional_scale(new).await?;
        let paused = self.d.spec.as_ref().and_then(|s| s.paused) == Some(true);
        if paused {
            self.cleanup(new).await?;
        }
        self.sync_status(new).await
    }

    async fn proportional_scale(&mut self, new: Option<usize>) -> Result<(), Error> {
        let want = self.want();
        let active: Vec<usize> = (0..self.rss.len())
            .filter(|&i| replicas(&self.rss[i]) > 0)
            .collect();
        if active.len() <= 1 {
            // One active set (or none: the newest) takes the whole size.
            let target = active.first().copied().or(new).or_else(|| {
                (0..self.rss.len()).max_by_key(|&i| {
                    self.rss[i]
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0)
                })
            });
            if let Some(i) = target {
                self.scale(i, want).await?;
            }
            return Ok(());
        }
        if let Some(n) = new {
            let saturated = replicas(&self.rss[n]) == want
                && self.rss[n].annotations().get(DESIRED_REPLICAS) == Some(&want.to_string());
            if saturated {
                for i in self.old_indices(Some(n)) {
                    if replicas(&self.rss[i]) > 0 {
                        self.scale(i, 0).await?;
                    }
                }
                return Ok(());
            }
        }
        let (surge, _) = resolve_fenceposts(self.d);
        let allowed = if want > 0 { want + surge } else { 0 };
        let total: i32 = self.rss.iter().map(replicas).sum();
        let to_add = allowed - total;
        if to_add == 0 {
            return Ok(());
        }
        let mut order = active.clone();
        order.sort_by(|&a, &b| {
            let ka = (
                replicas(&self.rss[a]),
                self.rss[a]
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0),
            );
            let kb = (
                replicas(&self.rss[b]),
                self.rss[b]
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0),
            );
            if to_add > 0 {
                kb.cmp(&ka)
            } else {
                ka.cmp(&kb)
            }
        });
        let mut sizes: Vec<(usize, i32)> = Vec::new();
        let mut added = 0;
        for &i in &order {
            let rs = &self.rss[i];
            let r = replicas(rs);
            let annotated: i32 = rs
                .annotations()
                .get(MAX_REPLICAS)
                .and_then(|v| v.parse().ok())
                .filter(|v: &i32| *v > 0)
                .unwrap_or(total.max(1));
            // This set's share of the change, by its size within the size it was made for.
            let share =
                ((r as f64) * (allowed as f64) / (annotated as f64) - r as f64).round() as i32;
            let room = to_add - added;
            let share = if to_add > 0 {
                share.min(room).max(0)
            } else {
                share.max(room).min(0)
            };
            added += share;
            sizes.push((i, r + share));
        }
        if let Some(first) = sizes.first_mut() {
            first.1 += to_add - added;
            first.1 = first.1.max(0);
        }
        for (i, size) in sizes {
            self.scale(i, size).await?;
        }
        Ok(())
    }

    /// Deletes old, empty ReplicaSets beyond revisionHistoryLimit, oldest revision first.
    async fn cleanup(&mut self, new: Option<usize>) -> Result<(), Error> {
        let limit = self
            .d
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10)
            .max(0) as usize;
        let mut empty: Vec<&ReplicaSet> = self
            .old_indices(new)
            .into_iter()
            .map(|i| &self.rss[i])
            .filter(|rs| {
                replicas(rs) == 0
                    && status_of(rs, |s| Some(s.replicas)) == 0
                    && rs.metadata.deletion_timestamp.is_none()
            })
            .collect();
        if empty.len() <= limit {
            return Ok(());
        }
        empty.sort_by_key(|rs| {
            (
                revision(rs),
                rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
            )
        });
        let n = empty.len() - limit;
        for rs in &empty[..n] {
            match self
                .api
                .delete(&rs.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn status(&self, new: Option<usize>) -> DeploymentStatus {
        let sum = |f: &dyn Fn(&ReplicaSet) -> i32| self.rss.iter().map(f).sum::<i32>();
        let avail = sum(&available);
        let want = self.want();
        let old = self.d.status.clone().unwrap_or_default();
        DeploymentStatus {
            observed_generation: self.d.metadata.generation,
            replicas: Some(sum(&|rs| status_of(rs, |s| Some(s.replicas)))),
            updated_replicas: Some(
                new.map_or(0, |n| status_of(&self.rss[n], |s| Some(s.replicas))),
            ),
            ready_replicas: Some(sum(&|rs| status_of(rs, |s| s.ready_replicas))),
            available_replicas: Some(avail),
            unavailable_replicas: Some((want - avail).max(0)),
            collision_count: old.collision_count,
            conditions: old.conditions,
            terminating_replicas: None,
        }
    }

    fn complete(&self, new: Option<usize>) -> bool {
        self.is_complete(&self.status(new))
    }

    /// Every wanted replica is updated and available, and nothing else runs.
    fn is_complete(&self, s: &DeploymentStatus) -> bool {
        let want = self.want();
        s.updated_replicas == Some(want)
            && s.replicas == Some(want)
            && s.available_replicas == Some(want)
            && s.observed_generation >= self.d.metadata.generation
    }

    /// Sets a condition that the status written at the end of this pass carries.
    fn set_condition(&mut self, c: DeploymentCondition) {
        let mut conds = self.pending_conditions.take().unwrap_or_else(|| {
            self.d
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default()
        });
        set_condition(&mut conds, c);
        self.pending_conditions = Some(conds);
    }

    async fn sync_status(&mut self, new: Option<usize>) -> Result<Action, Error> {
        let mut status = self.status(new);
        let mut conds = self
            .pending_conditions
            .take()
            .or_else(|| status.conditions.clone())
            .unwrap_or_default();
        let want = self.want();
        let min_available = want - max_unavailable(self.d);
        let avail = status.available_replicas.unwrap_or(0);
        set_condition(
            &mut conds,
            if avail >= min_available {
                condition(
                    "Available",
                    "True",
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.".into(),
                )
            } else {
                condition(
                    "Available",
                    "False",
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.".into(),
                )
            },
        );
        let paused = self.d.spec.as_ref().and_then(|s| s.paused) == Some(true);
        let deadline = self
            .d
            .spec
            .as_ref()
            .and_then(|s| s.progress_deadline_seconds);
        let new_name = new.map(|n| self.rss[n].name_any()).unwrap_or_default();
        let cur = conds.iter().find(|c| c.type_ == "Progressing").cloned();
        let mut requeue = None;
        if paused {
            if cur.as_ref().and_then(|c| c.reason.as_deref()) != Some("DeploymentPaused") {
                set_condition(
                    &mut conds,
                    progressing("Unknown", "DeploymentPaused", "Deployment is paused".into()),
                );
            }
        } else if cur.as_ref().and_then(|c| c.reason.as_deref()) == Some("DeploymentPaused") {
            set_condition(
                &mut conds,
                progressing(
                    "Unknown",
                    "DeploymentResumed",
                    "Deployment is resumed".into(),
                ),
            );
        } else if deadline.is_some() {
            status.conditions = Some(conds.clone());
            let done = self.is_complete(&status);
            let old = self.d.status.clone().unwrap_or_default();
            let progressed = status.updated_replicas > old.updated_replicas
                || status.ready_replicas > old.ready_replicas
                || status.available_replicas > old.available_replicas
                || status.replicas.unwrap_or(0) - status.updated_replicas.unwrap_or(0)
                    < old.replicas.unwrap_or(0) - old.updated_replicas.unwrap_or(0);
            if done && new.is_some() {
                set_condition(
                    &mut conds,
                    progressing(
                        "True",
                        "NewReplicaSetAvailable",
                        format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                    ),
                );
            } else if new.is_some() && (progressed || cur.is_none()) {
                let reason = if cur.as_ref().and_then(|c| c.reason.as_deref())
                    == Some("NewReplicaSetCreated")
                    && !progressed
                {
                    "NewReplicaSetCreated"
                } else {
                    "ReplicaSetUpdated"
                };
                let msg = if reason == "NewReplicaSetCreated" {
                    format!("Created new replica set \"{new_name}\"")
                } else {
                    format!("ReplicaSet \"{new_name}\" is progressing.")
                };
                set_condition(&mut conds, progressing("True", reason, msg));
            } else if !done && new.is_some() {
                let secs = deadline.unwrap_or(600) as i64;
                let since = cur
                    .as_ref()
                    .and_then(|c| c.last_update_time.as_ref())
                    .map(|t| t.0.as_second())
                    .unwrap_or_else(|| Timestamp::now().as_second());
                let left = since + secs - Timestamp::now().as_second();
                let timed_out = cur.as_ref().and_then(|c| c.reason.as_deref())
                    == Some("ProgressDeadlineExceeded");
                if left <= 0 && !timed_out {
                    set_condition(
                        &mut conds,
                        progressing(
                            "False",
                            "ProgressDeadlineExceeded",
                            format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                        ),
                    );
                } else if left > 0 {
                    requeue = Some(Duration::from_secs(left as u64 + 1));
                }
            }
        }
        status.conditions = Some(conds);
        if self.d.status.as_ref() != Some(&status) {
            let dapi: Api<Deployment> = Api::namespaced(
                self.ctx.client.clone(),
                &self.d.namespace().unwrap_or_default(),
            );
            dapi.patch_status(
                &self.d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
        }
        Ok(requeue.map_or(Action::Done, Action::After))
    }
}

fn condition(ty: &str, status: &str, reason: &str, message: String) -> DeploymentCondition {
    let now = Time(Timestamp::now());
    DeploymentCondition {
        type_: ty.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

fn progressing(status: &str, reason: &str, message: String) -> DeploymentCondition {
    condition("Progressing", status, reason, message)
}

/// Replaces the condition of the same type; an unchanged status keeps its transition time,
/// and an unchanged condition keeps its update time too.
fn set_condition(conds: &mut Vec<DeploymentCondition>, mut c: DeploymentCondition) {
    if let Some(cur) = conds.iter_mut().find(|x| x.type_ == c.type_) {
        if cur.status == c.status && cur.reason == c.reason && cur.message == c.message {
            return;
        }
        if cur.status == c.status {
            c.last_transition_time = cur.last_transition_time.clone();
        }
        *cur = c;
    } else {
        conds.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(replicas: i32, surge: &str, unavailable: &str) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}}
        }))
        .unwrap()
    }

    #[test]
    fn fenceposts_round_surge_up_and_unavailable_down() {
        assert_eq!(resolve_fenceposts(&deploy(10, "25%", "25%")), (3, 2));
        assert_eq!(resolve_fenceposts(&deploy(1, "25%", "25%")), (1, 0));
        assert_eq!(resolve_fenceposts(&deploy(4, "0%", "0%")), (0, 1));
        let mut d = deploy(5, "x", "y");
        d.spec
            .as_mut()
            .unwrap()
            .strategy
            .as_mut()
            .unwrap()
            .rolling_update =
            Some(serde_json::from_value(json!({"maxSurge": 2, "maxUnavailable": 0})).unwrap());
        assert_eq!(resolve_fenceposts(&d), (2, 0));
    }

    #[test]
    fn templates_match_without_the_hash_label() {
        let d = deploy(1, "1", "0");
        let t = d.spec.unwrap().template;
        let mut hashed = t.clone();
        hashed
            .metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(HASH_LABEL.into(), "abc".into());
        assert!(same_template(&t, &hashed));
        assert_eq!(template_hash(&t, None), template_hash(&hashed, None));
        assert_ne!(template_hash(&t, None), template_hash(&t, Some(1)));
        let h = template_hash(&t, None);
        assert!(
            h.len() >= 8
                && h.bytes()
                    .all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c)),
            "{h}"
        );
    }
}
