//! The pods bound to this node: a watch on `spec.nodeName=<node>` dispatching each pod to its
//! worker, and at the first complete listing the removal of what the runtime holds for pods
//! that no longer exist.

use crate::pod_runtime::PodRuntime;
use crate::pod_worker::{Update, Worker};
use crate::static_pods;
use crate::{Config, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Whether two versions of a pod differ in nothing the worker acts on.
fn same_but_status(a: &Pod, b: &Pod) -> bool {
    a.spec == b.spec
        && a.metadata.deletion_timestamp == b.metadata.deletion_timestamp
        && a.metadata.deletion_grace_period_seconds == b.metadata.deletion_grace_period_seconds
        && a.metadata.labels == b.metadata.labels
        && a.metadata.annotations == b.metadata.annotations
}

struct Dispatcher {
    ctx: Arc<PodRuntime>,
    client: kube::Client,
    workers: HashMap<String, watch::Sender<Update>>,
    /// UIDs whose workers finished: never synced again.
    terminated: HashSet<String>,
    tasks: JoinSet<String>,
}

impl Dispatcher {
    fn dispatch(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if self.terminated.contains(&uid) {
            return;
        }
        let pod = Arc::new(pod);
        self.ctx.set_pod(pod.clone());
        if let Some(tx) = self.workers.get(&uid) {
            // Replaces an update the worker has not taken yet: only the newest matters. A change
            // of status alone (the worker's own report) does not wake the worker.
            tx.send_if_modified(|current| {
                let wake = match current {
                    Update::Pod(old) => !same_but_status(old, &pod),
                    Update::Gone => false,
                };
                if !matches!(current, Update::Gone) {
                    *current = Update::Pod(pod);
                }
                wake
            });
            return;
        }
        let (tx, rx) = watch::channel(Update::Pod(pod.clone()));
        let worker = Worker::new(self.ctx.clone(), self.client.clone(), pod, rx);
        self.tasks.spawn(worker.run());
        self.workers.insert(uid, tx);
    }

    fn gone(&mut self, uid: &str) {
        if let Some(tx) = self.workers.get(uid) {
            tx.send_replace(Update::Gone);
        }
    }

    /// Removes what the runtime holds for pods that are neither listed nor being worked on.
    fn clean_orphans(&mut self, listed: &HashSet<String>) {
        let ctx = self.ctx.clone();
        let keep: HashSet<String> = listed.iter().chain(self.workers.keys()).cloned().collect();
        tokio::task::spawn_blocking(move || {
            for uid in ctx.local_pods() {
                if keep.contains(&uid) {
                    continue;
                }
                tracing::info!(pod = %uid, "removing leftovers of a pod that no longer exists");
                if let Err(e) = ctx.teardown(&uid) {
                    tracing::warn!(pod = %uid, error = %e, "remove leftovers");
                }
            }
        });
    }
}

/// Reads the static pods (blocking work off the runtime).
async fn read_statics(cfg: &Config) -> BTreeMap<String, Pod> {
    let Some(dir) = cfg.pod_manifest_path.clone() else {
        return BTreeMap::new();
    };
    let node = cfg.node_name.clone();
    tokio::task::spawn_blocking(move || static_pods::read_dir(&dir, &node))
        .await
        .unwrap_or_default()
}

/// Watches the node's pods and runs a worker per pod until the watch ends; static pods from
/// the manifest directory run alongside, with their mirror pods kept in the API.
pub async fn run(client: kube::Client, cfg: Config, ctx: Arc<PodRuntime>) -> Result<()> {
    let api: Api<Pod> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node_name));
    let mut events = std::pin::pin!(watcher::watcher(api, wc).default_backoff());
    let mut d = Dispatcher {
        ctx,
        client,
        workers: HashMap::new(),
        terminated: HashSet::new(),
        tasks: JoinSet::new(),
    };
    let mut listing: HashSet<String> = HashSet::new();
    let mut cleaned = false;
    // Static pods start before the first listing, so that its orphan sweep keeps them.
    let mut statics = read_statics(&cfg).await;
    for pod in statics.values() {
        d.dispatch(pod.clone());
    }
    let mut check = tokio::time::interval(cfg.file_check_frequency);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mirrors: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = check.tick(), if cfg.pod_manifest_path.is_some() => {
                let now = read_statics(&cfg).await;
                for uid in statics.keys().filter(|u| !now.contains_key(*u)) {
                    tracing::info!(pod = %uid, "static pod manifest removed or changed");
                    d.gone(uid);
                }
                for (uid, pod) in &now {
                    if !statics.contains_key(uid) {
                        // A manifest put back as it was is the same pod, run again.
                        d.terminated.remove(uid);
                        d.dispatch(pod.clone());
                    }
                }
                statics = now;
                if mirrors.as_ref().is_none_or(|h| h.is_finished()) {
                    let (client, node, statics) =
                        (d.client.clone(), cfg.node_name.clone(), statics.clone());
                    mirrors = Some(tokio::spawn(async move {
                        if let Err(e) = static_pods::sync_mirrors(&client, &node, &statics).await {
                            tracing::warn!(error = %e, "sync mirror pods");
                        }
                    }));
                }
            }
            ev = events.next() => match ev {
                None => return Ok(()),
                Some(Err(e)) => tracing::warn!(error = %e, "watch pods"),
                Some(Ok(Event::Init)) => listing.clear(),
                // Mirror pods are the API's view of static pods: never run themselves.
                Some(Ok(Event::InitApply(pod) | Event::Apply(pod))) if static_pods::is_mirror(&pod) => {
                    if let Some(hash) = static_pods::mirror_hash(&pod) {
                        d.ctx.set_mirror(hash, pod.metadata.uid.as_deref());
                    }
                }
                Some(Ok(Event::InitApply(pod))) => {
                    listing.extend(pod.metadata.uid.clone());
                    d.dispatch(pod);
                }
                Some(Ok(Event::InitDone)) => {
                    let missing: Vec<String> = d
                        .workers
                        .keys()
                        .filter(|u| !listing.contains(*u) && !statics.contains_key(*u))
                        .cloned()
                        .collect();
                    for uid in missing {
                        d.gone(&uid);
                    }
                    if !cleaned {
                        d.clean_orphans(&listing);
                        cleaned = true;
                    }
                }
                Some(Ok(Event::Apply(pod))) => d.dispatch(pod),
                Some(Ok(Event::Delete(pod))) => {
                    if let Some(hash) = static_pods::mirror_hash(&pod) {
                        if d.ctx.mirror_uid(hash) == pod.metadata.uid {
                            d.ctx.set_mirror(hash, None);
                        }
                    }
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        d.gone(uid);
                    }
                }
            },
            Some(done) = d.tasks.join_next(), if !d.tasks.is_empty() => {
                if let Ok(uid) = done {
                    d.workers.remove(&uid);
                    d.ctx.forget_pod(&uid);
                    d.terminated.insert(uid);
                }
            }
        }
    }
}
