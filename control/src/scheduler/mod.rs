//! The scheduler: binds each pending pod that names `default-scheduler` to the best node that
//! fits it, through the binding subresource; a pod that fits nowhere gets PodScheduled=False
//! (Unschedulable) and a FailedScheduling event, and is tried again when nodes or pods change.

pub mod fit;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinSet;
use tracing::{debug, info};

use crate::controllers::events::{Recorder, Type};
use crate::controllers::informer::Informer;
use crate::controllers::queue::{Action, Queue};
use crate::controllers::{pods, Error, Key};

pub const NAME: &str = "default-scheduler";

struct Scheduler {
    client: Client,
    pods: Informer<Pod>,
    nodes: Informer<Node>,
    events: Recorder,
    /// Pods bound (or being bound) whose binding the cache has not shown yet: uid -> node.
    assumed: Mutex<HashMap<String, (String, Arc<Pod>)>>,
    unschedulable: Mutex<HashSet<Key>>,
}

fn wants_us(p: &Pod) -> bool {
    let spec = p.spec.as_ref();
    spec.is_some_and(|s| s.node_name.as_deref().unwrap_or("").is_empty())
        && spec
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or(NAME)
            == NAME
        && p.metadata.deletion_timestamp.is_none()
        && !pods::is_terminal(p)
}

/// Runs the scheduler until the future is dropped, reading pods and nodes from `shared`.
pub async fn run(client: Client, shared: crate::controllers::Shared) {
    let mut tasks = JoinSet::new();
    let s = Arc::new(Scheduler {
        pods: shared.pods,
        nodes: shared.nodes,
        events: Recorder::new(client.clone(), NAME),
        client,
        assumed: Mutex::default(),
        unschedulable: Mutex::default(),
    });
    s.pods.ready().await;
    s.nodes.ready().await;
    let q = Queue::<Key>::new(Duration::from_secs(10));
    {
        let (s, q) = (s.clone(), q.clone());
        let mut pod_events = s.pods.subscribe();
        let mut node_events = s.nodes.subscribe();
        tasks.spawn(async move {
            let retry_all = |s: &Scheduler, q: &Queue<Key>| {
                for k in s.unschedulable.lock().expect("lock").drain() {
                    q.add(k);
                }
            };
            loop {
                tokio::select! {
                    Some(p) = pod_events.recv() => {
                        if wants_us(&p) {
                            q.add((p.namespace().unwrap_or_default(), p.name_any()));
                        } else if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                            // A pod that went away or ended frees room for others.
                            if p.metadata.deletion_timestamp.is_some() || pods::is_terminal(&p) {
                                retry_all(&s, &q);
                            }
                        }
                    }
                    Some(_) = node_events.recv() => retry_all(&s, &q),
                    else => break,
                }
            }
        });
    }
    for p in s.pods.store().state() {
        if wants_us(&p) {
            q.add((p.namespace().unwrap_or_default(), p.name_any()));
        }
    }
    {
        // Unschedulable pods are looked at again now and then, as kube-scheduler flushes them.
        let (s, q) = (s.clone(), q.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                for k in s.unschedulable.lock().expect("lock").drain() {
                    q.add(k);
                }
            }
        });
    }
    // One worker: each decision sees the ones before it (bindings run concurrently).
    let sched = s.clone();
    let qq = q.clone();
    q.run(&mut tasks, 1, move |k| {
        schedule_one(sched.clone(), qq.clone(), k)
    });
    while tasks.join_next().await.is_some() {}
}

async fn schedule_one(s: Arc<Scheduler>, q: Arc<Queue<Key>>, key: Key) -> Result<Action, Error> {
    let Some(pod) = s.pods.get(Some(&key.0), &key.1) else {
        return Ok(Action::Done);
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if !wants_us(&pod) || s.assumed.lock().expect("lock").contains_key(&uid) {
        return Ok(Action::Done);
    }
    let all = s.pods.store().state();
    let nodes = s.nodes.store().state();
    let mut on_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    {
        let mut assumed = s.assumed.lock().expect("lock");
        // Forget assumptions the cache has caught up with.
        assumed.retain(|uid, _| {
            all.iter()
                .find(|p| p.metadata.uid.as_deref() == Some(uid))
                .is_some_and(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none())
        });
        for p in &all {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            if let Some(n) = node.filter(|n| !n.is_empty()) {
                if !pods::is_terminal(p) {
                    on_node.entry(n).or_default().push(p.clone());
                }
            }
        }
        for (n, p) in assumed.values() {
            on_node.entry(n.clone()).or_default().push(p.clone());
        }
    }
    let mut reasons = Vec::new();
    let mut best: Option<(i64, &Node)> = None;
    for node in &nodes {
        let there: Vec<&Pod> = on_node
            .get(&node.name_any())
            .map(|v| v.iter().map(|p| p.as_ref()).collect())
            .unwrap_or_default();
        match fit::filter(&pod, node, &there) {
            Ok(()) => {
                let sc = fit::score(&pod, node, &there);
                if best.is_none_or(|(b, n)| sc > b || (sc == b && node.name_any() < n.name_any())) {
                    best = Some((sc, node));
                }
            }
            Err(why) => reasons.push(why),
        }
    }
    let Some((_, node)) = best else {
        let msg = fit::unschedulable_message(nodes.len(), &reasons);
        mark_unschedulable(&s, &pod, &msg).await?;
        s.unschedulable.lock().expect("lock").insert(key);
        return Ok(Action::Done);
    };
    let node_name = node.name_any();
    s.assumed
        .lock()
        .expect("lock")
        .insert(uid.clone(), (node_name.clone(), pod.clone()));
    // Binding runs on while the next pod is decided.
    tokio::spawn(async move {
        match bind(&s, &pod, &node_name).await {
            Ok(()) => {
                let msg = format!("Successfully assigned {}/{} to {node_name}", key.0, key.1);
                s.events
                    .publish(pod.as_ref(), Type::Normal, "Scheduled", msg);
            }
            Err(e) => {
                debug!(pod = %key.1, "binding: {e}");
                s.assumed.lock().expect("lock").remove(&uid);
                q.add_after(key, Duration::from_millis(200));
            }
        }
    });
    Ok(Action::Done)
}

async fn bind(s: &Scheduler, pod: &Pod, node: &str) -> Result<(), Error> {
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let b = Binding {
        metadata: ObjectMeta {
            name: Some(pod.name_any()),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..Default::default()
        },
    };
    api.create_subresource::<Binding, serde_json::Value>(
        "binding",
        &pod.name_any(),
        &PostParams::default(),
        &b,
    )
    .await?;
    info!(pod = %format!("{ns}/{}", pod.name_any()), node, "bound");
    Ok(())
}

async fn mark_unschedulable(s: &Scheduler, pod: &Pod, msg: &str) -> Result<(), Error> {
    s.events
        .publish(pod, Type::Warning, "FailedScheduling", msg.to_string());
    let mut conds: Vec<PodCondition> = pod
        .status
        .as_ref()
        .and_then(|st| st.conditions.clone())
        .unwrap_or_default();
    let cur = conds.iter().find(|c| c.type_ == "PodScheduled");
    if cur.is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(msg)) {
        return Ok(());
    }
    let keep_time = cur
        .filter(|c| c.status == "False")
        .and_then(|c| c.last_transition_time.clone());
    conds.retain(|c| c.type_ != "PodScheduled");
    conds.push(PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some(msg.to_string()),
        last_transition_time: keep_time.or(Some(Time(Timestamp::now()))),
        last_probe_time: None,
        observed_generation: None,
    });
    let api: Api<Pod> = Api::namespaced(s.client.clone(), &pod.namespace().unwrap_or_default());
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conds}})),
    )
    .await?;
    Ok(())
}
