//! The controllers are level-triggered: a control plane killed with SIGKILL in the middle of a
//! rollout and started again on the same data finishes it, with no pod made twice.

mod common;
#[path = "common/fake_kubelet.rs"]
mod fake_kubelet;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

async fn rolled_out(deploys: &Api<Deployment>, replicas: i32, limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let d = deploys.get("web").await?;
        let s = d.status.unwrap_or_default();
        if s.observed_generation >= d.metadata.generation
            && s.updated_replicas == Some(replicas)
            && s.available_replicas == Some(replicas)
            && s.replicas == Some(replicas)
        {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("rollout not complete: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_resumes_after_the_control_plane_is_killed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("admin.kubeconfig");
    let replicas = 6;
    {
        let _server = common::spawn_apiserver(dir.path())?;
        let client = common::client_for(&kc).await?;
        let _kubelet =
            fake_kubelet::start(client.clone(), "node-1", Duration::from_millis(400)).await?;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "img:v1"}]}}}
        }))?;
        deploys.create(&PostParams::default(), &d).await?;
        rolled_out(&deploys, replicas, Duration::from_secs(60)).await?;
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "img:v2"}]}}}});
        deploys
            .patch("web", &PatchParams::default(), &Patch::Strategic(&patch))
            .await?;
        // Part way: some new pods, some old ones still there.
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let t = Instant::now();
        loop {
            let l = pods.list(&ListParams::default()).await?.items;
            let new = l
                .iter()
                .filter(|p| {
                    p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("img:v2")
                })
                .count();
            if (2..replicas as usize).contains(&new) {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the rollout did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The server and the kubelet go away here, SIGKILL for the server.
    }
    let _server = common::spawn_apiserver(dir.path())?;
    let client = common::client_for(&kc).await?;
    let _kubelet =
        fake_kubelet::start(client.clone(), "node-1", Duration::from_millis(100)).await?;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    rolled_out(&deploys, replicas, Duration::from_secs(60)).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let t = Instant::now();
    loop {
        let l = pods.list(&ListParams::default()).await?.items;
        let all_new = l
            .iter()
            .all(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("img:v2"));
        if l.len() == replicas as usize && all_new {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{} pods left, all new: {all_new}", l.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sizes: Vec<i32> = rss
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|r| r.spec.as_ref().unwrap().replicas.unwrap_or(0))
        .collect();
    sizes.sort();
    assert_eq!(sizes, [0, replicas]);
    // No pod was made twice: the events count exactly one creation per new pod.
    let new_rs = rss
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|r| r.spec.as_ref().unwrap().replicas == Some(replicas))
        .unwrap();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    let created: i32 = events
        .list(&ListParams::default().fields(&format!(
            "involvedObject.name={},reason=SuccessfulCreate",
            new_rs.metadata.name.clone().unwrap()
        )))
        .await?
        .items
        .iter()
        .map(|e| e.count.unwrap_or(1))
        .sum();
    assert_eq!(
        created, replicas,
        "SuccessfulCreate events of the new ReplicaSet"
    );
    Ok(())
}
