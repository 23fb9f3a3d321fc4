//! The controllers of `oxlet up`: each watches through shared informers, works keys off a
//! deduplicating queue with per-key backoff, and writes only through the Kubernetes API (the
//! in-process client), as kube-controller-manager does against any API server.

pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod events;
pub mod informer;
pub mod job;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod owners;
pub mod pods;
pub mod queue;
pub mod replicaset;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::task::JoinSet;

use informer::Informer;
use owners::Expectations;
use queue::Queue;

/// A namespaced object's key: namespace and name.
pub type Key = (String, String);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(
        "replica set {0} exists with another template (hash collision); retrying with a new hash"
    )]
    Collision(String),
    #[error("cluster CIDR {0} has no free /{1} left")]
    CidrFull(String, u8),
}

/// Settings of the controllers (kube-controller-manager's flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// `--cluster-cidr`: node pod ranges are cut from it.
    pub cluster_cidr: (Ipv4Addr, u8),
    /// `--node-cidr-mask-size`.
    pub node_cidr_mask: u8,
    /// Longest retry delay of a failing key.
    pub max_backoff: Duration,
    /// First pause before replacing a Job's failed pod (doubling per failure, at most 6 min).
    pub job_backoff: Duration,
    /// `--node-monitor-grace-period`: a node silent this long is Ready=Unknown.
    pub node_monitor_grace_period: Duration,
    /// `--node-monitor-period`: how often silent nodes are looked for.
    pub node_monitor_period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_cidr: (Ipv4Addr::new(10, 244, 0, 0), 16),
            node_cidr_mask: 24,
            max_backoff: Duration::from_secs(60),
            job_backoff: Duration::from_secs(10),
            node_monitor_grace_period: Duration::from_secs(50),
            node_monitor_period: Duration::from_secs(5),
        }
    }
}

/// What every controller reads and writes through.
pub struct Ctx {
    pub client: Client,
    pub cfg: Config,
    pub pods: Informer<Pod>,
    pub replicasets: Informer<ReplicaSet>,
    pub deployments: Informer<Deployment>,
    pub daemonsets: Informer<DaemonSet>,
    pub jobs: Informer<Job>,
    pub services: Informer<Service>,
    pub slices: Informer<EndpointSlice>,
    pub nodes: Informer<Node>,
    pub events: events::Recorder,
}

/// What a pod-owning controller starts a pass with.
pub enum Owner<K> {
    /// The object is gone: its expectations are dropped.
    Gone,
    /// The pod cache has not shown this controller's last creates or deletes yet; it will,
    /// and that requeues the key (the action is a fallback).
    Lagging(queue::Action),
    /// The object and every pod of its namespace.
    Ready(Arc<K>, Vec<Arc<Pod>>),
}

/// Looks `key` up in `inf` and checks `exp` against the pod cache.
pub fn owner_and_pods<K>(
    ctx: &Ctx,
    inf: &Informer<K>,
    exp: &Expectations<Key>,
    key: &Key,
) -> Owner<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let Some(obj) = inf.get(Some(&key.0), &key.1) else {
        exp.forget(key);
        return Owner::Gone;
    };
    let pods = ctx.pods.in_namespace(&key.0);
    let live = |n: &str| {
        pods.iter().any(|p| {
            p.metadata.name.as_deref() == Some(n) && p.metadata.deletion_timestamp.is_none()
        })
    };
    if !exp.satisfied(key, live) {
        return Owner::Lagging(queue::Action::After(Duration::from_secs(1)));
    }
    Owner::Ready(obj, pods)
}

fn key_of<K: kube::Resource>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// The pod and node caches the controllers and the scheduler of one process share, so each
/// object is held once however many of them read it.
#[derive(Clone)]
pub struct Shared {
    pub pods: Informer<Pod>,
    pub nodes: Informer<Node>,
}

impl Shared {
    /// Starts both watches on `tasks` with `client`'s identity.
    pub fn start(tasks: &mut JoinSet<()>, client: &Client) -> Shared {
        Shared {
            pods: Informer::start(tasks, Api::all(client.clone()), Default::default()),
            nodes: Informer::start(tasks, Api::all(client.clone()), Default::default()),
        }
    }
}

/// Runs the controllers until the future is dropped (every task is owned by it).
pub async fn run(client: Client, cfg: Config, shared: Shared) {
    let mut tasks = JoinSet::new();
    let wc = watcher::Config::default;
    let ctx = Arc::new(Ctx {
        pods: shared.pods,
        replicasets: Informer::start(&mut tasks, Api::all(client.clone()), wc()),
        deployments: Informer::start(&mut tasks, Api::all(client.clone()), wc()),
        daemonsets: Informer::start(&mut tasks, Api::all(client.clone()), wc()),
        jobs: Informer::start(&mut tasks, Api::all(client.clone()), wc()),
        services: Informer::start(&mut tasks, Api::all(client.clone()), wc()),
        slices: Informer::start(&mut tasks, Api::all(client.clone()), wc()),
        nodes: shared.nodes,
        events: events::Recorder::new(client.clone(), "controller-manager"),
        client,
        cfg,
    });
    ctx.pods.ready().await;
    ctx.replicasets.ready().await;
    ctx.deployments.ready().await;
    ctx.daemonsets.ready().await;
    ctx.jobs.ready().await;
    ctx.services.ready().await;
    ctx.slices.ready().await;
    ctx.nodes.ready().await;

    // ReplicaSets: their own changes, and their pods' (orphans to all matching sets).
    let rs_q = Queue::<Key>::new(ctx.cfg.max_backoff);
    let exp = Arc::new(Expectations::<Key>::default());
    {
        let (q, c) = (rs_q.clone(), ctx.clone());
        let mut rs_events = ctx.replicasets.subscribe();
        let mut pod_events = ctx.pods.subscribe();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    Some(rs) = rs_events.recv() => q.add(key_of(rs.as_ref())),
                    Some(p) = pod_events.recv() => {
                        for k in owners_of::<ReplicaSet>(&c.replicasets, &p.metadata, p.namespace().as_deref(), |rs| rs.spec.as_ref().map(|s| &s.selector)) {
                            q.add(k);
                        }
                    }
                    else => break,
                }
            }
        });
        let (c, e) = (ctx.clone(), exp.clone());
        rs_q.run(&mut tasks, 2, move |k| {
            replicaset::reconcile(c.clone(), e.clone(), k)
        });
    }

    // Deployments: their own changes, their ReplicaSets', and pod deletions (Recreate waits).
    let d_q = Queue::<Key>::new(ctx.cfg.max_backoff);
    {
        let (q, c) = (d_q.clone(), ctx.clone());
        let mut d_events = ctx.deployments.subscribe();
        let mut rs_events = ctx.replicasets.subscribe();
        let mut pod_events = ctx.pods.subscribe();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    Some(d) = d_events.recv() => q.add(key_of(d.as_ref())),
                    Some(rs) = rs_events.recv() => {
                        for k in owners_of::<Deployment>(&c.deployments, &rs.metadata, rs.namespace().as_deref(), |d| d.spec.as_ref().map(|s| &s.selector)) {
                            q.add(k);
                        }
                    }
                    Some(p) = pod_events.recv() => {
                        // A Recreate rollout waits for old pods to be gone.
                        if p.metadata.deletion_timestamp.is_some() || pods::is_terminal(&p) {
                            let ns = p.namespace().unwrap_or_default();
                            if let Some(rs) = owners::controller_of(&p.metadata).and_then(|o| c.replicasets.get(Some(&ns), &o.name)) {
                                if let Some(d) = owners::controller_of(&rs.metadata) {
                                    q.add((ns, d.name.clone()));
                                }
                            }
                        }
                    }
                    else => break,
                }
            }
        });
        let c = ctx.clone();
        d_q.run(&mut tasks, 2, move |k| deployment::reconcile(c.clone(), k));
    }

    // DaemonSets: their own changes, their pods', and nodes coming and going.
    let ds_q = Queue::<Key>::new(ctx.cfg.max_backoff);
    {
        let (q, c) = (ds_q.clone(), ctx.clone());
        let mut ds_events = ctx.daemonsets.subscribe();
        let mut pod_events = ctx.pods.subscribe();
        let mut node_events = ctx.nodes.subscribe();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    Some(ds) = ds_events.recv() => q.add(key_of(ds.as_ref())),
                    Some(p) = pod_events.recv() => {
                        if let Some(o) = owners::controller_of(&p.metadata).filter(|o| o.kind == "DaemonSet") {
                            q.add((p.namespace().unwrap_or_default(), o.name.clone()));
                        }
                    }
                    Some(_) = node_events.recv() => {
                        for ds in c.daemonsets.store().state() {
                            q.add(key_of(ds.as_ref()));
                        }
                    }
                    else => break,
                }
            }
        });
        let (c, e) = (ctx.clone(), Arc::new(Expectations::<Key>::default()));
        ds_q.run(&mut tasks, 1, move |k| {
            daemonset::reconcile(c.clone(), e.clone(), k)
        });
    }

    // Jobs: their own changes and their pods'.
    let job_q = Queue::<Key>::new(ctx.cfg.max_backoff);
    {
        let q = job_q.clone();
        let mut job_events = ctx.jobs.subscribe();
        let mut pod_events = ctx.pods.subscribe();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    Some(j) = job_events.recv() => q.add(key_of(j.as_ref())),
                    Some(p) = pod_events.recv() => {
                        if let Some(o) = owners::controller_of(&p.metadata).filter(|o| o.kind == "Job") {
                            q.add((p.namespace().unwrap_or_default(), o.name.clone()));
                        }
                    }
                    else => break,
                }
            }
        });
        let (c, e) = (ctx.clone(), Arc::new(Expectations::<Key>::default()));
        job_q.run(&mut tasks, 2, move |k| {
            job::reconcile(c.clone(), e.clone(), k)
        });
    }

    endpoints::start(&mut tasks, ctx.clone());
    nodeipam::start(&mut tasks, ctx.clone());
    nodelifecycle::start(&mut tasks, ctx.clone());

    // A periodic resync, as informers' resync: level-triggered safety net.
    {
        let c = ctx.clone();
        let (rs_q, d_q, ds_q, job_q) = (rs_q.clone(), d_q.clone(), ds_q.clone(), job_q.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                for rs in c.replicasets.store().state() {
                    rs_q.add(key_of(rs.as_ref()));
                }
                for d in c.deployments.store().state() {
                    d_q.add(key_of(d.as_ref()));
                }
                for ds in c.daemonsets.store().state() {
                    ds_q.add(key_of(ds.as_ref()));
                }
                for j in c.jobs.store().state() {
                    job_q.add(key_of(j.as_ref()));
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// The keys of the controllers of `meta`'s kind `K` to tell: its controller if it has one,
/// otherwise every `K` in its namespace whose selector matches it (adoption).
fn owners_of<K>(
    inf: &Informer<K>,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ns: Option<&str>,
    selector: impl Fn(&K) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Vec<Key>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let ns = ns.unwrap_or_default();
    match owners::controller_of(meta) {
        Some(o) if o.kind == K::kind(&()) => vec![(ns.to_string(), o.name.clone())],
        Some(_) => vec![],
        None => inf
            .in_namespace(ns)
            .iter()
            .filter(|k| {
                selector(k).is_some_and(|s| {
                    owners::selects_anything(s) && owners::matches(s, meta.labels.as_ref())
                })
            })
            .map(|k| key_of(k.as_ref()))
            .collect(),
    }
}
