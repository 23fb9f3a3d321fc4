//! The controllers and the scheduler against the real kubectl (1.27 and 1.33), with a fake
//! kubelet reporting bound pods Running and Ready.

mod common;
#[path = "common/fake_kubelet.rs"]
mod fake_kubelet;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{ok, TestServer};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: 127.0.0.1:5000/test/busybox:v1
";

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if f().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rollout(v: u32) -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(200)).await?;
    let out = ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], WEB));
    assert!(out.contains("deployment.apps/web created"), "{out}");
    let out = ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    assert!(out.contains("successfully rolled out"), "{out}");
    let out = ok(ts.kubectl(v, &["get", "deploy", "web"]));
    assert!(
        out.lines().nth(1).unwrap_or("").split_whitespace().nth(1) == Some("3/3"),
        "{out}"
    );
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let list = pods.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(list.items.len(), 3);
    assert!(list
        .items
        .iter()
        .all(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("node-1")));

    // A new image: a second ReplicaSet, revision 2, the old one scaled to 0.
    ok(ts.kubectl(
        v,
        &[
            "set",
            "image",
            "deploy/web",
            "web=127.0.0.1:5000/test/busybox:v2",
        ],
    ));
    let out = ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    assert!(out.contains("successfully rolled out"), "{out}");
    let rss: Api<ReplicaSet> = Api::namespaced(admin.clone(), "default");
    let list = rss.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(
        list.items.len(),
        2,
        "{:?}",
        list.items
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let out = ok(ts.kubectl(v, &["rollout", "history", "deploy/web"]));
    assert!(out.contains("1 ") && out.contains("2 "), "{out}");
    let out = ok(ts.kubectl(v, &["rollout", "history", "deploy/web", "--revision=2"]));
    assert!(out.contains("busybox:v2"), "{out}");

    // Undo: the first ReplicaSet is reused and becomes revision 3.
    ok(ts.kubectl(v, &["rollout", "undo", "deploy/web"]));
    let out = ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    assert!(out.contains("successfully rolled out"), "{out}");
    let list = rss.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(list.items.len(), 2);
    let deploys: Api<Deployment> = Api::namespaced(admin.clone(), "default");
    let d = deploys.get("web").await?;
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "3"
    );
    let image = &d.spec.unwrap().template.spec.unwrap().containers[0].image;
    assert_eq!(image.as_deref(), Some("127.0.0.1:5000/test/busybox:v1"));

    // Scale, then delete: the pods go with it.
    ok(ts.kubectl(v, &["scale", "deploy/web", "--replicas=5"]));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    eventually("5 pods", Duration::from_secs(30), || async {
        Ok(pods
            .list(&ListParams::default().labels("app=web"))
            .await?
            .items
            .len()
            == 5)
    })
    .await?;
    let out = ok(ts.kubectl(v, &["describe", "deploy", "web"]));
    assert!(out.contains("ScalingReplicaSet"), "{out}");
    ok(ts.kubectl(v, &["delete", "deploy", "web"]));
    eventually("no pods", Duration::from_secs(30), || async {
        Ok(pods
            .list(&ListParams::default().labels("app=web"))
            .await?
            .items
            .is_empty())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rollout_undo_scale_delete_kubectl_1_33() -> Result<()> {
    rollout(33).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rollout_undo_scale_delete_kubectl_1_27() -> Result<()> {
    rollout(27).await
}
